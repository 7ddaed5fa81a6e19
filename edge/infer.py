"""The inference worker: newest frame of every camera → batch → backend → ``FrameResult``s.

One thread per GPU (one per daemon here). It takes up to ``batch`` waiting frames across cameras
(at most one per camera: the newest, see edge/ipc.py), preprocesses them with THE preprocessing
training uses (``haloae.preprocess.to_batch``: RGB, resize to the model's input size with
``cv2.INTER_AREA``, × 1/255, HWC → CHW float32, zero-padded up to the bundle's static batch
size), runs the backend (``haloae.runtime``) and hands one :class:`FrameResult` per frame to the sink
(``Publisher.publish_result``). A frame is anomalous when ``score >= threshold``; the threshold
is the runtime setting (MQTT ``threshold/set``), else the camera's ``threshold``, else the
bundle's (0.5 in normalised units). The defect mask is ``anomaly_map >= pixel threshold``. A
camera's ignore zones (haloae/zones.py) are applied to the map and the score first, so the
verdict, the alarm and the regions never see anomalies inside them.

A frame whose score or map is not finite (NaN / inf from a broken model or GPU) is not an
inspection: it is never published (least of all as ``ok``), it is counted per camera
(``invalid``, on status and stats) and logged; :data:`MAX_INVALID_IN_A_ROW` of them in a row
stop the daemon (exit 1), as a backend that keeps failing does.

The backend can be swapped while running (SIGHUP reload): everything that can fail (bundle
thresholds, the backend) is checked by the caller before :meth:`InferenceWorker.set_backend`;
the swap itself, between batches, only assigns. Any exception outside the per-batch handling
ends the thread with ``fatal`` set: the app then exits non-zero, never runs on without it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np

from haloae.errors import Failure
from haloae.manifest import Manifest
from haloae.preprocess import to_batch
from haloae.runtime import Backend
from .config import CameraConfig
from .frames import FrameResult
from .ipc import Frame, LatestFrames
from .stats import Stats
from haloae.zones import Reduction, ZoneSet, ZonesError, reduction_from_model_config

log = logging.getLogger(__name__)

MAX_FAILURES_IN_A_ROW = 10  # the backend keeps failing: give up, systemd restarts the daemon
MAX_INVALID_IN_A_ROW = 50  # frames with NaN / inf outputs in a row: the model is broken, give up


def bundle_thresholds(manifest: Manifest) -> tuple[float, float]:
    """``(image, pixel)`` thresholds of a manifest (normalised; checked by ``haloae.manifest``)."""
    return manifest.threshold.image, manifest.threshold.pixel


def camera_zones(cameras: list[CameraConfig]) -> dict[str, ZoneSet]:
    """The ignore zones of the cameras that have some."""
    return {c.id: ZoneSet(c.ignore_zones, f"camera {c.id}: ignore zones") for c in cameras if c.ignore_zones}


def check_zones(cameras: list[CameraConfig], manifest: Manifest) -> Reduction | None:
    """The bundle's score reduction when some camera has ignore zones (None otherwise); ZonesError
    when the bundle's score cannot be rescored or a camera's zones leave no pixel of the map."""
    zones = camera_zones(cameras)
    if not zones:
        return None
    reduction = reduction_from_model_config(manifest.model_config, manifest.threshold.calibration)
    _, _, mh, mw = manifest.input.shape
    for cam, zs in zones.items():
        w, h = zs.zones.size
        zs.check_map(w, h, mw, mh)
    if not reduction.exact:
        log.info("ignore zones of %s: this model publishes a fused map (map.fine_weight / coarse_weight), so a zone "
                 "rescales the score by the published map's kept / whole %s ratio, not exactly "
                 "(docs/operations.md, Ignore zones)", ", ".join(sorted(zones)), reduction.kind)
    return reduction


class _Broken(Failure, RuntimeError):
    """The model cannot inspect at all (not one failure: a lasting state): stop the daemon."""


class InferenceWorker(threading.Thread):
    """Scores frames until stopped; ``fatal`` is set when the backend keeps failing."""

    def __init__(self, backend: Backend, manifest: Manifest, model_id: str, frames: LatestFrames,
                 sink: Callable[[FrameResult], None], stats: Stats, cameras: list[CameraConfig],
                 batch_size: int = 1, on_scored: Callable[[], None] | None = None):
        super().__init__(name="inference", daemon=True)
        self.frames, self.sink, self.stats, self.on_scored = frames, sink, stats, on_scored
        self.batch_size = batch_size
        self._cam_threshold = {c.id: c.threshold for c in cameras}
        self._runtime_threshold: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop_evt = threading.Event()
        self.fatal: str | None = None
        self.processed = 0  # frames scored or failed
        self.inspected = 0  # frames with a finite score, handed to the sink
        self.invalid: dict[str, int] = {c.id: 0 for c in cameras}  # frames with NaN / inf outputs
        self._invalid_run = 0
        self.heartbeat = time.monotonic()  # last time the loop turned (watchdog when idle)
        self._pending: tuple | None = None
        self._zones = camera_zones(cameras)
        self._apply(backend, manifest, model_id, *bundle_thresholds(manifest))

    # -- settings ---------------------------------------------------------------------------
    def set_backend(self, backend: Backend, manifest: Manifest, model_id: str) -> None:
        """Use ``backend`` from the next batch on; the worker closes the previous one."""
        thresholds = bundle_thresholds(manifest)
        with self._lock:
            self._pending = (backend, manifest, model_id, *thresholds)

    def set_camera_thresholds(self, thresholds: dict[str, float | None]) -> None:
        """New per-camera config thresholds (SIGHUP with an edited YAML)."""
        with self._lock:
            self._cam_threshold.update(thresholds)

    def set_zones(self, cameras: list[CameraConfig]) -> None:
        """New ignore zones (SIGHUP with an edited YAML; checked by the caller with check_zones)."""
        zones = camera_zones(cameras)
        with self._lock:
            self._zones = zones

    def _apply(self, backend: Backend, manifest: Manifest, model_id: str, image: float, pixel: float) -> None:
        n = backend.input_shape[0]
        if self.batch_size > n:
            log.warning("model.batch_size %d > the bundle's batch %d: batching %d frames", self.batch_size, n, n)
        elif self.batch_size < n:
            log.warning("the bundle's static batch is %d but model.batch_size is %d: each call is padded "
                        "to %d frames; export with --batch %d or raise model.batch_size", n, self.batch_size, n,
                        self.batch_size)
        try:
            reduction = reduction_from_model_config(manifest.model_config, manifest.threshold.calibration)
        except ZonesError:
            reduction = None  # check_zones refused it already when a camera has zones
        with self._lock:
            self.backend, self.manifest, self.model_id = backend, manifest, model_id
            self.bundle_threshold, self.pixel_threshold = image, pixel
            self.reduction = reduction

    def set_threshold(self, camera: str | None, value: float | None) -> None:
        """Runtime image threshold of one camera (``None`` camera: all); ``None`` value resets."""
        with self._lock:
            for cam in ([camera] if camera else list(self._cam_threshold)):
                if value is None:
                    self._runtime_threshold.pop(cam, None)
                else:
                    self._runtime_threshold[cam] = float(value)

    def threshold(self, camera: str) -> float:
        with self._lock:
            for value in (self._runtime_threshold.get(camera), self._cam_threshold.get(camera)):
                if value is not None:
                    return value
            return self.bundle_threshold

    def stop(self) -> None:
        self._stop_evt.set()

    def _swap_backend(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is not None:
            old = self.backend
            self._apply(*pending)
            if old is not pending[0]:
                try:
                    old.close()
                except Exception:  # noqa: BLE001 - the new backend runs; a leak is the lesser evil
                    log.exception("closing the previous %s backend failed", old.name)

    # -- loop -------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a bug: never a live daemon with dead inspection
            log.exception("the inference thread crashed")
            self.fatal = f"the inference thread crashed: {type(exc).__name__}: {exc}"

    def _loop(self) -> None:
        failures = 0
        while not self._stop_evt.is_set():
            self.heartbeat = time.monotonic()
            self._swap_backend()
            frames = self.frames.take(min(self.batch_size, self.backend.input_shape[0]), timeout=0.2)
            if not frames:
                continue
            self._swap_backend()  # a reload may have landed while waiting
            backend = self.backend
            frames, extra = frames[:backend.input_shape[0]], frames[backend.input_shape[0]:]
            if extra:  # the new bundle has a smaller batch: score the rest next round
                self.frames.put_back(extra)
            try:
                self._score(backend, frames)
                failures = 0
            except _Broken as exc:
                self.fatal = str(exc)
                return
            except Exception as exc:  # noqa: BLE001 - count, log, retry; give up after a long run
                failures += 1
                self.stats.record_error()
                log.error("inference failed on %d frame(s) (%d in a row): %s", len(frames), failures, exc,
                          exc_info=failures == 1)
                if failures >= MAX_FAILURES_IN_A_ROW:
                    self.fatal = f"the {backend.name} backend failed {failures} times in a row: {exc}"
                    return
                self._stop_evt.wait(min(0.05 * failures, 0.5))
            finally:
                self.processed += len(frames)
                self.frames.release(frames)

    def _score(self, backend: Backend, frames: list[Frame]) -> None:
        picked = time.monotonic()
        n, _, h, w = backend.input_shape
        batch = to_batch([f.image for f in frames], backend.input_shape)  # n, 3, h, w
        t0 = time.perf_counter()
        scores, maps = backend.run(batch)
        infer_ms = (time.perf_counter() - t0) * 1000.0
        if np.shape(scores) != (n,) or np.shape(maps) != (n, 1, h, w):
            raise RuntimeError(f"the {backend.name} backend returned score {list(np.shape(scores))} and map "
                               f"{list(np.shape(maps))}, the bundle says [{n}] and [{n}, 1, {h}, {w}]")
        self.stats.record_batch(len(frames), infer_ms)
        with self._lock:
            mid, pix, zones, reduction = self.model_id, self.pixel_threshold, self._zones, self.reduction
        valid = 0
        for i, f in enumerate(frames):
            thr = self.threshold(f.camera)
            score = float(scores[i])
            if not (np.isfinite(score) and np.isfinite(maps[i]).all()):
                self._count_invalid(f, score, mid)
                continue
            valid += 1
            self._invalid_run = 0
            amap, zs = maps[i, 0], zones.get(f.camera)
            if zs is not None and reduction is not None:  # before the verdict and the regions
                score, amap = zs.apply(score, amap, (f.image.shape[1], f.image.shape[0]), reduction)
            latency = {"capture": round(f.capture_ms, 2),
                       "queue": round(max(picked - f.sent_mono, 0.0) * 1000.0, 2),
                       "inference": round(infer_ms, 2),
                       "total": round((time.time() - f.timestamp) * 1000.0, 2)}
            result = FrameResult(camera=f.camera, frame_id=f.frame_id, timestamp=f.timestamp, score=score,
                                 threshold=thr, pixel_threshold=pix, anomalous=bool(score >= thr),
                                 anomaly_map=amap, frame=f.image, latency_ms=latency, model_id=mid, zones=zs)
            self.stats.record(f.camera, latency, result.anomalous, score)
            self.inspected += 1
            try:
                self.sink(result)
            except Exception:  # noqa: BLE001 - a publishing bug must not stop inspection
                log.exception("publishing the result of %s frame %d failed", f.camera, f.frame_id)
        if valid and self.on_scored is not None:
            self.on_scored()

    def _count_invalid(self, f: Frame, score: float, mid: str) -> None:
        """A frame the model gave a NaN / inf output for: counted and logged, never published."""
        self.invalid[f.camera] = self.invalid.get(f.camera, 0) + 1
        self.stats.record_invalid(f.camera)
        self._invalid_run += 1
        n = sum(self.invalid.values())
        if n in (1, 10, 100) or n % 1000 == 0:
            log.error("model %s output NaN/inf for %s frame %d (score %s): not published; %d such frame(s) so far "
                      "(check the bundle with haloae-export --verify; a GPU fault?)", mid, f.camera, f.frame_id,
                      score, n)
        if self._invalid_run >= MAX_INVALID_IN_A_ROW:
            raise _Broken(f"model {mid} output NaN/inf for {self._invalid_run} frames in a row: inspection is not "
                          "possible; re-export the bundle (haloae-export) or check the GPU")
