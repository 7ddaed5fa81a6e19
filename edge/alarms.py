"""Alarm debouncing: N anomalous frames of the last M start an alarm, K normal frames in a row
end it (hysteresis), with ``start`` / ``update`` / ``end`` events that share one stable id.

One :class:`AlarmTracker` per camera; it is pure logic (no I/O, an injectable clock) so it is
tested on its own. The publisher turns the events into JSON (``AlarmEvent.payload()``), puts
them into the outbox and publishes them at QoS 1 on ``<prefix>/<camera>/alarm``.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable

from .config import AlarmConfig

SCHEMA_VERSION = 1


def iso_utc(ts: float) -> str:
    """Epoch seconds → ``2024-05-01T12:00:00.123Z``."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def num(x, digits: int = 4) -> float | None:
    """A JSON-safe rounded number (NaN / inf from a broken model become null)."""
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


@dataclass
class AlarmEvent:
    """One alarm message. ``(id, seq)`` is unique: subscribers drop a repeat of a pair they saw."""

    kind: str            # "start" | "update" | "end"
    id: str              # stable for the whole alarm
    seq: int             # 0 for start, then 1, 2, ... per event of this alarm
    node: str
    camera: str
    started: float       # epoch seconds of the frame that started the alarm
    timestamp: float     # epoch seconds of the frame that caused this event
    frame_id: int
    score: float         # score of that frame
    max_score: float     # highest score since the start
    anomalous_frames: int
    frames: int          # frames inspected since the start
    threshold: float
    reason: str | None = None  # end only: "cleared" | "camera_offline" | "shutdown"
    extra: dict = field(default_factory=dict)

    def payload(self) -> dict:
        data = {
            "v": SCHEMA_VERSION, "event": self.kind, "id": self.id, "seq": self.seq,
            "node": self.node, "camera": self.camera,
            "start_time": iso_utc(self.started), "start_epoch": round(self.started, 3),
            "timestamp": iso_utc(self.timestamp), "epoch": round(self.timestamp, 3),
            "duration_s": round(max(0.0, self.timestamp - self.started), 3),
            "frame_id": self.frame_id, "score": num(self.score), "max_score": num(self.max_score),
            "anomalous_frames": self.anomalous_frames, "frames": self.frames, "threshold": self.threshold,
        }
        if self.kind == "end":
            data["reason"] = self.reason or "cleared"
        data.update(self.extra)
        return data


class AlarmTracker:
    """Debounce one camera's per-frame verdicts into alarm events (not thread-safe: one caller)."""

    def __init__(self, node: str, camera: str, cfg: AlarmConfig, clock: Callable[[], float] = time.monotonic):
        self.node, self.camera, self.cfg, self._clock = node, camera, cfg, clock
        self._window: deque[bool] = deque(maxlen=cfg.m)
        self._active: AlarmEvent | None = None  # state of the running alarm
        self._normal_run = 0
        self._last_emit = 0.0

    @property
    def active_id(self) -> str | None:
        return self._active.id if self._active else None

    def update(self, anomalous: bool, score: float, frame_id: int, timestamp: float, threshold: float) -> list[AlarmEvent]:
        """Feed one inspected frame; return the events it causes (usually none)."""
        self._window.append(bool(anomalous))
        if self._active is None:
            if sum(self._window) >= self.cfg.n:
                return [self._start(score, frame_id, timestamp, threshold)]
            return []
        a = self._active
        a.frames += 1
        a.frame_id, a.timestamp, a.score, a.threshold = frame_id, timestamp, float(score), threshold
        if anomalous:
            a.anomalous_frames += 1
            a.max_score = max(a.max_score, float(score))
            self._normal_run = 0
        else:
            self._normal_run += 1
            if self._normal_run >= self.cfg.clear_frames:
                return [self._end("cleared")]
        if self._clock() - self._last_emit >= self.cfg.update_interval_s:
            return [self._emit("update")]
        return []

    def close(self, reason: str, timestamp: float | None = None) -> list[AlarmEvent]:
        """End a running alarm now (camera offline, daemon shutdown); [] when none runs."""
        if self._active is None:
            return []
        if timestamp is not None:
            self._active.timestamp = timestamp
        return [self._end(reason)]

    def _start(self, score: float, frame_id: int, timestamp: float, threshold: float) -> AlarmEvent:
        event_id = f"{self.node}-{self.camera}-{int(timestamp * 1000)}-{uuid.uuid4().hex[:8]}"
        hits = sum(self._window)
        self._active = AlarmEvent("start", event_id, -1, self.node, self.camera, timestamp, timestamp, frame_id,
                                  float(score), float(score), hits, len(self._window), threshold)
        self._normal_run = 0
        return self._emit("start")

    def _end(self, reason: str) -> AlarmEvent:
        event = self._emit("end", reason)
        self._active = None
        self._window.clear()  # a new alarm needs n fresh anomalous frames
        self._normal_run = 0
        return event

    def _emit(self, kind: str, reason: str | None = None) -> AlarmEvent:
        a = self._active
        a.seq += 1
        self._last_emit = self._clock()
        return AlarmEvent(kind, a.id, a.seq, a.node, a.camera, a.started, a.timestamp, a.frame_id, a.score,
                          a.max_score, a.anomalous_frames, a.frames, a.threshold, reason)
