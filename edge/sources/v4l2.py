"""``kind: v4l2``: a V4L2 device by index (``"0"``) or path (``/dev/video0``)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import cv2
from pydantic import Field

from .base import CameraConfig, Source
from .registry import register
from .video import VideoSource, backend_problem


@register
class V4L2Camera(CameraConfig):
    guess_order: ClassVar[int] = 10
    kind: Literal["v4l2"] = Field("v4l2", description="a V4L2 device: index '0' or path /dev/video0")

    @classmethod
    def claims(cls, source: str, base_dir: Path | None) -> bool:
        return source.isdigit() or source.startswith("/dev/")

    def problem(self) -> str | None:  # a missing device is not fatal: offline + retry (it may be plugged in)
        return backend_problem(cv2.CAP_V4L2, f"this OpenCV ({cv2.__version__}) has no V4L2 support; install "
                               "opencv-python(-headless) from PyPI or JetPack's python3-opencv")

    def open_source(self) -> Source:
        device = int(self.source) if self.source.isdigit() else self.source
        return VideoSource(self.kind, self.source, lambda: cv2.VideoCapture(device, cv2.CAP_V4L2))
