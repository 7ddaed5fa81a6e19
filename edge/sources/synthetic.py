"""``kind: synthetic`` (``source: synthetic``): an endless simulated line with known defective
runs (``haloae/synthetic.py``), for the demo, tests and benchmarks."""

from __future__ import annotations

import time
from pathlib import Path
from typing import ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field, field_validator

from haloae.synthetic import LineSimulator
from .base import CameraConfig, Source
from .registry import register


class SyntheticSource(Source):
    """RGB frames of :class:`LineSimulator`, optionally under a dimmed (or brighter) lamp."""

    rgb = True

    def __init__(self, seed: int, defect_every: int, size: int = 256, lighting: float = 1.0, lighting_from: int = 0):
        self.sim = LineSimulator(size=size, seed=seed, defect_every=defect_every)
        self.index = 0
        self.lighting, self.lighting_from = lighting, lighting_from

    def read(self) -> np.ndarray:
        self.arrived = time.time()
        rgb, _ = self.sim.frame(self.index)
        if self.lighting != 1.0 and self.index >= self.lighting_from:  # a dimmed (or brighter) lamp
            rgb = cv2.convertScaleAbs(rgb, alpha=self.lighting)
        self.index += 1
        return rgb


@register
class SyntheticCamera(CameraConfig):
    guess_order: ClassVar[int] = 0
    kind: Literal["synthetic"] = Field("synthetic", description="the simulated line (source: synthetic)")
    source: str = Field("synthetic", description="always 'synthetic'")
    seed: int = Field(0, description="seed of the simulated line")
    defect_every: int = Field(3, ge=0, description="every n-th run of frames is defective (0 = never)")
    lighting: float = Field(1.0, gt=0, le=4, description="brightness gain of the simulated lighting (1 = as in "
                            "the training data), from frame lighting_from_frame on")
    lighting_from_frame: int = Field(0, ge=0, description="first frame lit with `lighting` (earlier frames: 1); "
                                     "simulates a lamp that dims")

    @classmethod
    def claims(cls, source: str, base_dir: Path | None) -> bool:
        return source == "synthetic"

    @field_validator("source")
    @classmethod
    def _synthetic_only(cls, v: str) -> str:
        if v != "synthetic":
            raise ValueError(f"kind synthetic needs source: synthetic, got {v!r}")
        return v

    def open_source(self) -> Source:
        return SyntheticSource(self.seed, self.defect_every, lighting=self.lighting,
                               lighting_from=self.lighting_from_frame)

    def describe(self) -> str:
        return "synthetic line"
