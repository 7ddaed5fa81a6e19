"""The alarm decision path: debounce a scored frame and write the event it causes to the outbox.

:meth:`AlarmDesk.decide` runs on the inference thread, for every inspected frame, before any
slow work (mask, PNG/JPEG encoding, evidence, MQTT): when it returns, the ``start`` /
``update`` / ``end`` event of that frame is committed to ``outbox.sqlite`` (or, while the disk
fails, held in the outbox's memory queue), so a crash right after the deciding frame loses
nothing. The sender thread (``edge/delivery.py``) is woken to publish it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Callable

from . import topics
from .alarms import AlarmEvent, AlarmTracker
from .config import AlarmConfig
from .outbox import Outbox

log = logging.getLogger(__name__)


class AlarmDesk:
    """One :class:`AlarmTracker` per camera and the durable write of their events. Thread-safe."""

    def __init__(self, node: str, prefix: str, cfg: AlarmConfig, outbox: Outbox, wake: Callable[[], None],
                 on_state: Callable[[str, bool], None] | None = None):
        """``on_state(camera, active)`` is called when an alarm starts (True) or ends (False)."""
        self.node, self.prefix, self.cfg, self.outbox, self._wake = node, prefix, cfg, outbox, wake
        self._on_state = on_state
        self._trackers: dict[str, AlarmTracker] = {}
        self._lock = threading.Lock()
        self.raised = 0  # events written so far
        self.started: dict[str, int] = {}  # alarms started per camera

    def decide(self, r) -> str | None:
        """Feed one inspected frame; store the events it causes; return the alarm id running on
        (or ended by) this frame."""
        with self._lock:
            tracker = self._tracker(r.camera)
            events = tracker.update(r.anomalous, r.score, r.frame_id, r.timestamp, r.threshold)
            self._store(events)
            return tracker.active_id or (events[0].id if events else None)

    def active(self, camera: str) -> bool:
        """Whether an alarm runs on ``camera``."""
        return self.active_id(camera) is not None

    def active_id(self, camera: str) -> str | None:
        """The id of the alarm running on ``camera``, else None."""
        with self._lock:
            tracker = self._trackers.get(camera)
            return None if tracker is None else tracker.active_id

    def close(self, camera: str, reason: str) -> None:
        """End a running alarm of ``camera`` (``camera_offline``, ``camera_ended``)."""
        with self._lock:
            self._store(self._tracker(camera).close(reason, time.time()))

    def close_all(self, reason: str = "shutdown") -> None:
        with self._lock:
            for tracker in self._trackers.values():
                self._store(tracker.close(reason, time.time()))

    def _store(self, events: list[AlarmEvent]) -> None:
        for ev in events:
            payload = json.dumps(ev.payload(), separators=(",", ":"), allow_nan=False).encode()
            self.outbox.add(ev.kind, topics.alarm(self.prefix, ev.camera), payload)
            self.raised += 1
            log.info("alarm %s %s on %s (score %.3f, frame %d)", ev.kind, ev.id, ev.camera, ev.score, ev.frame_id)
            if ev.kind == "start":
                self.started[ev.camera] = self.started.get(ev.camera, 0) + 1
            if self._on_state is not None and ev.kind in ("start", "end"):
                self._on_state(ev.camera, ev.kind == "start")
        if events:
            self._wake()

    def _tracker(self, camera: str) -> AlarmTracker:
        if camera not in self._trackers:
            self._trackers[camera] = AlarmTracker(self.node, camera, self.cfg)
        return self._trackers[camera]

