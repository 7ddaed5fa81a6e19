"""``<prefix>/<camera>/calibrate/set``: a new threshold from the frames the line judged normal.

The daemon keeps the scores of the last frames of each camera that were outside an alarm
(at most :data:`CAPACITY` per camera, in memory; single frames above the threshold that raised
no alarm are included: they are the false positives a threshold must count). A request

    {"hours": 8, "false_positive_rate": 0.01}

PROPOSES the ``1 - false_positive_rate`` quantile of the last ``hours`` of those scores as the
camera's threshold, and publishes on the retained ``<prefix>/<camera>/calibrate/state`` what it
would do BEFORE anything changes: the proposed and current thresholds, how many frames it is
based on, the false-positive rate of the current threshold on them, and an out-of-sample
estimate for the proposed one (fitted on the older half of the window, measured on the newer
half: what the next hours will look like if the line stays as it was). ``{"confirm": "<id>"}``
applies it through the ``threshold/set`` path (same checks, ``threshold/state``);
``{"cancel": true}`` drops it; a proposal expires after :data:`PROPOSAL_TTL_S`. Like
``threshold/set`` the value lives in memory until a restart.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np

from . import topics
from .alarms import SCHEMA_VERSION, iso_utc
from .payloads import dumps

if TYPE_CHECKING:
    from .app import EdgeApp

log = logging.getLogger(__name__)

CAPACITY = 500_000  # scores kept per camera (about 9 h at 15 frames/s)
PROPOSAL_TTL_S = 600.0
MIN_FRAMES = 100


class ScoreHistory:
    """Per camera, a ring of (epoch, score) of frames outside alarms (inference thread: cheap)."""

    def __init__(self, cameras: list[str], capacity: int = CAPACITY):
        self._t = {c: np.zeros(capacity, np.float64) for c in cameras}
        self._s = {c: np.zeros(capacity, np.float32) for c in cameras}
        self._n = {c: 0 for c in cameras}
        self.capacity = capacity
        self._lock = threading.Lock()

    def add(self, camera: str, epoch: float, score: float) -> None:
        with self._lock:
            i = self._n[camera] % self.capacity
            self._t[camera][i], self._s[camera][i] = epoch, score
            self._n[camera] += 1

    def since(self, camera: str, epoch: float) -> tuple[np.ndarray, np.ndarray]:
        """(times, scores) after ``epoch``, oldest first."""
        with self._lock:
            n = min(self._n[camera], self.capacity)
            start = self._n[camera] % self.capacity if self._n[camera] > self.capacity else 0
            order = (np.arange(n) + start) % self.capacity
            t, s = self._t[camera][order], self._s[camera][order]
        keep = t >= epoch
        return t[keep], s[keep]


def propose(times: np.ndarray, scores: np.ndarray, fpr: float, current: float) -> dict[str, Any]:
    """The threshold for ``fpr`` on ``scores`` and what it would do (see the module doc)."""
    need = max(MIN_FRAMES, math.ceil(5.0 / fpr))
    if scores.size < need:
        raise ValueError(f"only {scores.size} normal frame(s) in the window; a false-positive rate of {fpr} needs "
                         f"at least {need}: ask for more hours or a larger false_positive_rate")
    q = 1.0 - fpr
    thr = float(np.quantile(scores, q, method="higher"))
    if not 0.0 < thr <= 10.0:
        raise ValueError(f"the proposed threshold {thr:.4g} is outside (0, 10]: the scores of this window are not "
                         "usable (check the camera and the model)")
    half = scores.size // 2
    older, newer = scores[:half], scores[half:]
    thr_older = float(np.quantile(older, q, method="higher"))
    span_h = max(float(times[-1] - times[0]) / 3600.0, 1e-9)
    held_out = float(np.mean(newer >= thr_older))
    return {"threshold": round(thr, 4), "current_threshold": current, "frames": int(scores.size),
            "hours_covered": round(span_h, 3), "false_positive_rate": fpr,
            "current_false_positive_rate": round(float(np.mean(scores >= current)), 5),
            "proposed_false_positive_rate": round(float(np.mean(scores >= round(thr, 4))), 5),
            "held_out_false_positive_rate": round(held_out, 5),
            "false_positive_frames_per_hour": round(held_out * scores.size / span_h, 1),
            "score_median": round(float(np.median(scores)), 4)}


class Recalibrator:
    """Collects normal scores; queues and carries out ``calibrate/set`` requests (main thread)."""

    def __init__(self, app: "EdgeApp"):
        self.app = app
        self.history = ScoreHistory([c.id for c in app.cfg.cameras])
        self._requests: list[tuple[str, dict]] = []
        self._proposals: dict[str, dict] = {}

    def observe(self, r, in_alarm: bool) -> None:
        if not in_alarm:
            self.history.add(r.camera, r.timestamp, float(r.score))

    def request(self, camera: str, req: dict) -> None:
        self._requests.append((camera, req))
        self.app.wake()

    def poll(self) -> None:
        while self._requests:
            camera, req = self._requests.pop(0)
            try:
                if "confirm" in req:
                    self._confirm(camera, req["confirm"])
                elif req.get("cancel"):
                    self._proposals.pop(camera, None)
                    self._publish(camera, "cancelled")
                else:
                    self._propose(camera, req["hours"], req["false_positive_rate"])
            except ValueError as err:
                log.warning("calibrate/set of %s refused: %s", camera, err)
                self._publish(camera, "refused", error=str(err))
                self.app.publisher.publish_error("calibrate", f"{camera}: {err}", camera=camera)

    def _propose(self, camera: str, hours: float, fpr: float) -> None:
        times, scores = self.history.since(camera, time.time() - hours * 3600.0)
        doc = propose(times, scores, fpr, self.app.inference.threshold(camera))
        pid = uuid.uuid4().hex[:8]
        self._proposals[camera] = {**doc, "id": pid, "expires": time.time() + PROPOSAL_TTL_S}
        log.info("calibrate %s: proposing threshold %s (now %s) from %d normal frames over %.2f h; estimated "
                 "false-positive rate %s; confirm with {\"confirm\": \"%s\"}", camera, doc["threshold"],
                 doc["current_threshold"], doc["frames"], doc["hours_covered"], doc["held_out_false_positive_rate"],
                 pid)
        self._publish(camera, "proposed", id=pid, hours=hours, expires=iso_utc(time.time() + PROPOSAL_TTL_S), **doc)

    def _confirm(self, camera: str, pid: str) -> None:
        prop = self._proposals.get(camera)
        if prop is None or prop["id"] != pid:
            raise ValueError(f"no proposal {pid!r} for {camera}: send {{\"hours\": H, \"false_positive_rate\": R}} "
                             "first and confirm the id it reports")
        if time.time() > prop["expires"]:
            self._proposals.pop(camera, None)
            raise ValueError(f"proposal {pid} expired ({PROPOSAL_TTL_S:.0f} s): ask for a new one")
        error = self.app.publisher.apply_setting(topics.set_request(self.app.cfg.prefix, camera, "threshold"),
                                                 f"{prop['threshold']:.4f}".encode())
        if error is not None:
            raise ValueError(f"the threshold {prop['threshold']} was refused: {error}")
        self._proposals.pop(camera, None)
        log.info("calibrate %s: threshold %s applied (proposal %s)", camera, prop["threshold"], pid)
        self._publish(camera, "applied", id=pid, threshold=prop["threshold"],
                      previous_threshold=prop["current_threshold"],
                      held_out_false_positive_rate=prop["held_out_false_positive_rate"])

    def _publish(self, camera: str, state: str, **fields) -> None:
        doc = {"v": SCHEMA_VERSION, "camera": camera, "state": state, **fields, "timestamp": iso_utc(time.time())}
        self.app.publisher.publish_retained(topics.state(self.app.cfg.prefix, camera, "calibrate"), dumps(doc))
