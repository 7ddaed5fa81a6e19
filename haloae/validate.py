"""Validators shared by every place a value enters: daemon config, bundle manifest, MQTT
settings messages, the outbox. Standard library only (the bundle reader and the edge daemon
import it on a Jetson without numpy-heavy stacks).

Each ``check_*`` returns the cleaned value or raises ``ValueError`` whose message says what is
wrong and what a valid value looks like; callers add where the value came from.

- MQTT text (topics, client ids): UTF-8 without NUL, control characters (C0, DEL, C1),
  surrogates or the non-characters U+FFFE/U+FFFF. That is what MQTT 5 section 1.5.4 forbids
  or lets a broker refuse, and what mosquitto refuses as a malformed packet (it then drops the
  connection, and a client that resends the same message loops for ever).
- Identifiers (node, camera id): 1-64 of ``A-Z a-z 0-9 _ -``: one topic level, a file name.
- Topic prefixes: levels of printable characters, no ``+``/``#`` wildcards, no empty level,
  no leading ``$`` (reserved for the broker), no white space.
- Thresholds (normalised units, calibrated value 0.5): finite numbers in (0, 10].
- Decimal text (settings payloads): ``0.6``, ``.6``, ``12``, nothing else: no sign, exponent,
  underscore, ``nan``/``inf`` or non-ASCII digit (Python's ``float()`` takes all of those).
"""

from __future__ import annotations

import json
import math
import re

IDENTIFIER = re.compile(r"[A-Za-z0-9_-]{1,64}")
DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
THRESHOLD_MAX = 10.0
MAX_TOPIC_BYTES = 65535
MAX_PREFIX_CHARS = 200


def mqtt_text_problem(text: str) -> str | None:
    """Why ``text`` cannot go into an MQTT topic or client id, or None when it can."""
    for i, ch in enumerate(text):
        cp = ord(ch)
        if cp < 0x20 or 0x7F <= cp <= 0x9F:
            return f"control character {ch!r} at position {i}"
        if 0xD800 <= cp <= 0xDFFF:
            return f"lone surrogate {ch!r} at position {i} (not UTF-8)"
        if cp in (0xFFFE, 0xFFFF):
            return f"non-character {ch!r} at position {i}"
    if len(text.encode("utf-8")) > MAX_TOPIC_BYTES:
        return f"{len(text.encode('utf-8'))} bytes long (MQTT allows {MAX_TOPIC_BYTES})"
    return None


def publish_topic_problem(topic: str) -> str | None:
    """Why no broker would take a PUBLISH to ``topic``, or None when it is a valid topic name."""
    if not isinstance(topic, str) or not topic:
        return "empty topic"
    if "+" in topic or "#" in topic:
        return "contains a wildcard ('+' or '#'), which a publish topic cannot"
    return mqtt_text_problem(topic)


def check_identifier(value: object, what: str = "id") -> str:
    """A node name or camera id: one topic level of 1-64 ``A-Z a-z 0-9 _ -``."""
    if not isinstance(value, str) or IDENTIFIER.fullmatch(value) is None:
        raise ValueError(f"{what} must be 1-64 letters, digits, '_' or '-' (it becomes an MQTT topic level "
                         f"and a file name), got {_show(value)}")
    return value


def check_prefix(value: object) -> str:
    """An MQTT topic prefix such as ``haloae/line1`` (one trailing ``/`` is dropped)."""
    if not isinstance(value, str):
        raise ValueError(f"the topic prefix must be text such as haloae/line1, got {_show(value)}")
    prefix = value[:-1] if value.endswith("/") else value
    problem = mqtt_text_problem(prefix)
    if problem is None and not prefix:
        problem = "it is empty"
    elif problem is None and len(prefix) > MAX_PREFIX_CHARS:
        problem = f"it is {len(prefix)} characters long (at most {MAX_PREFIX_CHARS})"
    elif problem is None and ("+" in prefix or "#" in prefix):
        problem = "it contains an MQTT wildcard ('+' or '#')"
    elif problem is None and prefix.startswith("$"):
        problem = "topics starting with '$' are reserved for the broker"
    elif problem is None and any(ch.isspace() for ch in prefix):
        problem = "it contains white space"
    elif problem is None and "" in prefix.split("/"):
        problem = "it has an empty level ('//' or a leading '/')"
    if problem:
        raise ValueError(f"invalid MQTT topic prefix {_show(value)}: {problem}; use levels of letters, digits, "
                         "'_', '-' separated by '/', e.g. haloae/line1")
    return prefix


def check_client_id(value: object) -> str:
    """An MQTT client id: 1-128 printable ASCII characters without white space."""
    if not isinstance(value, str) or not 1 <= len(value) <= 128 or not all(0x21 <= ord(c) <= 0x7E for c in value):
        raise ValueError(f"the MQTT client id must be 1-128 printable ASCII characters without spaces "
                         f"(e.g. haloae-line1), got {_show(value)}")
    return value


def check_threshold(value: object, what: str = "threshold", upper: float | None = THRESHOLD_MAX) -> float:
    """A number (not a bool, not text), finite, > 0 and, with ``upper``, <= ``upper``."""
    span = f"in (0, {upper:g}]" if upper is not None else "> 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number {span}, got {_show(value)}")
    x = float(value)
    if not math.isfinite(x) or x <= 0 or (upper is not None and x > upper):
        raise ValueError(f"{what} must be a finite number {span}, got {_show(value)}")
    return x


def parse_decimal(text: str) -> float:
    """``text`` as a plain decimal number (``0.62``, ``.5``, ``3``); ValueError for anything else."""
    if DECIMAL.fullmatch(text) is None:
        raise ValueError(f"not a plain decimal number: {_show(text)} (send digits with an optional '.', e.g. 0.6)")
    return float(text)


def strict_json(text: str, what: str = "JSON") -> object:
    """``json.loads`` that refuses duplicate keys and NaN / Infinity (``json`` takes both)."""
    def pairs(items):
        out = {}
        for key, value in items:
            if key in out:
                raise ValueError(f"{what} has the key {key!r} twice")
            out[key] = value
        return out

    def constant(name):
        raise ValueError(f"{what} holds {name}, which is not JSON; use a finite number")

    return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
