"""The orchestrator: capture workers → latest-frame hand-off → inference worker → publisher.

:meth:`EdgeApp.prepare` does everything that can fail because of the user's input (camera
sources, state folder, bundle verification, backend) before anything starts, raising a
`haloae.errors.UserError` (``ConfigError``, ``BundleError``, ``BackendUnavailable``: the CLI prints
one line, exit 2).
:meth:`EdgeApp.run` then supervises from the main thread: stats every
``publish.stats_interval_s``, stale cameras, the systemd watchdog when no camera can deliver,
SIGHUP (re-read the YAML, re-verify and reload the bundle with a new backend; MQTT stays
connected; on any failure the old model and config keep running and the failure is reported)
and SIGTERM/SIGINT (stop capture, publish ``stopped``, flush, return within 3 s).

Never a live process with dead inspection: every worker thread is watched. A capture thread
that dies is restarted in place (the other cameras run on); the inference, publisher, alarm
sender or frame collector thread dying, a model that only outputs NaN, or a backend that
keeps failing end :meth:`EdgeApp.run` with exit code 1 (systemd restarts the daemon).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections import deque
from pathlib import Path

import cv2
import zmq

from haloae.errors import EXIT_FAILED, EXIT_OK, UserError

from haloae.runtime import Backend
from .capture import CaptureWorker, check_source
from .config import EXIT_CONFIG, ConfigError, EdgeConfig, load_config
from .frames import CameraStatus
from .infer import InferenceWorker
from .ipc import DEFAULT_ENDPOINT, LatestFrames
from .reload import config_changes, load_model
from .stats import Stats
from .watchdog import Notifier

log = logging.getLogger(__name__)

EXIT_FATAL = EXIT_FAILED  # a dead worker or a broken model at run time: systemd restarts it
TICK_S = 0.2
MAX_CAPTURE_RESTARTS = 5  # a capture thread that keeps dying: give up (exit 1)


class EdgeApp:
    """One daemon. ``prepare()`` (may raise user errors), then ``run()`` -> exit code."""

    def __init__(self, cfg: EdgeConfig, exit_when_done: bool = False, notifier: Notifier | None = None,
                 endpoint: str = DEFAULT_ENDPOINT, config_path: Path | None = None):
        self.cfg, self.exit_when_done, self.endpoint = cfg, exit_when_done, endpoint
        self.config_path = config_path  # re-read on SIGHUP (None: reload the bundle only)
        self._published_counts: dict[str, tuple[int, int]] = {}
        self._capture_restarts = 0
        self.notifier = notifier or Notifier()
        self._wake = threading.Event()
        self._stop_requested = self._reload_requested = False
        self.backend: Backend | None = None
        self._statuses: dict[str, deque[CameraStatus]] = {}
        self._status_lock = threading.Lock()

    # -- setup ------------------------------------------------------------------------------
    def prepare(self, serve: bool = True) -> None:
        """Check sources, state folder and bundle; load the backend; bind the HTTP server unless
        ``serve`` is False (``--validate-config`` beside a running daemon that holds the port).
        Raises user errors."""
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
        model = load_model(self.cfg)
        self.backend, self.manifest, self.model_id = model.backend, model.manifest, model.model_id
        from .publish import Publisher  # paho & co. only once we really run

        self.publisher = Publisher(self.cfg, self.cfg.state_dir, on_setting=self._on_setting,
                                   on_command=self._on_command)
        from .model_swap import ModelSwitch

        self.models = ModelSwitch(self)
        from .feedback import FeedbackDesk

        self.feedback = FeedbackDesk(self)
        from .recalibrate import Recalibrator

        self.recalibrator = Recalibrator(self)
        from .surface import Surface  # drift; live view / metrics only when configured

        self.surface = Surface(self, bind=serve)

    def start(self) -> None:
        cfg = self.cfg
        self.stats = Stats([c.id for c in cfg.cameras])
        self.ctx = zmq.Context()
        self.frames = LatestFrames({c.id: c.lossless for c in cfg.cameras}, self.ctx, self.endpoint).start()
        self.inference = InferenceWorker(self.backend, self.manifest, self.model_id, self.frames,
                                         self._on_result, self.stats, cfg.cameras,
                                         cfg.model.batch_size, on_scored=self._on_scored)
        self.inference.start()
        self.publisher.start()  # settings may arrive from here on: the inference worker exists
        self.captures = {c.id: self._capture(c) for c in cfg.cameras}
        for w in self.captures.values():
            w.start()
        for cam in cfg.cameras:
            self.publisher.set_state(cam.id, "threshold", self.inference.threshold(cam.id))
        self.models.publish("ok", reason="start")
        self.surface.start()
        log.info("haloae-edge %s: %d camera(s), %s, model %s", cfg.node, len(cfg.cameras),
                 self.backend.description, self.model_id)

    def _capture(self, cam) -> CaptureWorker:
        return CaptureWorker(cam, self.cfg.health, self.ctx, self.endpoint, self._on_status, cam.lossless)

    # -- callbacks (other threads) -----------------------------------------------------------
    def _on_result(self, r) -> None:
        """From the inference thread: every inspected frame."""
        self.publisher.publish_result(r)
        self.recalibrator.observe(r, self.publisher.alarms.active(r.camera))
        self.surface.observe(r)

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
                    self._publish_status(queue.popleft())

    def _publish_status(self, status: CameraStatus) -> None:
        status.dropped = self.frames.dropped(status.camera)
        status.invalid = self.inference.invalid.get(status.camera, 0)
        status.backend, status.model_id = self.backend.description, self.inference.model_id
        self._published_counts[status.camera] = (status.errors, status.invalid)
        self.publisher.publish_camera_status(status)

    def _refresh_counts(self) -> None:
        """Publish a camera's status again when its unusable / NaN frame counts changed (same state)."""
        with self._status_lock:
            for cam, w in self.captures.items():
                counts = (w.errors, self.inference.invalid.get(cam, 0))
                if not self._statuses.get(cam) and counts != self._published_counts.get(cam, (0, 0)):
                    status = w.status()
                    if counts[1]:
                        status.detail = (f"{status.detail}; " if status.detail else "") + \
                            f"{counts[1]} frame(s) with NaN/inf model outputs, not published"
                    self._publish_status(status)

    def _on_scored(self) -> None:
        self.notifier.frame_scored(status=f"inspecting with {self.backend.description}")

    def _on_setting(self, camera: str | None, setting: str, value) -> None:
        """A validated ``<setting>/set`` (the publisher then publishes ``.../state``)."""
        if setting != "threshold":
            raise ValueError(f"setting {setting!r} is not handled by this daemon")
        self.inference.set_threshold(camera, value)

    def _on_command(self, camera: str | None, name: str, payload: bytes) -> None:
        """A command topic (publisher thread): check the payload (CommandError refuses it) and
        queue the work for the main thread."""
        from .commands import parse_calibrate, parse_feedback, parse_model_set

        if name == "model":
            self.models.request(parse_model_set(payload))
        elif name == "feedback" and camera is not None:
            self.feedback.request(camera, parse_feedback(payload))
        elif name == "calibrate" and camera is not None:
            self.recalibrator.request(camera, parse_calibrate(payload))
        else:
            raise ValueError(f"command {name!r} is not handled by this daemon")

    def wake(self) -> None:
        self._wake.set()

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
                self.models.poll()
                self.feedback.poll()
                self.recalibrator.poll()
                dead = self._dead_worker()
                if dead:
                    log.error("stopping: %s", dead)
                    self.notifier.status(f"stopping: {dead}")
                    code = EXIT_FATAL
                    break
                for w in self.captures.values():
                    w.check_stale(now)
                self._flush_statuses()
                self._feed_idle_watchdog(now)
                if now >= next_stats:
                    next_stats = now + self.cfg.publish.stats_interval_s
                    self._refresh_counts()
                    self.publish_stats()
                if self.exit_when_done and self.done():
                    code = self._finish()
                    break
        finally:
            self.stop()
        return code

    def _finish(self) -> int:
        """``--exit-when-done``: publish the last statuses and stats; non-zero when nothing was inspected."""
        self._flush_statuses(force=True)
        self._refresh_counts()
        self.publish_stats()
        self._drain_publisher(timeout=10.0)
        if self.inference.inspected:
            log.info("all finite sources are done and every frame was scored: exiting (%d frame(s) inspected)",
                     self.inference.inspected)
            return EXIT_OK
        why = "; ".join(f"camera {cam}: {w.frames} frame(s) delivered, {w.errors} unusable"
                        f"{f' (last: {w.last_error})' if w.last_error else ''}, "
                        f"{self.inference.invalid.get(cam, 0)} with NaN/inf model outputs"
                        for cam, w in self.captures.items())
        log.error("nothing was inspected: %s; check the sources (frame format, size, roi) and the bundle", why)
        return EXIT_CONFIG

    def _dead_worker(self) -> str | None:
        """Why inspection cannot go on (a dead thread, a broken model), else None. A dead
        capture thread is restarted in place instead (up to MAX_CAPTURE_RESTARTS times)."""
        if self.inference.fatal:
            return self.inference.fatal
        if not self.inference.is_alive():
            return "the inference thread ended unexpectedly"
        if not self.frames.is_alive():
            return "the frame collector thread died"
        for name, alive in {**self.publisher.threads_alive(), **self.surface.threads_alive()}.items():
            if not alive:
                return f"the {name} thread died"
        for cam, w in list(self.captures.items()):
            if w.is_alive() or w.state == "ended":
                continue
            self._capture_restarts += 1
            if self._capture_restarts > MAX_CAPTURE_RESTARTS:
                return f"the capture thread of camera {cam} died {self._capture_restarts} times"
            log.error("the capture thread of camera %s died (state %s): restarting it (%d of %d)", cam, w.state,
                      self._capture_restarts, MAX_CAPTURE_RESTARTS)
            self.captures[cam] = self._capture(w.cam)
            self.captures[cam].start()
        return None

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
                      "errors": w.errors, "queue_depth": self.frames.depth(cam),
                      "drift": self.surface.drift.snapshot(cam)}
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
        """SIGHUP: re-read the YAML, verify and load the bundle, then swap; on any failure the
        running model and config stay, and the failure is reported (journal, STATUS=, MQTT)."""
        old_id = self.inference.model_id
        log.info("reloading %s and the bundle %s", self.config_path or "(no config file)", self.cfg.model.bundle)
        self.notifier.reloading()
        try:
            cfg = load_config(self.config_path) if self.config_path else self.cfg
            live, restart = config_changes(self.cfg, cfg)
            model = load_model(cfg)
            self.swap_model(model, cfg.model)
        except (UserError, OSError) as e:  # bad config / bundle / backend: the running model stays
            return self._reload_failed(old_id, str(e))
        except Exception as e:  # noqa: BLE001 - a bug in loading: keep the running model, show the traceback
            log.exception("reload failed")
            return self._reload_failed(old_id, f"{type(e).__name__}: {e}")
        if restart:
            log.warning("reload: %s changed in %s; these take effect after a restart (systemctl restart), the "
                        "running values stay", ", ".join(restart), self.config_path)
        if live:
            log.info("reload: applying %s", ", ".join(live))
        if [c.id for c in cfg.cameras] == [c.id for c in self.cfg.cameras]:
            for old, new in zip(self.cfg.cameras, cfg.cameras):
                old.threshold = new.threshold
            self.inference.set_camera_thresholds({c.id: c.threshold for c in cfg.cameras})
            for old, new in zip(self.cfg.cameras, cfg.cameras):
                old.ignore_zones = new.ignore_zones
            self.inference.set_zones(self.cfg.cameras)
        for cam in self.cfg.cameras:
            self.publisher.set_state(cam.id, "threshold", self.inference.threshold(cam.id))
        self.models.publish("ok", reason="reload")
        log.info("reloaded: model %s on %s", model.model_id, model.backend.description)
        self.notifier.reloaded(f"model {model.model_id} on {model.backend.description}")
        return True

    def swap_model(self, model, model_cfg) -> None:
        """Hand a verified, loaded model to the inference worker (from its next batch on) and
        make it the daemon's model; SIGHUP and ``model/set`` both end here. Raises BundleError
        (bad manifest thresholds) before anything changes."""
        self.inference.set_backend(model.backend, model.manifest, model.model_id)
        self.cfg.model = model_cfg
        self.inference.batch_size = model_cfg.batch_size
        self.backend, self.manifest, self.model_id = model.backend, model.manifest, model.model_id
        self.surface.drift.set_manifest(model.manifest)
        for cam in self.cfg.cameras:
            self.publisher.set_state(cam.id, "threshold", self.inference.threshold(cam.id))

    def _reload_failed(self, model_id: str, why: str) -> bool:
        text = f"reload failed, still running model {model_id}: {' '.join(why.split())}"
        log.error("%s", text)
        self.notifier.reloaded(text)
        self.publisher.publish_error("reload", text)
        return False

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
        self.surface.stop()
        self._flush_statuses(force=True)
        self.publisher.stop(timeout=max(0.5, 2.5 - (time.monotonic() - t0)))
        log.info("stopped in %.2f s", time.monotonic() - t0)
