"""What every camera source shares: the common config keys and the runtime reader contract.

A camera kind is one module in this package (``v4l2.py``, ``url.py``, ...) that subclasses
:class:`CameraConfig` with its own ``kind`` literal and keys, and registers it with
:func:`~haloae.edge.sources.registry.register`. The class says how ``kind: auto`` recognises
its sources (:meth:`CameraConfig.claims`), what no retry can fix (:meth:`CameraConfig.problem`,
checked at start) and how to read frames (:meth:`CameraConfig.open_source` returns a
:class:`Source`). The capture worker (``edge/capture.py``) does the rest: frame rate, checks,
ROI, reopen with backoff.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, ClassVar

import numpy as np
from pydantic import Field, StrictInt, field_validator

from haloae.errors import HaloaeError
from haloae.validate import check_identifier, check_threshold, mqtt_text_problem

from ..config_base import Strict
from haloae.zones import IgnoreZones, ZonesError, parse_zones

Roi = Annotated[tuple[StrictInt, ...], Field(strict=False)]


class SourceLost(HaloaeError):
    """The source cannot be opened or read: reopen with backoff."""


class SourceEnded(HaloaeError):
    """A finite source (file or folder without loop) reached its end."""


class BadFrame(HaloaeError):
    """One frame is unusable: skip it and count an error."""


def redact(source: str) -> str:
    """The source for logs and MQTT, without a password (``rtsp://user:***@host``)."""
    return re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", source)


class Source:
    """A frame reader: ``open()``, ``read() -> BGR or RGB array`` (``rgb`` says which), ``close()``.
    ``arrived`` is the wall-clock time the last raw frame became available. ``read`` raises
    :class:`SourceLost`, :class:`SourceEnded` or :class:`BadFrame`."""

    rgb = False
    arrived = 0.0

    def open(self) -> None: ...
    def read(self) -> np.ndarray: ...
    def close(self) -> None: ...


class CameraConfig(Strict):
    """The keys every camera has. A concrete kind subclasses it (``kind: Literal[...]``)."""

    finite: ClassVar[bool] = False  # a source with an end (file, folder): `loop` applies
    guess_order: ClassVar[int] = 100  # kind auto asks the kinds in this order (lowest first)

    id: str = Field(description="camera id used in MQTT topics: letters, digits, '_' or '-'")
    source: str = Field(description="V4L2 index ('0') or path ('/dev/video0'), rtsp:// or http(s):// URL, "
                        "GStreamer pipeline ending in 'appsink', video file, image folder, or 'synthetic'")
    kind: str = Field("auto", description="how to open the source; auto guesses from the source string")
    loop: bool = Field(False, description="restart a video file or image folder at its end")
    lossless: bool = Field(False, description="never drop frames: capture waits for inference instead of "
                           "handing over only the newest frame (replaying recordings, tests, benchmarks; "
                           "not for live cameras, whose frames would lag)")
    fps: float | None = Field(None, gt=0, description="cap on frames per second taken from the source")
    roi: Roi | None = Field(None, description="region of interest x, y, width, height in pixels")
    threshold: float | None = Field(None, description="per-camera image threshold override: a number in (0, 10] "
                                    "(normalised units; default from the bundle: 0.5)")
    ignore_zones: IgnoreZones | Annotated[Path, Field(strict=False)] | None = Field(
        None, description="polygons (frame pixels, after roi) and border_px whose anomalies are ignored: a YAML "
        "file (relative to this config; the same file haloae-eval --ignore-zones takes) or the mapping itself")

    # --- what a kind overrides ----------------------------------------------------------------
    @classmethod
    def claims(cls, source: str, base_dir: Path | None) -> bool:
        """Whether ``kind: auto`` takes ``source`` for this kind (``base_dir``: the config's folder)."""
        return False

    def problem(self) -> str | None:
        """What no retry can fix (a missing file, an OpenCV without the backend), else None."""
        return None

    def open_source(self) -> Source:
        """A fresh, unopened reader of this camera's frames."""
        raise NotImplementedError(f"camera {self.id}: kind {self.kind!r} is not a source kind; build camera "
                                  "configs with haloae.edge.sources.parse_camera")

    def describe(self) -> str:
        """The source for logs and the status ``detail`` (no password)."""
        return redact(self.source)

    def resolve_paths(self, base: Path) -> None:
        """Make relative file paths relative to the config's folder ``base``."""

    # --- validation ---------------------------------------------------------------------------
    @field_validator("id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        return check_identifier(v, "the camera id")

    @field_validator("loop")
    @classmethod
    def _check_loop(cls, v: bool) -> bool:
        if v and not cls.finite:
            kind = cls.model_fields["kind"].default
            raise ValueError(f"only a video file or an image folder restarts at its end; a {kind} source is "
                             "reopened when lost: remove loop")
        return v

    @field_validator("ignore_zones", mode="before")
    @classmethod
    def _check_zones(cls, v):
        """A mapping is validated here (one message with its key path), a string names a file."""
        if isinstance(v, dict):
            try:
                return parse_zones(v, "ignore zones")
            except ZonesError as err:
                raise ValueError(str(err).removeprefix("ignore zones: ")) from None
        if isinstance(v, str):
            return Path(v)
        return v

    @field_validator("source")
    @classmethod
    def _check_source(cls, v: str) -> str:
        problem = mqtt_text_problem(v) if v else "it is empty"
        if problem:
            raise ValueError(f"invalid source {v!r}: {problem}")
        return v

    @field_validator("threshold")
    @classmethod
    def _check_threshold(cls, v: float | None) -> float | None:
        return None if v is None else check_threshold(v)

    @field_validator("roi")
    @classmethod
    def _check_roi(cls, v):
        if v is None:
            return None
        if len(v) != 4 or v[0] < 0 or v[1] < 0 or v[2] <= 0 or v[3] <= 0:
            raise ValueError(f"roi is [x, y, width, height] with x, y >= 0 and width, height > 0, got {list(v)}")
        return tuple(v)


class LocalPathCamera(CameraConfig):
    """A source that is a path on this machine (video file, image folder): relative to the config."""

    finite: ClassVar[bool] = True

    def resolve_paths(self, base: Path) -> None:
        if not Path(self.source).is_absolute():
            self.source = str(base / self.source)


def local_path(source: str, base_dir: Path | None) -> Path:
    """``source`` as the path it names, relative paths taken from ``base_dir`` (the config's folder)."""
    path = Path(source)
    return path if path.is_absolute() or base_dir is None else Path(base_dir) / path
