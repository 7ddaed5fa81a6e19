"""``kind: url``: a network stream (``rtsp://``, ``http(s)://``) read through FFmpeg."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import cv2
from pydantic import Field

from .base import CameraConfig, Source
from .registry import register
from .video import VideoSource, backend_problem

OPEN_TIMEOUT_MS = 5000  # FFmpeg open / read timeouts


@register
class UrlCamera(CameraConfig):
    guess_order: ClassVar[int] = 20
    kind: Literal["url"] = Field("url", description="a network stream: rtsp:// or http(s):// URL (FFmpeg)")

    @classmethod
    def claims(cls, source: str, base_dir: Path | None) -> bool:
        return "://" in source

    def problem(self) -> str | None:
        return backend_problem(cv2.CAP_FFMPEG, "this OpenCV has no FFmpeg support for URLs; use a GStreamer "
                               "pipeline (kind: gstreamer) or an OpenCV built with FFmpeg")

    def open_source(self) -> Source:
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, OPEN_TIMEOUT_MS]
        return VideoSource(self.kind, self.source, lambda: cv2.VideoCapture(self.source, cv2.CAP_FFMPEG, params))
