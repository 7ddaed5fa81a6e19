"""``kind: folder``: the images of a folder in sorted name order; the listing is refreshed at
each ``loop``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field

from .base import BadFrame, LocalPathCamera, Source, SourceEnded, SourceLost, local_path
from .registry import register

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


class FolderSource(Source):
    """Images of a folder in sorted name order; the listing is refreshed at each loop."""

    def __init__(self, folder: str, loop: bool = False):
        self.folder, self.loop = Path(folder), loop
        self.files: list[Path] = []
        self.pos = 0

    def listing(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir()
                      if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file())

    def _list(self) -> list[Path]:
        if not self.folder.is_dir():
            raise SourceLost(f"image folder {self.folder} is missing")
        return self.listing()

    def open(self) -> None:
        self.files, self.pos = self._list(), 0
        if not self.files:
            raise SourceLost(f"image folder {self.folder} holds no images ({', '.join(IMAGE_EXTS)})")

    def read(self) -> np.ndarray:
        if self.pos >= len(self.files):
            if not self.loop:
                raise SourceEnded(f"end of image folder {self.folder}")
            self.open()
        path = self.files[self.pos]
        self.pos += 1
        self.arrived = time.time()
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            if not self.folder.is_dir():
                raise SourceLost(f"image folder {self.folder} was removed")
            raise BadFrame(f"{path.name} is unreadable or not an image")
        return img


@register
class FolderCamera(LocalPathCamera):
    guess_order: ClassVar[int] = 40
    kind: Literal["folder"] = Field("folder", description="a folder of images, replayed in name order")

    @classmethod
    def claims(cls, source: str, base_dir: Path | None) -> bool:
        return local_path(source, base_dir).is_dir()

    def problem(self) -> str | None:
        if not Path(self.source).is_dir():
            return f"no image folder {self.source}; check the path"
        if not FolderSource(self.source).listing():
            return f"the folder {self.source} holds no images ({', '.join(IMAGE_EXTS)})"
        return None

    def open_source(self) -> Source:
        return FolderSource(self.source, self.loop)
