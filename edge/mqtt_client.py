"""A small wrapper around paho-mqtt 2.x (VERSION2 callbacks, MQTT 5 or 3.1.1).

It owns one paho ``Client`` (wrapped, not subclassed): ``connect_async`` + ``loop_start``
(paho's network thread reconnects with exponential backoff from ``mqtt.reconnect_min_s`` to
``mqtt.reconnect_max_s``), the last will ``<prefix>/available`` = ``offline`` (QoS 1,
retained), ``online`` published on every connect, subscriptions renewed inside ``on_connect``,
TLS and credentials.

- A refused connection is reported as refused, with the reason code and what to fix, once per
  change of reason (repeats go to DEBUG), never as "connected".
- A connection that was working and is lost is retried at least every :data:`FAST_RETRY_S`
  for its first :data:`FAST_WINDOW_S` (a broker restart costs seconds, not the 30 s of a full
  backoff); after that the normal backoff applies.
- Another client with the same client id (a second daemon with the same node) is detected and
  reported (``edge/mqtt_health.py``).
- ``publish`` refuses, with ``ValueError``, a topic no broker takes (wildcards, control
  characters: mosquitto drops the connection over those), so it never reaches the wire.
- A publish the broker refuses (MQTT 5 PUBACK reason code >= 0x80) is logged once per topic and
  reason, and reported to ``on_publish(mid, reason_code)`` (the alarm sender dead-letters it).
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
import time
from typing import Callable, Sequence

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from haloae.validate import publish_topic_problem

from . import topics
from .config import MqttConfig
from .mqtt_health import Drop, TakeoverWatch, code_of, refusal_hint

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, bool], None]  # (topic, payload, retained)
FAST_RETRY_S = 2.0
FAST_WINDOW_S = 300.0


class MqttClient:
    """One MQTT connection of the daemon.

    Hooks run on paho's network thread, keep them short: ``on_message(topic, payload,
    retained)``, ``on_connect()``, ``on_disconnect()``, ``on_publish(mid, reason_code)`` and
    ``on_duplicate(text)`` (another client uses our client id).
    """

    def __init__(self, cfg: MqttConfig, prefix: str, client_id: str, *, subscriptions: Sequence[str] = (),
                 on_message: MessageHandler | None = None, on_connect: Callable[[], None] | None = None,
                 on_publish: Callable[[int, object], None] | None = None,
                 on_disconnect: Callable[[], None] | None = None,
                 on_duplicate: Callable[[str], None] | None = None, max_queued: int = 10000):
        self.cfg, self.prefix, self.client_id = cfg, prefix.rstrip("/"), client_id
        self.available_topic = topics.available(self.prefix)
        self._subscriptions = list(subscriptions)
        self._on_message_cb, self._on_connect_cb, self._on_publish_cb = on_message, on_connect, on_publish
        self._on_disconnect_cb, self._on_duplicate_cb = on_disconnect, on_duplicate
        self._connected = threading.Event()
        self._stopping = False
        self._last_problem: str | None = None
        self._refused_publish: set[tuple[str, int]] = set()
        self._topics: dict[int, str] = {}  # mid -> topic of QoS > 0 messages awaiting their PUBACK
        self._takeover = TakeoverWatch()
        self._fast_until: float | None = None  # fast retries of a lost working connection
        self.connects = 0       # successful connections so far
        self.attempts_failed = 0
        self.takeovers = 0      # times another client with our id was detected
        self.last_drop: Drop | None = None
        self.max_packet_size: int | None = None  # the broker's Maximum Packet Size (MQTT 5 CONNACK)
        v5 = cfg.protocol == "5"
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                                   **({} if v5 else {"clean_session": True}))
        c = self._client
        c.on_connect, c.on_disconnect = self._handle_connect, self._handle_disconnect
        c.on_connect_fail = self._handle_connect_fail
        c.on_message, c.on_publish = self._handle_message, self._handle_publish
        self._normal_backoff()
        c.max_queued_messages_set(max_queued)
        c.will_set(self.available_topic, "offline", qos=1, retain=True)
        password = cfg.password() or None
        if cfg.username is not None:
            c.username_pw_set(cfg.username, password)
        elif password:
            log.warning("an MQTT password is set but mqtt.username is not: the password is not used")
        if cfg.tls is not None:
            c.tls_set(ca_certs=str(cfg.tls.ca), certfile=str(cfg.tls.cert) if cfg.tls.cert else None,
                      keyfile=str(cfg.tls.key) if cfg.tls.key else None, cert_reqs=ssl.CERT_REQUIRED,
                      tls_version=ssl.PROTOCOL_TLS_CLIENT)
            c.tls_insecure_set(cfg.tls.insecure)

    # --- public API -------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def start(self) -> None:
        """Connect in the background; returns at once (the broker may still be down)."""
        scheme = "mqtts" if self.cfg.tls else "mqtt"
        log.info("MQTT: connecting to %s://%s:%d as %s (protocol %s, prefix %s)", scheme, self.cfg.host,
                 self.cfg.port, self.client_id, self.cfg.protocol, self.prefix)
        self._client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self._client.loop_start()

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False,
                user_properties: list[tuple[str, str]] | None = None):
        """Queue one message; returns paho's ``MQTTMessageInfo``, or None when paho refused it
        (its queue is full). QoS 1/2 messages published while disconnected are kept by paho and
        sent on reconnect; QoS 0 ones are dropped. ``ValueError`` for a topic no broker takes.
        ``user_properties`` (MQTT 5 only; ignored with 3.1.1) travel with the message."""
        problem = publish_topic_problem(topic)
        if problem:
            raise ValueError(f"cannot publish to {topic!r}: {problem}")
        props = None
        if user_properties and self.cfg.protocol == "5":
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = list(user_properties)
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            return None
        if info.rc == MQTTErrorCode.MQTT_ERR_PAYLOAD_SIZE:
            raise ValueError(f"cannot publish {len(payload)} bytes to {topic!r}: larger than MQTT allows")
        if qos > 0:
            self._topics[info.mid] = topic  # for the refusal log line; popped at its PUBACK
            if len(self._topics) > 20000:  # PUBACKs that never came (or raced this line): forget the oldest
                for mid in list(self._topics)[:10000]:
                    self._topics.pop(mid, None)
        return info

    @staticmethod
    def acknowledged(info) -> bool:
        """Whether the broker acknowledged this QoS 1 message. Unlike paho's ``is_published``, it
        does not raise for a message queued while disconnected (``rc`` NO_CONN): paho keeps and
        sends such a message at the reconnect and marks it published at its PUBACK."""
        with info._condition:
            return bool(info._published)

    def forget(self, info) -> None:
        """Take a QoS 1 message back from paho's session so that it is not resent at reconnect
        (the alarm sender does this for events the broker drops the connection over). Uses
        paho's private queue: paho 2.x recounts its in-flight messages at every reconnect."""
        c = self._client
        with c._out_message_mutex:
            c._out_messages.pop(info.mid, None)
        self._topics.pop(info.mid, None)

    def stop(self, timeout: float = 2.0, final: str | None = "offline") -> None:
        """Publish ``available`` = ``final`` (retained, QoS 1) when connected, wait for its
        PUBACK, disconnect (no last will) and stop the network thread, all within ``timeout``."""
        deadline = time.monotonic() + timeout
        self._stopping = True
        if final is not None and self.connected:
            info = self._client.publish(self.available_topic, final, qos=1, retain=True)
            try:
                info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            except (RuntimeError, ValueError):
                pass  # lost the connection meanwhile: the broker sends the last will instead
        self._client.disconnect()
        stopper = threading.Thread(target=self._client.loop_stop, daemon=True)
        stopper.start()
        stopper.join(max(0.1, deadline - time.monotonic()))
        self._connected.clear()

    # --- backoff ----------------------------------------------------------------------------
    def _normal_backoff(self) -> None:
        self._fast_until = None
        self._client.reconnect_delay_set(self.cfg.reconnect_min_s, max(self.cfg.reconnect_min_s,
                                                                       self.cfg.reconnect_max_s))

    def _fast_backoff(self) -> None:
        self._fast_until = time.monotonic() + FAST_WINDOW_S
        self._client.reconnect_delay_set(self.cfg.reconnect_min_s, min(FAST_RETRY_S, max(
            self.cfg.reconnect_min_s, self.cfg.reconnect_max_s)))

    def _after_failed_attempt(self) -> None:
        self.attempts_failed += 1
        self._takeover.reconnect_failed()
        if self._fast_until is not None and time.monotonic() > self._fast_until:
            self._normal_backoff()

    # --- paho callbacks (network thread) ----------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connected.clear()
            self._after_failed_attempt()
            code = code_of(reason_code)
            self._problem(f"MQTT broker {self.cfg.host}:{self.cfg.port} refused the connection: {reason_code} "
                          f"(reason code 0x{code:02X}; {refusal_hint(code, self.prefix)}); retrying with backoff "
                          f"up to {self.cfg.reconnect_max_s:g} s")
            return
        self.connects += 1
        self._last_problem = None
        self.max_packet_size = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        log.info("MQTT: connected to %s:%d%s", self.cfg.host, self.cfg.port,
                 " (session resumed)" if flags.session_present else "")
        if self._takeover.reconnected():
            self._duplicate("the broker closed this client's working connection "
                            f"{self._takeover.drops} times within {self._takeover.window_s:g} s and took it back at "
                            "once each time")
        client.publish(self.available_topic, "online", qos=1, retain=True)
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()
        if self._on_connect_cb:
            self._on_connect_cb()

    def _handle_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its ``except OSError`` block: the exception is still current.
        err = sys.exc_info()[1]
        self._after_failed_attempt()
        what = f"{type(err).__name__}: {err}" if err else "connection failed"
        hint = ("check mqtt.tls.ca and the broker's certificate" if isinstance(err, ssl.SSLError)
                else "is the broker running and reachable?")
        self._problem(f"MQTT broker {self.cfg.host}:{self.cfg.port} unreachable ({what}; {hint}); "
                      f"retrying with backoff up to {self.cfg.reconnect_max_s:g} s")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and self._stopping:
            log.info("MQTT: disconnected from %s:%d", self.cfg.host, self.cfg.port)
        elif was:
            code = code_of(reason_code)
            from_server = bool(getattr(flags, "is_disconnect_packet_from_server", False))
            self.last_drop = Drop(self.connects, code, str(reason_code), from_server, time.monotonic())
            # a takeover is a closed socket (0x80) or "Session taken over" (0x8E); a broker that
            # drops us over a packet (0x81, 0x82, 0x95 ...) is the alarm sender's business
            taken = self._takeover.lost(code) if code in (0x80, 0x8E) else False
            self._fast_backoff()
            said = f"the broker said {reason_code} (0x{code:02X})" if from_server else f"{reason_code}"
            log.warning("MQTT: disconnected from %s:%d (%s); reconnecting, alarm events wait in the outbox",
                        self.cfg.host, self.cfg.port, said)
            if taken:
                self._duplicate("the broker says the session was taken over (0x8E)")
        if self._on_disconnect_cb:
            self._on_disconnect_cb()

    def _duplicate(self, why: str) -> None:
        self.takeovers += 1
        text = (f"duplicate node: another MQTT client uses the client id {self.client_id!r} on "
                f"{self.cfg.host}:{self.cfg.port} ({why}); two daemons with the same node (or mqtt.client_id) "
                "take the connection from each other: give each daemon its own node / mqtt.client_id")
        if self.takeovers == 1 or self.takeovers % 100 == 0:
            log.error("MQTT: %s", text)
        else:
            log.debug("MQTT: %s", text)
        if self._on_duplicate_cb:
            self._on_duplicate_cb(text)

    def _handle_message(self, client, userdata, msg) -> None:
        if self._on_message_cb:
            try:
                self._on_message_cb(msg.topic, msg.payload, bool(msg.retain))
            except Exception:
                log.exception("MQTT: handler for %s failed", msg.topic)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        topic = self._topics.pop(mid, "?")
        if reason_code.is_failure:
            code = code_of(reason_code)
            key = (topic, code)
            line = (f"MQTT: the broker refused a publish to {topic}: {reason_code} (reason code 0x{code:02X}; "
                    f"{refusal_hint(code, self.prefix)})")
            if key not in self._refused_publish:
                self._refused_publish.add(key)
                log.warning("%s", line)
            else:
                log.debug("%s", line)
        if self._on_publish_cb:
            self._on_publish_cb(mid, reason_code)

    def _problem(self, line: str) -> None:
        """Log a connection problem once per distinct cause; repeats go to DEBUG (no log flood)."""
        key = line.split(";")[0]
        if key != self._last_problem:
            log.error("%s", line)
            self._last_problem = key
        else:
            log.debug("%s", line)
