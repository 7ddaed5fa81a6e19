"""What the broker's answers mean and what to do about them (used by ``edge/mqtt_client.py``).

- :func:`refusal_hint`: for a CONNACK or PUBACK reason code, the fix a user can make.
- :class:`Drop`: the last lost connection (which one, reason code, whether the broker sent a
  DISCONNECT), read by the alarm sender to spot a packet the broker refuses.
- :class:`TakeoverWatch`: another client with our client id. A broker gives a connection's
  client id to the newest client and closes the older connection (MQTT 5 brokers may say
  ``Session taken over``, 0x8E; mosquitto 2.0 just closes the socket). Two daemons with the
  same node then take it from each other at every reconnect. The watch calls it a duplicate
  node on 0x8E, or when a working connection was lost :data:`TAKEOVER_DROPS` times within
  :data:`TAKEOVER_WINDOW_S` and each time the broker took us back at once (a broker that is
  down or unreachable refuses the reconnect; a duplicate never does).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from . import topics

TAKEOVER_DROPS = 3
TAKEOVER_WINDOW_S = 60.0
SESSION_TAKEN_OVER = 0x8E

_CREDENTIALS = "check mqtt.username and the password in $HALOAE_MQTT_PASSWORD / $CREDENTIALS_DIRECTORY/mqtt_password"
_HINTS = {
    0x80: "check the broker's log",
    0x81: "the broker could not parse our packet; check the broker's log, or set mqtt.protocol to '3.1.1'",
    0x82: "protocol error; check the broker's log, or set mqtt.protocol to '3.1.1'",
    0x84: "set mqtt.protocol to '3.1.1' for this broker",
    0x85: "the broker refuses this client id: set mqtt.client_id to letters and digits (at most 23 for strict "
          "MQTT 3.1.1 brokers), or another client may use it",
    0x86: _CREDENTIALS,
    0x87: _CREDENTIALS + ", and the broker's ACL",
    0x88: "the broker is up but not accepting connections; check its log",
    0x89: "the broker is busy; it is retried with backoff, check its load",
    0x8A: "the broker has banned this client; check its configuration",
    0x8C: "the broker wants another authentication method (certificates? mqtt.tls.cert / key)",
    0x90: "the broker refuses the topic; check mqtt.prefix and the camera ids",
    0x95: "the message is larger than the broker allows (its max_packet_size / message_size_limit)",
    0x97: "the broker's quota for this client is exhausted; check its limits",
    0x99: "the broker refuses the payload format",
    0x9C: "the broker redirects clients: set mqtt.host to the server it names",
    0x9D: "the broker has moved: set mqtt.host to its new address",
    0x9F: "the broker limits the connection rate; it is retried with backoff",
}


def refusal_hint(code: int, prefix: str = "") -> str:
    """What to do about reason code ``code`` (``prefix``: the daemon's topic prefix, for ACL hints)."""
    if code == 0x87 and prefix:
        return _HINTS[0x87] + f" (the daemon needs readwrite {topics.everything(prefix)})"
    return _HINTS.get(code, "check the broker's log")


def code_of(reason_code) -> int:
    """The numeric value of a paho ``ReasonCode`` (or an int)."""
    return int(getattr(reason_code, "value", reason_code))


@dataclass(frozen=True)
class Drop:
    """A working connection that was lost (not by us)."""

    connection: int  # MqttClient.connects of the connection that was lost
    code: int  # reason code (0x80 "Unspecified error" when the socket just closed)
    reason: str
    from_server: bool  # the broker sent a DISCONNECT packet (MQTT 5)
    at: float  # time.monotonic()


class TakeoverWatch:
    """Spots a second client with the same client id (see the module doc). Not thread-safe:
    paho's network thread is its only caller."""

    def __init__(self, drops: int = TAKEOVER_DROPS, window_s: float = TAKEOVER_WINDOW_S):
        self.drops, self.window_s = drops, window_s
        self._quick: deque[float] = deque()
        self._lost_at: float | None = None  # a working connection was lost, no failed reconnect since
        self.suspected = 0  # times a duplicate was reported

    def lost(self, code: int, now: float | None = None) -> bool:
        """A working connection was lost; True when the broker said ``Session taken over``."""
        self._lost_at = time.monotonic() if now is None else now
        return code == SESSION_TAKEN_OVER

    def reconnect_failed(self) -> None:
        self._lost_at = None  # the broker is away: an outage, not a takeover

    def reconnected(self, now: float | None = None) -> bool:
        """A connect succeeded; True when the drops look like a duplicate client id."""
        now = time.monotonic() if now is None else now
        if self._lost_at is None:
            return False
        self._lost_at = None
        self._quick.append(now)
        while self._quick and now - self._quick[0] > self.window_s:
            self._quick.popleft()
        if len(self._quick) >= self.drops:
            self._quick.clear()
            return True
        return False
