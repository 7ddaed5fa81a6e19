"""The reader of every kind OpenCV's ``VideoCapture`` opens: device, URL, pipeline, video file."""

from __future__ import annotations

import os
import time
from typing import Callable

import cv2
import numpy as np

from .base import BadFrame, Source, SourceEnded, SourceLost, redact


class VideoSource(Source):
    """Frames of a ``cv2.VideoCapture`` built by ``capture()``. With ``path`` (a video file) the
    source is finite: its end is :class:`SourceEnded` (or a restart with ``loop``), a removed file
    is :class:`SourceLost`; for live kinds a failed grab is :class:`SourceLost`."""

    def __init__(self, kind: str, source: str, capture: Callable[[], cv2.VideoCapture],
                 path: str | None = None, loop: bool = False):
        self.kind, self.source, self.capture, self.path, self.loop = kind, source, capture, path, loop
        self.name = redact(source)
        self.cap: cv2.VideoCapture | None = None

    def open(self) -> None:
        if self.path is not None and not os.path.isfile(self.path):
            raise SourceLost(f"video file {self.path} is missing")
        self.cap = self.capture()
        if not self.cap.isOpened():
            self.close()
            raise SourceLost(f"cannot open {self.kind} source {self.name}")

    def read(self) -> np.ndarray:
        if self.path is not None and not os.path.isfile(self.path):
            raise SourceLost(f"video file {self.path} was removed")
        if not self.cap.grab():
            if self.path is None:
                raise SourceLost(f"{self.kind} source {self.name} stopped delivering frames")
            if not self.loop:
                raise SourceEnded(f"end of video file {self.path}")
            self.close()
            self.open()
            if not self.cap.grab():
                raise SourceLost(f"video file {self.path} has no readable frame")
        self.arrived = time.time()
        ok, frame = self.cap.retrieve()
        if not ok or frame is None:
            raise BadFrame("the frame could not be decoded")
        return frame

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


def backend_problem(backend: int, what: str) -> str | None:
    """``what`` (the fix) when this OpenCV lacks the videoio ``backend``, else None."""
    return None if cv2.videoio_registry.hasBackend(backend) else what
