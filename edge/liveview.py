"""Live view state: the latest inspected frame of every camera, a short score history, and its
JPEG, encoded only when somebody asks for it.

:meth:`LiveView.offer` runs on the inference thread for every inspected frame and only keeps a
reference (the frame, its map) and appends (time, score) to a bounded history: no copy, no
drawing, no JPEG. A viewer (``latest.jpg``, an MJPEG stream) asks :meth:`LiveView.jpeg`, which
draws and encodes the camera's latest frame once (``edge/render.py``) and hands the same bytes
to every viewer of that frame. ``encoded`` counts JPEGs made: it stays 0 while nobody watches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from . import regions
from .config import EdgeConfig
from .render import draw_result

log = logging.getLogger(__name__)

HISTORY_POINTS = 300  # at most this many points per camera in the page's chart
RawFrame = Callable[[str], "tuple | None"]


class LiveView:
    """Latest frames and scores of the cameras. Thread-safe."""

    def __init__(self, cfg: EdgeConfig, raw_frame: RawFrame | None = None):
        self.cfg, self.raw_frame = cfg, raw_frame
        self.cameras = {c.id: c for c in cfg.cameras}
        self._cv = threading.Condition()
        self._latest: dict[str, object] = {}
        self._seq = dict.fromkeys(self.cameras, 0)
        self._history = {c: deque(maxlen=4096) for c in self.cameras}
        self._jpeg: dict[str, tuple[int, bytes]] = {}
        self._draw_locks = {c: threading.Lock() for c in self.cameras}
        self.viewers = 0  # open MJPEG streams
        self.encoded = 0  # JPEGs drawn and encoded so far
        self._closed = False

    # -- inference thread --------------------------------------------------------------------
    def offer(self, r) -> None:
        with self._cv:
            self._latest[r.camera] = r
            self._seq[r.camera] += 1
            self._history[r.camera].append((r.timestamp, round(float(r.score), 4), bool(r.anomalous)))
            if self.viewers:
                self._cv.notify_all()

    # -- viewers -----------------------------------------------------------------------------
    def latest(self, camera: str):
        with self._cv:
            return self._latest.get(camera)

    def jpeg(self, camera: str) -> tuple[int, bytes] | None:
        """``(seq, JPEG)`` of the camera's latest frame (drawn once per frame), None before the first."""
        with self._cv:
            r, seq = self._latest.get(camera), self._seq[camera]
            cached = self._jpeg.get(camera)
        if r is None:
            return None
        if cached is not None and cached[0] == seq:
            return cached
        with self._draw_locks[camera]:  # two viewers of one camera: one drawing
            cached = self._jpeg.get(camera)
            if cached is not None and cached[0] == seq:
                return cached
            cam = self.cameras[camera]
            raw = self.raw_frame(camera) if (self.raw_frame and cam.roi is not None) else None
            img = draw_result(r, self.cfg.publish.min_region_area, self.cfg.publish.max_regions, raw, cam.roi,
                              self.cfg.publish.mask_peak_fraction)
            data = (seq, regions.encode_jpeg(img, self.cfg.http.jpeg_quality))
            self._jpeg[camera] = data
            self.encoded += 1
        return data

    def wait_new(self, camera: str, after: int, timeout: float) -> int:
        """Wait up to ``timeout`` s for a frame of ``camera`` newer than ``after``; its seq."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._seq[camera] <= after and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cv.wait(left)
            return self._seq[camera]

    def open_stream(self) -> bool:
        """Count a new MJPEG viewer; False when ``http.max_streams`` are open already."""
        with self._cv:
            if self.viewers >= self.cfg.http.max_streams:
                return False
            self.viewers += 1
            return True

    def close_stream(self) -> None:
        with self._cv:
            self.viewers -= 1

    def close(self) -> None:
        """Wake every stream so that it ends (daemon stop)."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def history(self, camera: str) -> list[list]:
        """``[[epoch, score, defect], ...]`` of the last ``http.history_s`` seconds (thinned)."""
        since = time.time() - self.cfg.http.history_s
        with self._cv:
            points = [p for p in self._history[camera] if p[0] >= since]
        step = max(1, len(points) // HISTORY_POINTS)
        thinned = points[::step]
        if points and thinned[-1] is not points[-1]:
            thinned.append(points[-1])
        return [[round(t, 3), s, d] for t, s, d in thinned]
