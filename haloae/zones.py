"""Ignore zones: frame areas whose anomalies do not count (a fixture, a label, a moving part).

A zone set is polygons in frame pixels plus a ``border_px`` band along the frame edges, for
frames of ``size`` = [width, height] (the frame *after* the camera's ``roi`` crop, the pixels
``regions`` are reported in). It is applied to the anomaly map **before** the image score and
the defect regions are taken: the map is set to 0 inside the zones and the score is the model's
own reduction (``model.config.map.score``: the map's maximum, the mean of its top-k pixels, or
the maximum plus w times the mean, w = the calibration's ``score_mean_weight``) over the pixels
left. The graph's score is ``c * reduce(map)`` for a constant ``c`` (the calibration;
docs/bundle.md; each reduction scales with the map), so the score with zones is ``score * reduce(kept) / reduce(all)``,
the same units, the same threshold, and exactly the graph's score when no zone covers the peak.
With ``map.fine_weight`` or ``map.coarse_weight`` > 0 the score is taken from the full distance's map, which the bundle
does not output: the published (fused) map's ratio then stands in for it, an approximation
(``Reduction.exact`` is False; measured in docs/benchmarks.md, lever row 45).

One definition for the line and the lab: the daemon (``cameras[].ignore_zones``, edge/infer.py)
and ``haloae-eval --ignore-zones FILE`` (train/evaluate.py) both call :meth:`ZoneSet.apply`.
numpy, OpenCV and pydantic only (no torch): the edge imports it on a Jetson.

File format (YAML)::

    size: [640, 480]        # width, height of the frames the points are in
    border_px: 8            # ignore this many pixels along each edge (0 = none)
    polygons:               # each at least 3 [x, y] points, inside the frame
      - [[0, 0], [120, 0], [120, 40], [0, 40]]
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Mapping

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from haloae.errors import UserError
from haloae.config_base import format_error
from haloae.yaml_file import read_yaml

log = logging.getLogger(__name__)

MAX_POLYGONS = 64
MAX_POINTS = 1000
MAX_SIDE = 100_000
_SUBPIXEL = 4  # cv2.fillPoly fixed-point bits: polygon corners at 1/16 pixel


class ZonesError(UserError, ValueError):
    """A zone set that cannot be used; the message says which value and what to do."""


Point = Annotated[tuple[float, float], Field(strict=False)]  # [x, y] as a YAML list; numbers stay strict
Size = Annotated[tuple[StrictInt, StrictInt], Field(strict=False)]


class IgnoreZones(BaseModel):
    """Ignore zones of one camera (docs/operations.md, "Ignore zones")."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    size: Size = Field(description="width, height in pixels of the frames the polygons are drawn on "
                                  "(after the camera's roi crop)")
    border_px: int = Field(0, ge=0, description="ignore a band this many pixels wide along every frame edge")
    polygons: list[list[Point]] = Field(default_factory=list, max_length=MAX_POLYGONS,
                                        description="polygons of [x, y] frame pixels whose anomalies are ignored")

    @field_validator("size")
    @classmethod
    def _check_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if len(v) != 2 or not all(1 <= s <= MAX_SIDE for s in v):
            raise ValueError(f"size is [width, height] of the frame in pixels, each 1..{MAX_SIDE}, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _check_geometry(self):
        w, h = self.size
        if 2 * self.border_px >= min(w, h):
            raise ValueError(f"border_px {self.border_px} leaves nothing of a {w}x{h} frame (use less than "
                             f"{(min(w, h) + 1) // 2})")
        for i, poly in enumerate(self.polygons):
            where = f"polygons.{i}"
            if not 3 <= len(poly) <= MAX_POINTS:
                raise ValueError(f"{where}: a polygon needs 3 to {MAX_POINTS} [x, y] points, got {len(poly)}")
            for j, (x, y) in enumerate(poly):
                if not (0 <= x <= w and 0 <= y <= h):
                    raise ValueError(f"{where}.{j}: point [{x:g}, {y:g}] is outside the {w}x{h} frame "
                                     f"(x in 0..{w}, y in 0..{h}, frame pixels after the roi crop)")
            if abs(cv2.contourArea(np.asarray(poly, np.float32))) < 1.0:
                raise ValueError(f"{where}: the polygon encloses less than one pixel (points on a line or "
                                 "repeated?)")
        if not self.keep_mask(w, h).any():
            raise ValueError(f"the zones cover the whole {w}x{h} frame: nothing would be inspected")
        return self

    # -- masks ---------------------------------------------------------------------------
    def ignored_mask(self, width: int, height: int) -> np.ndarray:
        """uint8 mask of a ``width`` x ``height`` frame: 255 where ignored (polygons scaled from
        ``size`` when the frame is another size)."""
        w, h = self.size
        sx, sy = width / w, height / h
        out = np.zeros((height, width), np.uint8)
        if self.polygons:
            scale = float(1 << _SUBPIXEL)
            pts = [np.round(np.asarray(p, np.float64) * (sx * scale, sy * scale)).astype(np.int32)
                   for p in self.polygons]
            cv2.fillPoly(out, pts, 255, lineType=cv2.LINE_8, shift=_SUBPIXEL)
        bx, by = round(self.border_px * sx), round(self.border_px * sy)
        if bx:
            out[:, :bx] = out[:, width - bx:] = 255
        if by:
            out[:by, :] = out[height - by:, :] = 255
        return out

    def keep_mask(self, width: int, height: int, map_width: int | None = None,
                  map_height: int | None = None) -> np.ndarray:
        """bool mask, True where inspected: at frame resolution, or (with ``map_width`` /
        ``map_height``) at the anomaly map's, where a map pixel is ignored when at least half of
        the frame area it covers is."""
        ignored = self.ignored_mask(width, height)
        if map_width is None or (map_width, map_height) == (width, height):
            return ignored == 0
        frac = cv2.resize(ignored.astype(np.float32) / 255.0, (map_width, map_height), interpolation=cv2.INTER_AREA)
        return frac < 0.5

    def scaled_polygons(self, width: int, height: int) -> list[np.ndarray]:
        """The polygons in the pixels of a ``width`` x ``height`` frame (for drawing)."""
        w, h = self.size
        return [np.asarray(p, np.float64) * (width / w, height / h) for p in self.polygons]


@dataclass(frozen=True)
class Reduction:
    """How the bundle's image score comes from its map: ``max``, the mean of the top ``k``, or
    ``max_mean``: the maximum plus ``weight`` times the mean."""

    kind: str = "max"
    k: int = 1
    weight: float = 0.0
    exact: bool = True  # False: the score is not taken from the published map (map.fine_weight / coarse_weight > 0)

    def __call__(self, values: np.ndarray) -> float:
        flat = np.asarray(values, np.float32).ravel()
        if flat.size == 0:
            return 0.0
        if self.kind == "max_mean":
            return float(flat.max()) + self.weight * float(flat.mean(dtype=np.float64))
        if self.kind == "max" or self.k <= 1:
            return float(flat.max())
        k = min(self.k, flat.size)
        return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())


