"""The alarm sender: publishes outbox events at QoS 1, in order, and settles each one.

One thread. It keeps a window of events in flight (each tracked by its own paho
``MQTTMessageInfo``, so no message-id bookkeeping races with PUBACKs) and settles every event
with exactly one outcome:

- **delivered**: a PUBACK without error -> deleted from the outbox;
- **refused**: a PUBACK with an MQTT 5 reason code >= 0x80 (``Not authorized``, ``Topic Name
  invalid``, ``Quota exceeded`` ...), or a publish the client cannot make at all (a topic with
  a wildcard or a control character, a packet larger than the broker's Maximum Packet Size)
  -> a dead letter, reported once (``on_dead``), never retried, never blocking the events
  behind it;
- **poison**: a broker that answers an event by dropping the connection (``Malformed Packet``,
  ``Protocol Error``, ``Packet too large`` ...). The events that were in
  flight become suspects and are taken back from paho (which would resend them first at every
  reconnect, for ever); suspects are then sent one at a time, and one that is dropped again
  while alone in flight :data:`POISON_STRIKES` times is a dead letter;
- **transient** (not connected, paho's queue full, a disk that fails): retried, with backoff;
  events in flight stay in paho's session across a reconnect and are resent by paho.

Delivery is at-least-once: a lost PUBACK, a crash between PUBACK and delete, or a suspect
taken back after the broker had it can repeat an event; subscribers drop repeats by
``(id, seq)``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable

from haloae.validate import publish_topic_problem

from .outbox import Outbox, PendingEvent

log = logging.getLogger(__name__)

POISON_STRIKES = 2  # drops while an event was alone in flight before it is a dead letter
# disconnect reason codes that say "that packet of yours" (a broker's DISCONNECT, or paho's reading
# of how the broker closed the socket, e.g. mosquitto's message_size_limit gives 0x82)
MESSAGE_FAULTS = {0x81, 0x82, 0x87, 0x90, 0x93, 0x94, 0x95, 0x99, 0x9A, 0x9B}
REFUSAL_TTL_S = 60.0  # a PUBACK refusal not claimed by an alarm event within this is forgotten
DeadCallback = Callable[[PendingEvent, str, "int | None"], None]


@dataclass
class _Flight:
    event: PendingEvent
    info: object  # paho MQTTMessageInfo
    alone: bool  # nothing else of ours was in flight


class OutboxSender:
    """The thread that publishes outbox events at QoS 1 and settles them (see the module doc).

    ``client`` is an :class:`~haloae.edge.mqtt_client.MqttClient`. Route its publish results
    to :meth:`on_publish` and its connect / disconnect hooks to :meth:`wake`; call :meth:`wake`
    after :meth:`Outbox.add`.
    """

    def __init__(self, outbox: Outbox, client, window: int = 16, on_dead: DeadCallback | None = None):
        self.outbox, self.client, self.window, self.on_dead = outbox, client, window, on_dead
        self._inflight: dict[int, _Flight] = {}
        self._suspects: dict[int, int] = {}  # seq -> strikes while alone in flight
        self._refusals: dict[int, tuple[object, float]] = {}  # mid -> (reason code, monotonic time)
        self._refusal_lock = threading.Lock()
        self._seen_drop = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="haloae-outbox", daemon=True)
        self._failures = 0
        self._retry_at = 0.0
        self.delivered = 0
        self.dead = 0

    # -- API ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def wake(self) -> None:
        self._wake.set()

    def on_publish(self, mid: int, reason_code) -> None:
        """From paho's thread, before the message counts as published: remember refusals."""
        if getattr(reason_code, "is_failure", False):
            with self._refusal_lock:
                self._refusals[mid] = (reason_code, time.monotonic())
        self._wake.set()

    def idle(self) -> bool:
        """True when nothing waits in the outbox or in flight."""
        return not self._inflight and len(self.outbox) == 0

    def flush(self, timeout: float) -> bool:
        """Wait until every event is settled (True) or ``timeout`` passes (False)."""
        deadline = time.monotonic() + timeout
        while not self.idle():
            if time.monotonic() >= deadline or not self._thread.is_alive():
                return False
            self.wake()
            time.sleep(0.02)
        return True

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    # -- loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if time.monotonic() < self._retry_at:
                continue
            try:
                self._step()
                self._failures = 0
            except Exception:  # noqa: BLE001 - the alarm path must not die: back off, retry
                self._failures += 1
                delay = min(0.5 * 2 ** self._failures, 30.0)
                self._retry_at = time.monotonic() + delay
                if self._failures == 1:
                    log.exception("alarm sender failed; retrying with backoff up to 30 s")
                else:
                    log.debug("alarm sender failed again (%d in a row); next try in %.1f s", self._failures, delay,
                              exc_info=True)

    def _step(self) -> None:
        self._settle()
        self._take_back_after_drop()
        self.outbox.maintain(self._inflight)
        if not self.client.connected:
            return
        window = 1 if self._suspects else self.window
        room = window - len(self._inflight)
        if room <= 0:
            return
        for ev in self.outbox.pending(limit=room, exclude=self._inflight):
            problem = self._unsendable(ev)
            if problem:
                self._dead(ev, problem, None)
                self._wake.set()  # the next ones go on the next turn
                continue
            try:
                info = self.client.publish(ev.topic, ev.payload, qos=1, retain=False)
            except ValueError as err:  # paho refuses the topic or the payload
                self._dead(ev, f"the MQTT client cannot publish it: {err}", None)
                self._wake.set()
                continue
            if info is None:  # paho's queue is full: transient, retry shortly
                self._retry_at = time.monotonic() + 0.5
                break
            self._inflight[ev.seq] = _Flight(ev, info, alone=not self._inflight)

    def _unsendable(self, ev: PendingEvent) -> str | None:
        problem = publish_topic_problem(ev.topic)
        if problem:
            return f"no broker takes the topic {ev.topic!r}: {problem}"
        limit = self.client.max_packet_size
        size = len(ev.topic.encode("utf-8", "replace")) + len(ev.payload) + 16  # + fixed header, ids, props
        if limit and size > limit:
            return f"the broker takes packets of at most {limit} bytes and this event needs {size}"
        return None

    def _settle(self) -> None:
        done = []
        now = time.monotonic()
        for seq, f in list(self._inflight.items()):
            if not self.client.acknowledged(f.info):
                continue
            del self._inflight[seq]
            with self._refusal_lock:
                refusal = self._refusals.pop(f.info.mid, None)
            self._suspects.pop(seq, None)
            if refusal is not None and now - refusal[1] < REFUSAL_TTL_S:
                code = refusal[0]
                self._dead(f.event, f"the broker refused it: {code} (0x{int(code.value):02X})", int(code.value))
            else:
                done.append(seq)
        if done:
            self.outbox.delete(done)
            self.delivered += len(done)
        with self._refusal_lock:  # refusals of other messages (status, errors) are not ours
            for mid in [m for m, (_, t) in self._refusals.items() if now - t >= REFUSAL_TTL_S]:
                del self._refusals[mid]

    def _take_back_after_drop(self) -> None:
        """A broker that dropped the connection because of a packet: take the events that were
        in flight back from paho and send them one at a time until the culprit is found."""
        drop = self.client.last_drop
        if drop is None or drop.connection == self._seen_drop:
            return
        self._seen_drop = drop.connection
        if drop.code not in MESSAGE_FAULTS:  # a plain lost connection (0x80), a takeover, a shutdown
            return
        # everything not acknowledged: paho resends all of it first at every reconnect, whichever
        # connection it was first written to
        blamed = {seq: f for seq, f in self._inflight.items() if not self.client.acknowledged(f.info)}
        if not blamed:
            return
        solo = len(blamed) == 1
        for seq, f in blamed.items():
            self.client.forget(f.info)
            del self._inflight[seq]
            strikes = self._suspects.get(seq, 0) + (1 if solo and f.alone else 0)
            self._suspects[seq] = strikes
            if strikes >= POISON_STRIKES:
                self._suspects.pop(seq)
                self._dead(f.event, f"the broker dropped the connection each time it was sent ({strikes} times, "
                           f"DISCONNECT {drop.reason} (0x{drop.code:02X}))", drop.code)
        log.warning("MQTT: the broker dropped the connection (%s, 0x%02X) with %d alarm event(s) in flight; "
                    "sending them one at a time to find the one it refuses", drop.reason, drop.code, len(blamed))

    def _dead(self, ev: PendingEvent, reason: str, code: int | None) -> None:
        self.outbox.dead_letter(ev, reason)
        self.dead += 1
        if self.on_dead is not None:
            try:
                self.on_dead(ev, reason, code)
            except Exception:  # noqa: BLE001 - reporting must not stop delivery
                log.exception("reporting a dead letter failed")
