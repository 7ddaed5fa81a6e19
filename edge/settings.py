"""Runtime settings over MQTT: ``<prefix>/[<camera>/]<setting>/set`` -> a validated value.

Settings topics are the daemon's only input from the network, so every payload is checked
strictly before anything changes: at most :data:`MAX_SETTING_BYTES` bytes, UTF-8, a plain
decimal number (``0.62``; no sign, exponent, ``_``, ``nan``/``inf`` or non-ASCII digits, all of
which Python's ``float()`` would take), surrounding ASCII white space ignored, then the
setting's own range. A refusal is a :class:`SettingError` whose text goes to
``<prefix>/error`` (``docs/mqtt.md``, "Settings").
"""

from __future__ import annotations

from typing import Any, Callable

from haloae.errors import UserError
from haloae.validate import check_threshold, parse_decimal

MAX_SETTING_BYTES = 256


class SettingError(UserError, ValueError):
    """A rejected ``.../set`` message; the text goes to ``<prefix>/error``."""


def decimal_payload(payload: bytes, what: str = "the value must be a plain decimal number, e.g. 0.6") -> float:
    """A ``set`` payload as a plain decimal number (see the module doc); ``what`` says what is wanted."""
    if len(payload) > MAX_SETTING_BYTES:
        raise SettingError(f"payload of {len(payload)} bytes is too long (at most {MAX_SETTING_BYTES})")
    try:
        text = payload.strip(b" \t\r\n").decode("utf-8")
    except UnicodeDecodeError:
        raise SettingError(f"{what}; got bytes that are not UTF-8 text") from None
    try:
        return parse_decimal(text)
    except ValueError:
        shown = repr(text[:32]) + ("..." if len(text) > 32 else "")
        raise SettingError(f"{what}; got {shown}") from None


def parse_threshold(payload: bytes) -> float:
    """A threshold from a ``set`` payload: a plain decimal number in (0, 10]."""
    what = "threshold must be a plain decimal number in (0, 10], e.g. 0.6"
    value = decimal_payload(payload, what)
    try:
        return check_threshold(value)
    except ValueError:
        raise SettingError(f"{what}; got {payload.strip().decode()[:32]!r}") from None


SETTINGS: dict[str, Callable[[bytes], Any]] = {"threshold": parse_threshold}


def split_topic(prefix: str, topic: str) -> tuple[str | None, str]:
    """``(camera or None, setting)`` of ``<prefix>/[<camera>/]<setting>/set``."""
    parts = topic[len(prefix) + 1:].split("/")  # [camera, setting, "set"] or [setting, "set"]
    return (parts[0], parts[1]) if len(parts) == 3 else (None, parts[0])


def parse_set(prefix: str, topic: str, cameras: list[str], payload: bytes, size: int) -> tuple[str | None, str, Any]:
    """``(camera or None, setting, value)`` of a ``set`` message; :class:`SettingError` if refused."""
    camera, setting = split_topic(prefix, topic)
    if camera is not None and camera not in cameras:
        raise SettingError(f"unknown camera {camera!r}; cameras: {', '.join(cameras)}")
    if setting not in SETTINGS:
        raise SettingError(f"unknown setting {setting!r}; settings: {', '.join(SETTINGS)}")
    if size > MAX_SETTING_BYTES:
        raise SettingError(f"payload of {size} bytes is too long (at most {MAX_SETTING_BYTES})")
    return camera, setting, SETTINGS[setting](payload)