def reduction_from_model_config(model_cfg: dict | None, calibration: Mapping | None = None) -> Reduction:
    """The :class:`Reduction` of a model config (``manifest.model.config``, ``ModelCfg.to_dict()``)
    and its calibration record (``max_mean``: its ``score_mean_weight``); ``max`` when the config
    says nothing (older bundles: the score is the map's maximum)."""
    cfg = (model_cfg or {}).get("map") if isinstance(model_cfg, dict) else None
    cfg = cfg if isinstance(cfg, dict) else {}
    kind = cfg.get("score", "max")
    fused = [cfg.get(k) for k in ("fine_weight", "coarse_weight")]
    exact = not any(isinstance(v, (int, float)) and v > 0 for v in fused)  # a fused map: the kept / whole ratio stands in
    if kind == "max":
        return Reduction("max", 1, exact=exact)
    if kind == "max_mean":
        weight = (calibration or {}).get("score_mean_weight")
        if isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) \
                and weight >= 0:
            return Reduction("max_mean", 1, float(weight), exact)
        raise ZonesError(f"ignore zones: the model's score is max_mean but its calibration record has no usable "
                         f"score_mean_weight ({weight!r}); export the bundle again from its final.pt")
    topk = cfg.get("topk")
    if kind == "topk" and isinstance(topk, int) and not isinstance(topk, bool) and topk >= 1:
        return Reduction("topk", topk, exact=exact)
    raise ZonesError(f"ignore zones need a model whose image score is the max or the top-k mean of its anomaly map "
                     f"(model.config.map.score); this one says score={kind!r}, topk={topk!r}")


