"""What goes through the publisher's queues (edge/publish.py): one small dataclass per kind.

The daemon's threads submit these; the publisher's encoder thread handles them one at a time,
in order (``Publisher._handle``). Results wait in their own bounded queue (dropped and counted
when it is full); everything else is never dropped.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Retained:
    """A retained QoS 1 message; kept and published again on every reconnect."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class Live:
    """Live data (the score sensor): published only while connected, not kept."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True)
class Stats:
    """The daemon's stats; the publisher adds its own counters and publishes ``<prefix>/stats``."""

    doc: dict[str, Any]


@dataclass(frozen=True)
class ErrorReport:
    """One encoded ``<prefix>/error`` document (QoS 1: paho keeps it while disconnected)."""

    payload: bytes


@dataclass(frozen=True)
class Connected:
    """The MQTT client (re)connected: publish every retained message again."""


@dataclass
class Reply:
    """How a caller waiting on a :class:`SetRequest` learns its fate: ``error`` None = applied."""

    error: str | None = "the publisher did not handle it in time"
    done: threading.Event = field(default_factory=threading.Event)

    def settle(self, error: str | None) -> None:
        self.error = error
        self.done.set()


@dataclass(frozen=True)
class SetRequest:
    """A ``<setting>/set`` or command topic (``size``: the payload's full length, ``payload`` may be
    cut); ``reply`` when someone waits for it (the live view), None from MQTT."""

    topic: str
    payload: bytes
    size: int
    reply: Reply | None = None


@dataclass(frozen=True)
class ResultItem:
    """One scored frame (:class:`~haloae.edge.frames.FrameResult`) and the alarm it belongs to."""

    result: Any
    alarm_id: str | None


Item = Retained | Live | Stats | ErrorReport | Connected | SetRequest | ResultItem
