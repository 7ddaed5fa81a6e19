"""A small wrapper around paho-mqtt 2.x (VERSION2 callbacks, MQTT 5 or 3.1.1).

It owns one paho ``Client`` (wrapped, not subclassed): ``connect_async`` + ``loop_start``
(paho's network thread reconnects with exponential backoff from ``mqtt.reconnect_min_s`` to
``mqtt.reconnect_max_s``), the last will ``<prefix>/available`` = ``offline`` (QoS 1,
retained), ``online`` published on every connect, subscriptions renewed inside ``on_connect``,
TLS and credentials. A refused connection is reported as refused, with the broker's reason
and what to check, once per change of reason (repeats go to DEBUG), never as "connected".
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

from .config import MqttConfig

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, bool], None]  # (topic, payload, retained)

_CREDENTIALS = "check mqtt.username and the password in $HALOAE_MQTT_PASSWORD / $CREDENTIALS_DIRECTORY/mqtt_password"
_HINTS = {
    "not authorized": _CREDENTIALS + ", and the broker's ACL",
    "bad user name or password": _CREDENTIALS,
    "client identifier not valid": "another client may use the same mqtt.client_id, or the broker restricts client ids",
    "unsupported protocol version": "set mqtt.protocol to '3.1.1' for this broker",
    "server unavailable": "the broker is up but not accepting connections; check its log",
}


def _hint(reason: str) -> str:
    return next((h for k, h in _HINTS.items() if k in reason.lower()), "check the broker's log")


class MqttClient:
    """One MQTT connection of the daemon.

    ``on_message(topic, payload, retained)``, ``on_connect()`` and ``on_publish()`` run on
    paho's network thread: keep them short (hand work to another thread).
    """

    def __init__(self, cfg: MqttConfig, prefix: str, client_id: str, *, subscriptions: Sequence[str] = (),
                 on_message: MessageHandler | None = None, on_connect: Callable[[], None] | None = None,
                 on_publish: Callable[[], None] | None = None, max_queued: int = 10000):
        self.cfg, self.prefix, self.client_id = cfg, prefix.rstrip("/"), client_id
        self.available_topic = f"{self.prefix}/available"
        self._subscriptions = list(subscriptions)
        self._on_message_cb, self._on_connect_cb, self._on_publish_cb = on_message, on_connect, on_publish
        self._connected = threading.Event()
        self._last_problem: str | None = None
        self.connects = 0       # successful connections so far
        self.attempts_failed = 0
        v5 = cfg.protocol == "5"
        self._client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                   protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
                                   **({} if v5 else {"clean_session": True}))
        c = self._client
        c.on_connect, c.on_disconnect = self._handle_connect, self._handle_disconnect
        c.on_connect_fail = self._handle_connect_fail
        c.on_message, c.on_publish = self._handle_message, self._handle_publish
        c.reconnect_delay_set(cfg.reconnect_min_s, max(cfg.reconnect_min_s, cfg.reconnect_max_s))
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

    def publish(self, topic: str, payload: bytes | str, qos: int = 0, retain: bool = False):
        """Queue one message; returns paho's ``MQTTMessageInfo``, or None when paho refused it
        (its queue is full). QoS 1/2 messages published while disconnected are kept by paho and
        sent on reconnect; QoS 0 ones are dropped."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            return None
        return info

    def stop(self, timeout: float = 2.0, final: str | None = "stopped") -> None:
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

    # --- paho callbacks (network thread) ----------------------------------------------------
    def _handle_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._connected.clear()
            self.attempts_failed += 1
            self._problem(f"MQTT broker {self.cfg.host}:{self.cfg.port} refused the connection: {reason_code} "
                          f"({_hint(str(reason_code))}); retrying with backoff up to {self.cfg.reconnect_max_s:g} s")
            return
        self.connects += 1
        self._last_problem = None
        log.info("MQTT: connected to %s:%d%s", self.cfg.host, self.cfg.port,
                 " (session resumed)" if flags.session_present else "")
        client.publish(self.available_topic, "online", qos=1, retain=True)
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()
        if self._on_connect_cb:
            self._on_connect_cb()

    def _handle_connect_fail(self, client, userdata) -> None:
        # paho calls this inside its ``except OSError`` block: the exception is still current.
        err = sys.exc_info()[1]
        self.attempts_failed += 1
        what = f"{type(err).__name__}: {err}" if err else "connection failed"
        hint = ("check mqtt.tls.ca and the broker's certificate" if isinstance(err, ssl.SSLError)
                else "is the broker running and reachable?")
        self._problem(f"MQTT broker {self.cfg.host}:{self.cfg.port} unreachable ({what}; {hint}); "
                      f"retrying with backoff up to {self.cfg.reconnect_max_s:g} s")

    def _handle_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        was = self._connected.is_set()
        self._connected.clear()
        if was and getattr(self, "_stopping", False):
            log.info("MQTT: disconnected from %s:%d", self.cfg.host, self.cfg.port)
        elif was:
            log.warning("MQTT: disconnected from %s:%d (%s); reconnecting, alarm events wait in the outbox",
                        self.cfg.host, self.cfg.port, reason_code)

    def _handle_message(self, client, userdata, msg) -> None:
        if self._on_message_cb:
            try:
                self._on_message_cb(msg.topic, msg.payload, bool(msg.retain))
            except Exception:
                log.exception("MQTT: handler for %s failed", msg.topic)

    def _handle_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if reason_code.is_failure:
            log.warning("MQTT: the broker rejected message %d: %s (check that its ACL lets this client publish "
                        "to %s/#)", mid, reason_code, self.prefix)
        if self._on_publish_cb:
            self._on_publish_cb()

    def _problem(self, line: str) -> None:
        """Log a connection problem once per distinct cause; repeats go to DEBUG (no log flood)."""
        key = line.split(";")[0]
        if key != self._last_problem:
            log.error("%s", line)
            self._last_problem = key
        else:
            log.debug("%s", line)
