"""Score drift: is the line still the line the model was calibrated on?

For each camera, the scores of the frames judged ``ok`` go into a rolling window of
``drift.window`` frames. Every :data:`CHECK_EVERY` such frames (once ``drift.min_frames`` are
in) its median is compared with the calibration median the bundle carries
(``threshold.normal_scores.p50``, raw units, normalised here as ``0.5 * p50 / raw_image``: the
median score of the held-out normal images). A ratio above ``drift.factor`` or below
``1 / drift.factor`` is drift: lighting changed, the lens is dirty, a new material or a new
camera position. It is reported once per change of state (journal, retained
``<prefix>/<camera>/drift``), and is always in ``stats`` and ``/metrics``. Hysteresis: drift
ends when the ratio is back within ``factor ** 0.8``.

Frames judged ``defect`` are left out (a defective run is not drift), so a change that lifts
every score above the threshold shows as alarms, not as drift. Cheap: a deque append per frame
and a median of ``window`` numbers every :data:`CHECK_EVERY` normal frames.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import deque

import numpy as np

from haloae.manifest import THRESHOLD_TARGET, Manifest

from .config_surface import DriftConfig

log = logging.getLogger(__name__)

CHECK_EVERY = 10  # normal frames between two judgements
CLEAR_POWER = 0.8  # drift ends within factor ** CLEAR_POWER


def baseline_median(manifest: Manifest) -> float | None:
    """The calibration median in normalised units, or None when the bundle has no statistics."""
    p50, raw = manifest.threshold.normal_scores.get("p50"), manifest.threshold.raw_image
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (p50, raw)):
        return None
    if raw <= 0 or p50 <= 0:
        return None
    return THRESHOLD_TARGET * float(p50) / float(raw)


class _Camera:
    def __init__(self, window: int):
        self.scores: deque[float] = deque(maxlen=window)
        self.since_check = 0
        self.state = "warming_up"
        self.median: float | None = None
        self.p90: float | None = None
        self.ratio: float | None = None


class DriftMonitor:
    """Rolling medians per camera against one baseline. Thread-safe."""

    def __init__(self, cfg: DriftConfig, manifest: Manifest, cameras: list[str]):
        self.cfg = cfg
        self._cameras = list(cameras)
        self._lock = threading.Lock()
        self.set_manifest(manifest)

    def set_manifest(self, manifest: Manifest) -> None:
        """A new bundle (reload): new baseline, windows start afresh."""
        baseline = baseline_median(manifest) if self.cfg.enabled else None
        with self._lock:
            self.baseline = baseline
            self._cams = {c: _Camera(self.cfg.window) for c in self._cameras}
        if self.cfg.enabled and baseline is None:
            log.warning("score drift is not watched: the bundle carries no calibration statistics "
                        "(threshold.normal_scores.p50, threshold.raw_image); re-export it with haloae-export")

    @property
    def active(self) -> bool:
        return self.baseline is not None

    def observe(self, camera: str, score: float, anomalous: bool) -> dict | None:
        """One inspected frame; the new drift document when the camera's state changed, else None."""
        if self.baseline is None or anomalous:
            return None
        with self._lock:
            c = self._cams[camera]
            c.scores.append(float(score))
            c.since_check += 1
            if len(c.scores) < self.cfg.min_frames or c.since_check < CHECK_EVERY:
                return None
            c.since_check = 0
            med, p90 = np.percentile(np.fromiter(c.scores, np.float64, len(c.scores)), (50, 90))
            c.median, c.p90, c.ratio = float(med), float(p90), float(med) / self.baseline
            state = self._judge(c)
            if state == c.state:
                return None
            c.state = state
            doc = self._doc(c)
        self._log(camera, doc)
        return doc

    def _judge(self, c: _Camera) -> str:
        limit = self.cfg.factor if c.state != "drift" else self.cfg.factor ** CLEAR_POWER
        if c.ratio > limit or c.ratio < 1.0 / limit:
            return "drift"
        return "ok"

    def _doc(self, c: _Camera) -> dict:
        direction = None
        if c.state == "drift":
            direction = "up" if c.ratio > 1 else "down"
        rnd = (lambda v: None if v is None else round(v, 4))  # noqa: E731
        return {"state": c.state, "direction": direction, "median": rnd(c.median), "p90": rnd(c.p90),
                "baseline_median": rnd(self.baseline), "ratio": rnd(c.ratio), "factor": self.cfg.factor,
                "frames": len(c.scores)}

    def snapshot(self, camera: str) -> dict:
        """The camera's drift fields for stats and metrics (``state`` ``off`` without a baseline)."""
        if self.baseline is None:
            return {"state": "off"}
        with self._lock:
            return self._doc(self._cams[camera])

    def _log(self, camera: str, doc: dict) -> None:
        if doc["state"] == "drift":
            log.warning("camera %s: score drift: the median score of normal frames is %.3f, %.2f x the calibration "
                        "median %.3f (beyond the factor %g, %s): lighting changed, a dirty lens, a new material or "
                        "camera position? check the camera; retrain or recalibrate if the change is meant to stay",
                        camera, doc["median"], doc["ratio"], doc["baseline_median"], doc["factor"], doc["direction"])
        else:
            log.info("camera %s: no score drift: median of normal frames %.3f, %.2f x the calibration median %.3f",
                     camera, doc["median"], doc["ratio"], doc["baseline_median"])