class ZoneSet:
    """An :class:`IgnoreZones` with its masks cached per (frame size, map size). Thread-safe."""

    def __init__(self, zones: IgnoreZones, name: str = "ignore zones"):
        self.zones, self.name = zones, name
        self._cache: dict[tuple, np.ndarray] = {}
        self._warned: set[tuple[int, int]] = set()
        self._lock = threading.Lock()

    def keep(self, width: int, height: int, map_width: int | None = None, map_height: int | None = None) -> np.ndarray:
        key = (width, height, map_width, map_height)
        with self._lock:
            mask = self._cache.get(key)
        if mask is None:
            if (width, height) != self.zones.size and (width, height) not in self._warned:
                self._warned.add((width, height))
                log.warning("%s are drawn for %dx%d frames but the frames are %dx%d: the polygons are scaled to fit; "
                            "redraw them on a frame of this size (after the roi crop)", self.name, *self.zones.size,
                            width, height)
            mask = self.zones.keep_mask(width, height, map_width, map_height)
            with self._lock:
                self._cache[key] = mask
        return mask

    def check_map(self, width: int, height: int, map_width: int, map_height: int) -> None:
        """Raise :class:`ZonesError` when no pixel of a ``map_width`` x ``map_height`` map is left."""
        if not self.keep(width, height, map_width, map_height).any():
            raise ZonesError(f"{self.name} leave no pixel of the model's {map_width}x{map_height} anomaly map: "
                             "make the zones smaller")

    def apply(self, score: float, amap: np.ndarray, frame_size: tuple[int, int],
              reduction: Reduction) -> tuple[float, np.ndarray]:
        """``(score, map)`` with the zones applied: the map (H x W, the model's resolution) is 0
        inside them, the score is rescaled by ``reduce(kept) / reduce(all)``."""
        mh, mw = amap.shape[-2:]
        keep = self.keep(int(frame_size[0]), int(frame_size[1]), mw, mh)
        full = reduction(amap)
        kept = reduction(amap[keep])
        masked = np.where(keep, amap, np.float32(0)).astype(np.float32, copy=False)
        if full > 0 and math.isfinite(full):
            score = float(score) * kept / full
        return score, masked


def _format(err: ValidationError) -> str:
    return format_error(err, IgnoreZones, unknown_hint="the keys are size, border_px, polygons")


def parse_zones(data: object, where: str = "ignore zones") -> IgnoreZones:
    """Validate a mapping; :class:`ZonesError` with the key path on any problem."""
    if not isinstance(data, dict):
        raise ZonesError(f"{where}: expected a mapping with size, border_px and polygons, got {type(data).__name__}")
    try:
        return IgnoreZones.model_validate(data)
    except ValidationError as err:
        raise ZonesError(f"{where}: {_format(err)}") from None


def load_zones(path: str | Path) -> IgnoreZones:
    """Read and validate a zones YAML file; :class:`ZonesError` with one line on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ZonesError(f"no ignore-zones file {path}; check the path (relative paths are relative to the config "
                         "file)")
    try:
        data = read_yaml(path)
    except ValueError as err:
        raise ZonesError(f"ignore zones file: {err}") from None
    return parse_zones(data, str(path))
