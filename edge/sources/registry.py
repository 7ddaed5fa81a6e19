"""The camera kinds: each module of this package registers its config class here.

``kind: auto`` (the default) is resolved before validation by asking the kinds in their
``guess_order`` whether they claim the source string; the result is an ordinary kind, so a
config's ``cameras`` is a pydantic discriminated union on ``kind``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import CameraConfig

KINDS: dict[str, type[CameraConfig]] = {}  # kind -> its config class


def register(cls: type[CameraConfig]) -> type[CameraConfig]:
    """Class decorator: make ``cls`` (a :class:`CameraConfig` with a ``kind`` literal) a camera kind."""
    kind = cls.model_fields["kind"].default
    if not isinstance(kind, str) or kind == "auto" or kind in KINDS:
        raise RuntimeError(f"camera kind {kind!r} of {cls.__name__} is not a new kind name")
    KINDS[kind] = cls
    return cls


def kind_names() -> list[str]:
    """``auto`` and every registered kind, in guess order (for messages and docs)."""
    return ["auto"] + [k for k, _ in sorted(KINDS.items(), key=lambda kv: kv[1].guess_order)]


def guess_kind(source: Any, base_dir: Path | None = None) -> str:
    """The kind ``kind: auto`` means for ``source``. Not a string: the last (fallback) kind, whose
    validation then says what is wrong with the source."""
    ordered = sorted(KINDS.values(), key=lambda c: c.guess_order)
    if isinstance(source, str):
        for cls in ordered:
            if cls.claims(source, base_dir):
                return cls.model_fields["kind"].default
    return ordered[-1].model_fields["kind"].default


def with_kind(data: Any, base_dir: Path | None = None) -> Any:
    """A camera mapping with ``kind: auto`` (or none) replaced by the guessed kind; others as they are."""
    if isinstance(data, dict) and data.get("kind", "auto") == "auto":
        return {**data, "kind": guess_kind(data.get("source"), base_dir)}
    return data


def split_error_location(loc: tuple) -> tuple[tuple, str | None]:
    """A validation error's location without the union's kind tag (``cameras.0.v4l2.seed`` ->
    ``cameras.0.seed``) and that kind (None when the location names no camera kind)."""
    if len(loc) >= 3 and loc[0] == "cameras" and isinstance(loc[1], int) and loc[2] in KINDS:
        return loc[:2] + loc[3:], loc[2]
    return loc, None
