"""``kind: gstreamer``: a GStreamer pipeline ending in ``appsink`` (Jetson CSI cameras)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import cv2
from pydantic import Field

from .base import CameraConfig, Source
from .registry import register
from .video import VideoSource, backend_problem


@register
class GStreamerCamera(CameraConfig):
    guess_order: ClassVar[int] = 30
    kind: Literal["gstreamer"] = Field("gstreamer", description="a GStreamer pipeline ending in appsink")

    @classmethod
    def claims(cls, source: str, base_dir: Path | None) -> bool:
        return "!" in source

    def problem(self) -> str | None:
        return backend_problem(cv2.CAP_GSTREAMER, f"this OpenCV ({cv2.__version__}) has no GStreamer support; "
                               "install an OpenCV built with GStreamer (JetPack's python3-opencv)")

    def open_source(self) -> Source:
        return VideoSource(self.kind, self.source, lambda: cv2.VideoCapture(self.source, cv2.CAP_GSTREAMER))
