"""The orchestrator: capture workers → latest-frame hand-off → inference worker → publisher.

:meth:`EdgeApp.prepare` does everything that can fail because of the user's input (camera
sources, state folder, bundle verification, backend) before anything starts, raising
``ConfigError`` / ``BundleError`` / ``BackendUnavailable`` (the CLI prints one line, exit 2).
:meth:`EdgeApp.run` then supervises from the main thread: stats every
``publish.stats_interval_s``, stale cameras, the systemd watchdog when no camera can deliver,
SIGHUP (reload the bundle with a new backend; MQTT stays connected) and SIGTERM/SIGINT (stop
capture, publish ``stopped``, flush, return within 3 s).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque

import cv2
import zmq

from haloae.export.bundle import BundleError, bundle_hash, verify_bundle

from .backends import Backend
from .backends.select import load_backend
from .capture import CaptureWorker, check_source
from .config import ConfigError, EdgeConfig
from .frames import CameraStatus
from .infer import InferenceWorker, model_id
from .ipc import DEFAULT_ENDPOINT, LatestFrames
from .stats import Stats
from .watchdog import Notifier

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL = 0, 1
TICK_S = 0.2


def load_model(cfg: EdgeConfig) -> tuple[Backend, dict, str]:
    """Verify the bundle and build its backend: ``(backend, manifest, model id)``."""
    manifest = verify_bundle(cfg.model.bundle)
    backend = load_backend(cfg.model, cfg.model.bundle, manifest, cfg.state_dir / "engines")
    return backend, manifest, model_id(manifest, bundle_hash(cfg.model.bundle, manifest))


class EdgeApp:
    """One daemon. ``prepare()`` (may raise user errors), then ``run()`` -> exit code."""

    def __init__(self, cfg: EdgeConfig, exit_when_done: bool = False, notifier: Notifier | None = None,
                 endpoint: str = DEFAULT_ENDPOINT):
        self.cfg, self.exit_when_done, self.endpoint = cfg, exit_when_done, endpoint
        self.notifier = notifier or Notifier()
        self._wake = threading.Event()
        self._stop_requested = self._reload_requested = False
        self.backend: Backend | None = None
        self._statuses: dict[str, deque[CameraStatus]] = {}
        self._status_lock = threading.Lock()

    # -- setup ------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Check sources, state folder and bundle; load the backend. Raises user errors."""
        for i, cam in enumerate(self.cfg.cameras):
            check_source(cam, i)
        try:
            self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"state_dir: cannot create {self.cfg.state_dir} ({e.strerror}); use a writable "
                              "folder (systemd: StateDirectory=)") from None
        if not os.access(self.cfg.state_dir, os.W_OK | os.X_OK):
            raise ConfigError(f"state_dir: {self.cfg.state_dir} is not writable by this user; fix its owner "
                              "or use another folder (systemd: StateDirectory=)")
        cv2.setNumThreads(1)  # one core per camera is plenty; inference gets the rest
        self.backend, self.manifest, self.model_id = load_model(self.cfg)
        from .publish import Publisher  # paho & co. only once we really run

        self.publisher = Publisher(self.cfg, self.cfg.state_dir, on_setting=self._on_setting)

    def start(self) -> None:
        cfg = self.cfg
        self.stats = Stats([c.id for c in cfg.cameras])
        self.ctx = zmq.Context()
        self.frames = LatestFrames({c.id: c.lossless for c in cfg.cameras}, self.ctx, self.endpoint).start()
        self.inference = InferenceWorker(self.backend, self.manifest, self.model_id, self.frames,
                                         self.publisher.publish_result, self.stats, cfg.cameras,
                                         cfg.model.batch_size, on_scored=self._on_scored)
        self.inference.start()
        self.publisher.start()  # settings may arrive from here on: the inference worker exists
        self.captures = {c.id: CaptureWorker(c, cfg.health, self.ctx, self.endpoint, self._on_status, c.lossless)
                         for c in cfg.cameras}
        for w in self.captures.values():
            w.start()
        for cam in cfg.cameras:
            self.publisher.set_state(cam.id, "threshold", self.inference.threshold(cam.id))
        log.info("haloae-edge %s: %d camera(s), %s, model %s", cfg.node, len(cfg.cameras),
                 self.backend.description, self.model_id)

    # -- callbacks (other threads) -----------------------------------------------------------
    def _on_status(self, status: CameraStatus) -> None:
        """From a capture thread: queue it; the main loop publishes it in order (see below)."""
        with self._status_lock:
            self._statuses.setdefault(status.camera, deque()).append(status)
        self._wake.set()

    def _flush_statuses(self, force: bool = False) -> None:
        """Publish queued camera statuses in order. ``offline``/``ended`` wait until the camera's
        last frames are scored, so they never overtake its results (the publisher ends a running
        alarm on them)."""
        with self._status_lock:
            for cam, queue in self._statuses.items():
                while queue and (force or queue[0].state in ("starting", "online") or not self.frames.busy(cam)):
                    status = queue.popleft()
                    status.dropped = self.frames.dropped(cam)
                    status.backend, status.model_id = self.backend.description, self.inference.model_id
                    self.publisher.publish_camera_status(status)

    def _on_scored(self) -> None:
        self.notifier.frame_scored(status=f"inspecting with {self.backend.description}")

    def _on_setting(self, camera: str | None, setting: str, value) -> None:
        """A validated ``<setting>/set`` (the publisher then publishes ``.../state``)."""
        if setting != "threshold":
            raise ValueError(f"setting {setting!r} is not handled by this daemon")
        self.inference.set_threshold(camera, value)

    def request_stop(self, *_) -> None:
        self._stop_requested = True
        self._wake.set()

    def request_reload(self, *_) -> None:
        self._reload_requested = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        signal.signal(signal.SIGHUP, self.request_reload)

    # -- supervision ---------------------------------------------------------------------------
    def run(self) -> int:
        """Start, supervise until stopped / done / fatal, stop; returns the exit code."""
        self.start()
        code, next_stats = EXIT_OK, time.monotonic() + self.cfg.publish.stats_interval_s
        try:
            while not self._stop_requested:
                self._wake.wait(TICK_S)
                self._wake.clear()
                now = time.monotonic()
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload()
                if self.inference.fatal:
                    log.error("stopping: %s", self.inference.fatal)
                    code = EXIT_FATAL
                    break
                for w in self.captures.values():
                    w.check_stale(now)
                self._flush_statuses()
                self._feed_idle_watchdog(now)
                if now >= next_stats:
                    next_stats = now + self.cfg.publish.stats_interval_s
                    self.publish_stats()
                if self.exit_when_done and self.done():
                    log.info("all finite sources are done and every frame was scored: exiting")
                    self._flush_statuses(force=True)
                    self.publish_stats()
                    self._drain_publisher(timeout=10.0)
                    break
        finally:
            self.stop()
        return code

    def done(self) -> bool:
        """No capture left running, every sent frame received, taken and scored."""
        if any(w.is_alive() for w in self.captures.values()):
            return False
        sent = sum(w.frames for w in self.captures.values())
        received = sum(self.frames.received(c) for c in self.captures)
        return received >= sent and self.frames.pending() == 0 and self.inference.processed >= self.frames.taken

    def _drain_publisher(self, timeout: float) -> None:
        """Let the publisher send what it queued (SIGTERM skips this: exit fast)."""
        if not self.publisher.flush(timeout):
            log.warning("results still queued after %.0f s: they are dropped at exit", timeout)

    def _feed_idle_watchdog(self, now: float) -> None:
        states = [w.state for w in self.captures.values()]
        if "online" not in states and now - self.inference.heartbeat < 2.0:
            self.notifier.idle_alive()

    def capture_stats(self) -> dict[str, dict]:
        return {cam: {"state": w.state, "frames": w.frames, "dropped": self.frames.dropped(cam),
                      "errors": w.errors, "queue_depth": self.frames.depth(cam)}
                for cam, w in self.captures.items()}

    def publish_stats(self) -> None:
        stats = self.stats.snapshot(self.capture_stats(), {
            "node": self.cfg.node, "backend": self.backend.description, "model_id": self.inference.model_id})
        self.publisher.publish_stats(stats)
        online = sum(w.state == "online" for w in self.captures.values())
        fps = sum(c["fps"] for c in stats["cameras"].values())
        self.notifier.status(f"{online}/{len(self.captures)} camera(s) online, {fps:.1f} frames/s, "
                             f"{self.backend.description}")

    def reload(self) -> bool:
        """SIGHUP: re-verify the bundle and swap in a new backend; keep the old one on failure."""
        log.info("reloading the bundle %s", self.cfg.model.bundle)
        self.notifier.reloading()
        try:
            backend, manifest, mid = load_model(self.cfg)
        except (BundleError, ConfigError, RuntimeError) as e:
            log.error("reload failed, still running model %s: %s", self.inference.model_id, e)
            self.notifier.reloaded(f"reload failed: {e}")
            return False
        self.backend = backend
        self.inference.set_backend(backend, manifest, mid)
        for cam in self.cfg.cameras:
            self.publisher.set_state(cam.id, "threshold", self.inference.threshold(cam.id))
        log.info("reloaded: model %s on %s", mid, backend.description)
        self.notifier.reloaded(f"model {mid} on {backend.description}")
        return True

    def stop(self) -> None:
        """Stop within ~3 s: capture, inference, then publish ``stopped`` and flush."""
        t0 = time.monotonic()
        self.notifier.stopping()
        for w in self.captures.values():
            w.stop()
        self.inference.stop()
        for w in self.captures.values():
            w.join(max(0.0, 0.5 - (time.monotonic() - t0)))
        self.inference.join(max(0.1, 1.0 - (time.monotonic() - t0)))
        self.frames.stop(0.2)
        self._flush_statuses(force=True)
        self.publisher.stop(timeout=max(0.5, 2.5 - (time.monotonic() - t0)))
        log.info("stopped in %.2f s", time.monotonic() - t0)
