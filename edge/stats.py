"""Pipeline statistics: per-camera fps, frame / drop / error counts, latency percentiles.

The inference worker records every scored frame (:meth:`Stats.record`); the app adds the
capture-side counters at :meth:`Stats.snapshot` time and hands the dict to
``Publisher.publish_stats`` every ``publish.stats_interval_s``. Latency percentiles are taken
over a rolling window of the last ``window`` frames per camera, fps over the last ``fps_window_s``
seconds. Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np

LATENCY_KEYS = ("capture", "queue", "inference", "total")


def percentiles(values, qs=(50, 99)) -> dict[str, float | None]:
    """``{"p50": ..., "p99": ...}`` of ``values`` (None when empty), rounded to 0.01."""
    if len(values) == 0:
        return {f"p{q}": None for q in qs}
    arr = np.percentile(np.asarray(values, dtype=np.float64), qs)
    return {f"p{q}": round(float(v), 2) for q, v in zip(qs, arr)}


class _CameraStats:
    def __init__(self, window: int):
        self.inspected = 0
        self.anomalous = 0
        self.invalid = 0  # frames with NaN / inf model outputs (not inspected)
        self.times: deque[float] = deque(maxlen=4096)  # monotonic times of scored frames
        self.scores: deque[float] = deque(maxlen=window)  # last scores (quantiles for /metrics)
        self.score_sum = 0.0
        self.latency = {k: deque(maxlen=window) for k in LATENCY_KEYS}


class Stats:
    """Counters and rolling windows of the daemon; ``snapshot()`` builds the stats message."""

    def __init__(self, cameras: list[str], window: int = 1000, fps_window_s: float = 10.0):
        self.window, self.fps_window_s = window, fps_window_s
        self.started = time.monotonic()
        self._cams = {c: _CameraStats(window) for c in cameras}
        self._lock = threading.Lock()
        self.batches = 0
        self.batch_frames = 0
        self.inference_errors = 0
        self.invalid = 0
        self._infer_ms: deque[float] = deque(maxlen=window)

    def record(self, camera: str, latency_ms: dict, anomalous: bool, score: float | None = None) -> None:
        """One scored frame of ``camera``."""
        with self._lock:
            c = self._cams[camera]
            c.inspected += 1
            if score is not None:
                c.scores.append(score)
                c.score_sum += score
            c.anomalous += int(anomalous)
            c.times.append(time.monotonic())
            for k in LATENCY_KEYS:
                if latency_ms.get(k) is not None:
                    c.latency[k].append(latency_ms[k])

    def record_batch(self, n_frames: int, inference_ms: float) -> None:
        with self._lock:
            self.batches += 1
            self.batch_frames += n_frames
            self._infer_ms.append(inference_ms)

    def record_invalid(self, camera: str) -> None:
        """One frame of ``camera`` whose model outputs were NaN / inf (not published)."""
        with self._lock:
            self._cams[camera].invalid += 1
            self.invalid += 1

    def record_error(self) -> None:
        with self._lock:
            self.inference_errors += 1

    def scores(self, camera: str) -> tuple[list[float], float, int]:
        """(the last ``window`` scores, the sum and the count of all scores) of ``camera``."""
        with self._lock:
            c = self._cams[camera]
            return list(c.scores), c.score_sum, c.inspected

    def counts(self, camera: str) -> dict[str, int]:
        with self._lock:
            c = self._cams[camera]
            return {"inspected": c.inspected, "anomalous": c.anomalous, "invalid": c.invalid}

    def inspected(self, camera: str) -> int:
        with self._lock:
            return self._cams[camera].inspected

    def fps(self, camera: str, now: float | None = None) -> float:
        """Scored frames per second over the last ``fps_window_s`` (or since start)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            times = self._cams[camera].times
            span = min(self.fps_window_s, now - self.started)
            n = sum(1 for t in times if t >= now - span)
        return round(n / span, 2) if span > 0 else 0.0

    def snapshot(self, capture: dict[str, dict] | None = None, extra: dict | None = None) -> dict:
        """The stats dict: ``capture`` maps camera -> its capture-side fields (state, frames,
        dropped, errors, queue_depth), merged into that camera's entry; ``extra`` goes on top."""
        now = time.monotonic()
        cams = {}
        for cam in self._cams:
            fps = self.fps(cam, now)
            with self._lock:
                c = self._cams[cam]
                entry = {"fps": fps, "inspected": c.inspected, "anomalous": c.anomalous, "invalid": c.invalid,
                         "latency_ms": {k: percentiles(list(v)) for k, v in c.latency.items()}}
            entry.update((capture or {}).get(cam, {}))
            cams[cam] = entry
        with self._lock:
            out = {"uptime_s": round(now - self.started, 1), "cameras": cams,
                   "inference": {"batches": self.batches, "frames": self.batch_frames,
                                 "errors": self.inference_errors, "invalid": self.invalid,
                                 "mean_batch": round(self.batch_frames / self.batches, 2) if self.batches else 0.0,
                                 "latency_ms": percentiles(list(self._infer_ms))}}
        out.update(extra or {})
        return out
