"""Camera sources: one module per kind, each registering its own pydantic config.

Importing this package imports every module in it, so a new kind is one new file here: a
:class:`~.base.CameraConfig` subclass with ``kind: Literal["<name>"] = "<name>"``, its own keys,
``claims`` / ``problem`` / ``open_source``, decorated with :func:`~.registry.register`.
:data:`AnyCamera` is the discriminated union the daemon config's ``cameras`` list holds.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter

from .base import BadFrame, CameraConfig, Source, SourceEnded, SourceLost, redact
from .registry import KINDS, guess_kind, kind_names, register, split_error_location, with_kind

for _info in pkgutil.iter_modules(__path__):  # each kind registers itself on import
    importlib.import_module(f"{__name__}.{_info.name}")

AnyCamera = Annotated[Union[tuple(KINDS.values())], Field(discriminator="kind")]
_ADAPTER: TypeAdapter = TypeAdapter(AnyCamera)


def parse_camera(data: dict[str, Any], base_dir: Path | None = None) -> CameraConfig:
    """One camera mapping (as in the YAML) validated into its kind's config; ``kind: auto``
    guessed with relative paths taken from ``base_dir``. Raises pydantic's ``ValidationError``."""
    return _ADAPTER.validate_python(with_kind(data, base_dir))


__all__ = ["AnyCamera", "BadFrame", "CameraConfig", "KINDS", "Source", "SourceEnded", "SourceLost", "guess_kind",
           "kind_names", "parse_camera", "redact", "register", "split_error_location", "with_kind"]
