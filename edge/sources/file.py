"""``kind: file``: a video file, read once (``ended`` at its end) or with ``loop`` forever.

The fallback of ``kind: auto``: a source no other kind claims is taken as a file path.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

import cv2
from pydantic import Field

from .base import LocalPathCamera, Source
from .registry import register
from .video import VideoSource


@register
class FileCamera(LocalPathCamera):
    guess_order: ClassVar[int] = 1000  # last: whatever no other kind claims
    kind: Literal["file"] = Field("file", description="a video file (relative to the config file)")

    @classmethod
    def claims(cls, source: str, base_dir: Path | None) -> bool:
        return True

    def problem(self) -> str | None:
        if not Path(self.source).is_file():
            return f"no video file {self.source}; check the path (relative paths are relative to the config file)"
        cap = cv2.VideoCapture(self.source, cv2.CAP_ANY)
        opened = cap.isOpened() and cap.grab()
        cap.release()
        if not opened:
            return (f"OpenCV cannot read a frame from {self.source} (not a video, or a codec this OpenCV lacks); "
                    "convert it (e.g. ffmpeg -i IN -c:v mjpeg OUT.avi) or fix the path")
        return None

    def open_source(self) -> Source:
        return VideoSource(self.kind, self.source, lambda: cv2.VideoCapture(self.source, cv2.CAP_ANY),
                           path=self.source, loop=self.loop)
