"""Helpers for the MQTT tests: a collecting subscriber, a daemon config and fake-free results."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from haloae.edge.config import EdgeConfig, parse_config
from haloae.edge.frames import FrameResult


class Subscriber:
    """A real paho subscriber that records (topic, payload, retain) of every message."""

    def __init__(self, port: int, topics: list[str], client_id: str = "", persistent: bool = False,
                 username: str | None = None, password: str | None = None, tls_ca: Path | None = None,
                 tls_cert: Path | None = None, tls_key: Path | None = None, qos: int = 1, mqtt5: bool = False):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.times: list[float] = []  # monotonic arrival time of each message
        self.properties: list[dict] = []  # MQTT 5 user properties of each message (3.1.1: empty)
        self.refused: list[str] = []
        self._cv = threading.Condition()
        self._topics, self._qos = topics, qos
        self.subscribed = threading.Event()
        # 3.1.1 with clean_session=False: the broker keeps the session (and queued QoS 1
        # messages) while this client, or the broker itself, is down.
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311,
                                  **({} if mqtt5 else {"clean_session": not persistent}))
        if username:
            self.client.username_pw_set(username, password)
        if tls_ca:
            self.client.tls_set(ca_certs=str(tls_ca), certfile=str(tls_cert) if tls_cert else None,
                                keyfile=str(tls_key) if tls_key else None)
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            self.refused.append(str(reason))
            return
        client.subscribe([(t, self._qos) for t in self._topics])

    def _on_message(self, client, userdata, msg):
        with self._cv:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self.times.append(time.monotonic())
            self.properties.append(dict(getattr(msg.properties, "UserProperty", None) or []))
            self._cv.notify_all()

    def wait_subscribed(self, timeout: float = 10.0) -> None:
        assert self.subscribed.wait(timeout), "the test subscriber did not subscribe"

    def wait_for(self, pred, timeout: float = 10.0) -> list[tuple[str, bytes, bool]]:
        """Wait until ``pred(messages)`` is true; returns the messages (raises on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while not pred(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout} s; got {[(t, p[:80]) for t, p, _ in self.messages]}")
                self._cv.wait(left)
            return list(self.messages)

    def on(self, topic: str) -> list[bytes]:
        with self._cv:
            return [p for t, p, _ in self.messages if t == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def edge_config(tmp_path: Path, port: int, **sections) -> EdgeConfig:
    """A daemon config for tests: one or more cameras, fast reconnects, no ZeroMQ PUB."""
    data = {"node": "n1", "state_dir": str(tmp_path / "state"),
            "cameras": [{"id": "cam0", "source": "synthetic"}, {"id": "cam1", "source": "synthetic"}],
            "model": {"bundle": str(tmp_path / "bundle")},
            "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.2, "reconnect_max_s": 1.0, "keepalive": 10},
            "publish": {"zmq_pub": None},
            "alarms": {"n": 2, "m": 3, "clear_frames": 2, "update_interval_s": 60}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(data)


def make_result(camera: str = "cam0", frame_id: int = 0, anomalous: bool = False, size: tuple[int, int] = (96, 64),
                blob: tuple[int, int, int, int] | None = None, map_size: int = 32) -> FrameResult:
    """A FrameResult for a ``size`` = (width, height) frame; ``blob`` = x, y, w, h (frame pixels)
    marks a defect: the map is 0.9 there and 0.1 elsewhere (pixel threshold 0.5)."""
    w, h = size
    frame = np.full((h, w, 3), 128, np.uint8)
    full = np.full((h, w), 0.1, np.float32)
    if blob:
        x, y, bw, bh = blob
        full[y:y + bh, x:x + bw] = 0.9
        frame[y:y + bh, x:x + bw] = (200, 30, 30)
    import cv2
    amap = cv2.resize(full, (map_size, map_size), interpolation=cv2.INTER_AREA)
    score = 0.9 if anomalous else 0.2
    return FrameResult(camera=camera, frame_id=frame_id, timestamp=time.time(), score=score, threshold=0.5,
                       pixel_threshold=0.5, anomalous=anomalous, anomaly_map=amap, frame=frame,
                       latency_ms={"capture": 1.0, "queue": 0.5, "inference": 10.0, "total": 12.0}, model_id="m1")
