"""The base of every HaloAE config schema (model, training run, edge daemon, ignore zones) and
the one way a schema error becomes one line.

`Strict` refuses unknown keys and does no type juggling; `format_error` turns pydantic's
``ValidationError`` into ``<key path>: <what is wrong>, got <value>`` (the first problem, and how
many more there are), e.g. ``map.sigma: Input should be a valid number, got '4' (text, not a
number: drop the quotes; ...)``. Each stage wraps that line in its own ``ConfigError``.
"""
from __future__ import annotations

import re
import typing
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, ValidationError

_NUMBER_TEXT = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")
# the loc entries pydantic adds for the member of a union it tried ('int', 'list[int]', ...)
_UNION_TAG = re.compile(r"(int|float|str|bool|none|[a-z_-]+\[.*\])")


class Strict(BaseModel):
    """Unknown keys refused; no type juggling (``"5"`` is not a number, ``true`` not 1, ``"1_0"`` not
    10); no NaN or infinity anywhere."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


def format_error(err: ValidationError, schema: Optional[type[BaseModel]] = None,
                 unknown_hint: Optional[str] = None,
                 locate: Optional[typing.Callable[[dict, list], tuple[list, Optional[str]]]] = None) -> str:
    """One line for the first problem in ``err``: its key path and what to do.

    An unknown key says ``unknown_hint`` when given, else lists the valid keys of the section it
    is in (found by walking ``schema`` along the key path). ``locate(error, loc)`` may rewrite the
    key path and word a message itself (``(loc, None)`` keeps the usual wording): the daemon's
    camera kinds use it to drop the union's kind tag from the path.
    """
    first = err.errors()[0]
    loc = [p for p in first["loc"] if not (isinstance(p, str) and _UNION_TAG.fullmatch(p))]
    own = None
    if locate is not None:
        loc, own = locate(first, loc)
    msg = first["msg"]
    if own is not None:
        msg = own
    elif first["type"] == "extra_forbidden":
        keys = _section_keys(schema, loc[:-1]) if schema is not None else None
        msg = "unknown key (check its spelling; " + (
            unknown_hint or (f"valid keys here: {', '.join(keys)}" if keys else "see the example configs")) + ")"
    elif first["type"] in ("value_error", "assertion_error"):
        msg = msg.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    elif first["type"] != "missing" and "input" in first:
        shown = repr(first["input"])
        msg = f"{msg}, got {shown if len(shown) <= 40 else shown[:40] + '...'}"
        if isinstance(first["input"], str) and _NUMBER_TEXT.fullmatch(first["input"]):
            msg += " (text, not a number: drop the quotes; YAML reads 1e5 as text, write 1.0e+5)"
    where = ".".join(str(p) for p in loc)
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


def _section_keys(schema: type[BaseModel], path: list[Any]) -> Optional[list[str]]:
    """The field names of the (nested) schema section at ``path``, or None if it is not one."""
    current: Any = schema
    for part in path:
        if isinstance(part, int):
            continue  # an item of a list / tuple: same section type
        sub = _model_in(current)
        if sub is None or part not in sub.model_fields:
            return None
        current = sub.model_fields[part].annotation
    sub = _model_in(current)
    return list(sub.model_fields) if sub is not None else None


def _model_in(annotation: Any) -> Optional[type[BaseModel]]:
    """The schema class inside ``annotation`` (itself, or inside Optional / list / Union)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
