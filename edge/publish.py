"""The publisher: topic layout, payloads (schema version ``v``), alarms, settings topics.

The inference worker calls :meth:`Publisher.publish_result` for every scored frame. That call
runs the alarm decision path (``edge/decisions.py``: debounce, then the event is committed to
the on-disk outbox before the call returns) and appends the result to a bounded queue; one
encoder thread does the slow rest (mask at frame resolution, regions, PNG/JPEG encoding, MQTT,
the local ZeroMQ PUB, evidence files). When that queue is full the result is dropped and
counted; alarm events are never dropped: the sender thread (``edge/delivery.py``) publishes
them at QoS 1 and settles each one (delivered, or a dead letter reported once on
``<prefix>/error``). Topics and payloads are documented in ``docs/mqtt.md``.

Also here: the retained alarm state ``<prefix>/<camera>/alarm/state`` (``OFF`` at every start
and clean stop, ``ON`` from an alarm's ``start`` to its ``end``), Home Assistant discovery and
its score / defect-image topics (``edge/homeassistant.py``), and the clean stop: every camera's
``status`` goes ``offline`` with ``"daemon": "stopped"``, then ``available`` = ``offline``.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from . import regions, topics
from .alarms import SCHEMA_VERSION, iso_utc
from .commands import MAX_COMMAND_BYTES
from .config import EdgeConfig, inside_dir
from .decisions import AlarmDesk
from .delivery import OutboxSender
from .evidence import EvidenceStore
from .homeassistant import HomeAssistant
from .mqtt_client import MqttClient
from .outbox import Outbox, PendingEvent
from .payloads import dumps as _dumps
from .payloads import result_payload, state_text, status_doc
from .publish_items import Connected, ErrorReport, Item, Live, Reply, ResultItem, Retained, SetRequest, Stats
from .publish_settings import CommandCallback, SetDesk, SettingCallback
from .settings import MAX_SETTING_BYTES

log = logging.getLogger(__name__)


class Publisher:
    """MQTT + ZeroMQ + evidence for the daemon. Thread-safe; see docs/mqtt.md for topics.

    ``on_setting(camera | None, setting, value)`` is called on the publisher's thread for a
    validated ``set`` message (camera None = all cameras); raise ValueError to reject it.
    ``on_command(camera | None, name, payload)`` likewise for a command topic
    (``edge/commands.py``: ``model/set``, ``<camera>/feedback/set``).
    """

    def __init__(self, cfg: EdgeConfig, state_dir: Path, on_setting: SettingCallback | None = None,
                 on_command: CommandCallback | None = None):
        self.cfg, self.node, self.prefix = cfg, cfg.node, cfg.prefix
        self.cameras = [c.id for c in cfg.cameras]
        self.on_published: Callable[[Any, float], None] | None = None  # (result, capture→publish s): metrics
        self.ha = HomeAssistant(cfg.homeassistant, self.node, self.prefix, self.cameras) \
            if cfg.homeassistant.enabled else None
        state_dir = Path(state_dir)
        self.outbox = Outbox(inside_dir(state_dir, Path("outbox.sqlite")), cfg.alarms.outbox_max_events)
        self.client = MqttClient(cfg.mqtt, self.prefix, cfg.mqtt.client_id or f"haloae-{self.node}",
                                 subscriptions=topics.set_subscriptions(self.prefix)
                                 + ([self.ha.birth_topic] if self.ha else []),
                                 on_message=self._on_mqtt_message, on_connect=self._on_connect,
                                 on_publish=lambda mid, rc: self.sender.on_publish(mid, rc),
                                 on_disconnect=lambda: self.sender.wake(), on_duplicate=self._on_duplicate)
        self.sender = OutboxSender(self.outbox, self.client, on_dead=self._on_dead_letter)
        self.alarms = AlarmDesk(self.node, self.prefix, cfg.alarms, self.outbox, self.sender.wake,
                                on_state=self.set_alarm_state)
        self.evidence = (EvidenceStore(inside_dir(state_dir, cfg.evidence.dir), int(cfg.evidence.quota_mb * 1e6))
                         if cfg.evidence.enabled else None)
        self._last_status: dict[str, Any] = {}
        self._cv = threading.Condition()
        self._results: deque[ResultItem] = deque()
        self._control: deque[Item] = deque()
        self._retained: dict[str, bytes] = {}  # republished on every (re)connect
        self._last_sent: dict[str, float] = {}
        self._last_evidence: dict[str, float] = {}
        self._stopping = False
        self._started = False
        self._busy = False  # the encoder thread is handling an item
        self.counters = {"results": 0, "dropped": 0, "offline_skipped": 0, "settings_rejected": 0, "errors": 0}
        self.setdesk = SetDesk(self.prefix, self.cameras, on_setting, on_command, retain=self._retain,
                               send_error=self._send_error, publish_error=self.publish_error, counters=self.counters)
        self._worker = threading.Thread(target=self._run, name="haloae-publish", daemon=True)
        self.outbox.on_problem = self._outbox_problem
        if self.outbox.problem:  # the disk failed already while opening the outbox
            self._outbox_problem(self.outbox.problem)

    # --- API for the daemon -----------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self.client.connected

    def start(self) -> None:
        for cam in self.cameras:  # no alarm runs at start, whatever a crash left retained
            self.set_alarm_state(cam, False)
        self._publish_discovery()
        self._started = True
        self._worker.start()
        self.sender.start()
        self.client.start()
        self.sender.wake()  # events left by a previous run go out on the first connect

    def publish_result(self, r) -> None:
        """Decide alarms (the event is in the outbox when this returns), queue the result for
        encoding; never blocks on MQTT or encoding."""
        if self._stopping:
            return
        alarm_id = self.alarms.decide(r)
        if self.ha is not None:
            text = self.ha.score_due(r.camera, float(r.score))
            if text is not None:
                self._submit(Live(self.ha.score_topic(r.camera), text.encode()))
        with self._cv:
            if len(self._results) >= self.cfg.publish.queue_size:
                self.counters["dropped"] += 1
                if self.counters["dropped"] in (1, 100) or self.counters["dropped"] % 10000 == 0:
                    log.warning("publisher queue full: %d result(s) dropped so far (encoding or MQTT too slow; "
                                "lower the rate, disable publish.overlay or raise publish.queue_size)",
                                self.counters["dropped"])
            else:
                self._results.append(ResultItem(r, alarm_id))
            self._cv.notify()

    def publish_camera_status(self, s) -> None:
        """Retained ``<prefix>/<camera>/status``; ends a running alarm of a camera that went away."""
        if s.state in ("offline", "ended"):
            self.alarms.close(s.camera, f"camera_{s.state}")
        self._last_status[s.camera] = s
        self._submit(Retained(topics.status(self.prefix, s.camera), self._status_doc(s)))

    def _status_doc(self, s, daemon: str = "running") -> bytes:
        return status_doc(s, self.outbox.dead_by_topic.get(topics.alarm(self.prefix, s.camera), 0),
                          self.outbox.problem, daemon)

    def set_alarm_state(self, camera: str, active: bool) -> None:
        """Retained ``<prefix>/<camera>/alarm/state``: ``ON`` while an alarm runs, else ``OFF``."""
        self._submit(Retained(topics.alarm_state(self.prefix, camera), b"ON" if active else b"OFF"))

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """A retained QoS 1 message, re-published on every reconnect (drift, ...)."""
        self._submit(Retained(topic, payload))

    def _publish_discovery(self) -> None:
        if self.ha is not None:
            for topic, payload in self.ha.discovery():
                self._submit(Retained(topic, payload))

    def apply_setting(self, topic: str, payload: bytes, timeout: float = 5.0) -> str | None:
        """A ``<setting>/set`` or a command (``model/set``, ``<camera>/feedback/set``) from another
        input (the live view), through the same path as an MQTT one; waits for it: None when
        applied (a command: accepted, its outcome follows on its ``state`` topic), else why it
        was refused."""
        reply = Reply()
        limit = max(MAX_SETTING_BYTES, MAX_COMMAND_BYTES) + 1  # each path checks its own limit
        self._submit(SetRequest(topic, payload[:limit], len(payload), reply))
        reply.done.wait(timeout)
        return reply.error

    def _refresh_statuses(self) -> None:
        """Publish every camera's last status again (a dead letter, an outbox problem changed)."""
        for s in list(self._last_status.values()):
            self._submit(Retained(topics.status(self.prefix, s.camera), self._status_doc(s)))

    def publish_error(self, kind: str, error: str, **fields) -> None:
        """One ``<prefix>/error`` message (QoS 1, not retained; see docs/mqtt.md)."""
        doc = {"v": SCHEMA_VERSION, "kind": kind, "error": error, **fields, "timestamp": iso_utc(time.time())}
        self._submit(ErrorReport(_dumps(doc)))

    def publish_stats(self, d: dict) -> None:
        """``<prefix>/stats`` (QoS 0, not retained); the publisher adds its own counters."""
        self._submit(Stats(dict(d)))

    def set_state(self, camera: str | None, setting: str, value: Any) -> None:
        """Retained ``<prefix>/<camera>/<setting>/state`` (camera None: every camera)."""
        for cam in [camera] if camera else self.cameras:
            self._submit(Retained(topics.state(self.prefix, cam, setting), state_text(value).encode()))

    def stats(self) -> dict:
        return {**self.counters, "alarm_events": self.alarms.raised, "queue": len(self._results),
                "outbox_pending": len(self.outbox), "outbox_dropped": self.outbox.dropped,
                "alarms_delivered": self.sender.delivered, "alarms_dead": self.sender.dead,
                "outbox_dead": self.outbox.dead, "outbox_memory": self.outbox.in_memory,
                "outbox_problem": self.outbox.problem, "duplicate_node": self.client.takeovers,
                "connected": self.connected}

    def threads_alive(self) -> dict[str, bool]:
        """The publisher's own threads (the app's supervisor checks them)."""
        if not self._started:
            return {}
        return {"publisher": self._worker.is_alive(), "alarm sender": self.sender.is_alive()}

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued result and message has been handed to MQTT; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._cv:
                if not (self._results or self._control or self._busy):
                    return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 2.0) -> None:
        """End running alarms, deliver what the broker takes within ``timeout``, publish
        every camera's ``status`` = ``offline`` (``daemon`` ``stopped``) and ``available`` =
        ``offline``, disconnect. Undelivered alarm events stay in the outbox."""
        if self._stopping:
            return
        deadline = time.monotonic() + timeout
        self.alarms.close_all("shutdown")
        for cam in self.cameras:
            self.set_alarm_state(cam, False)
        for s in list(self._last_status.values()):  # a clean stop: every camera offline, said why
            s.state, s.detail, s.since = "offline", "haloae-edge was stopped (clean stop)", time.time()
            self._submit(Retained(topics.status(self.prefix, s.camera), self._status_doc(s, "stopped")))
        with self._cv:  # only now: the encoder thread ends once drained, and these are queued before
            self._stopping = True
            self._cv.notify()
        if self._started:
            self._worker.join(max(0.1, 0.3 * timeout))  # alarms first, then the queued results
            with self._cv:
                self.counters["dropped"] += len(self._results)  # out of time: drop the rest
                self._results.clear()
            self._worker.join(0.1)
            if self.client.connected:
                self.sender.flush(max(0.0, 0.5 * (deadline - time.monotonic())))
            self.sender.stop(min(0.2, max(0.0, deadline - time.monotonic())))
            self.client.stop(max(0.1, deadline - time.monotonic()))
        if len(self.outbox):
            log.warning("%d alarm event(s) not yet acknowledged stay in the outbox; the next start delivers them",
                        len(self.outbox))
        self.outbox.close()

    # --- callbacks from paho's thread -------------------------------------------------------
    def _on_connect(self) -> None:
        self._submit(Connected())
        self.sender.wake()

    def _on_dead_letter(self, ev: PendingEvent, reason: str, code: int | None) -> None:
        """From the sender thread: an alarm event that will never be delivered."""
        try:
            doc = json.loads(ev.payload)
        except ValueError:
            doc = {}
        doc = doc if isinstance(doc, dict) else {}
        camera = doc.get("camera")
        log.error("alarm event %s (seq %s, %s) on %s is a dead letter: %s; kept in the outbox's dead_letters "
                  "table, the next events go on", doc.get("id", "?"), doc.get("seq", "?"), ev.kind, ev.topic, reason)
        self.publish_error("dead_letter", f"alarm event not delivered: {reason}", topic=ev.topic, camera=camera,
                           event_id=doc.get("id"), seq=doc.get("seq"), event=ev.kind, reason_code=code)
        self._refresh_statuses()

    def _outbox_problem(self, problem: str | None) -> None:
        """The outbox disk failed (``problem``) or works again (None)."""
        if problem is not None:
            self.publish_error("outbox", problem)
        self._refresh_statuses()

    def _on_duplicate(self, text: str) -> None:
        self.publish_error("duplicate_node", text, client_id=self.client.client_id)

    def _on_mqtt_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topics.is_set_request(topic):
            self._submit(SetRequest(topic, payload[:MAX_COMMAND_BYTES + 1], len(payload)))
        elif self.ha is not None and topic == self.ha.birth_topic and payload.strip() == b"online":
            log.info("Home Assistant started (%s = online): publishing the discovery configs again", topic)
            self._publish_discovery()

    # --- the encoder thread -----------------------------------------------------------------
    def _submit(self, *items: Item) -> None:
        with self._cv:
            self._control.extend(items)
            self._cv.notify()

    def _run(self) -> None:
        pub = None
        if self.cfg.publish.zmq_pub:
            from .ipc import ResultPub  # zmq sockets belong to the thread that uses them
            try:
                pub = ResultPub(self.cfg.publish.zmq_pub)
            except Exception as err:
                log.error("cannot bind the local ZeroMQ PUB %s: %s (set publish.zmq_pub to a free endpoint or null); "
                          "MQTT publishing goes on", self.cfg.publish.zmq_pub, err)
        while True:
            with self._cv:
                self._busy = False  # the previous item is done (flush() waits for this)
                while not (self._control or self._results or self._stopping):
                    self._cv.wait()
                if self._control:
                    item = self._control.popleft()
                elif self._results:
                    item = self._results.popleft()
                else:
                    break  # stopping and drained
                self._busy = True
            try:
                self._handle(item, pub)
            except Exception:
                self.counters["errors"] += 1
                log.exception("publisher failed on a %s item; going on", type(item).__name__)
        if pub is not None:
            pub.close()

    def _handle(self, item: Item, pub) -> None:
        if isinstance(item, ResultItem):
            self._send_result(item.result, item.alarm_id, pub)
        elif isinstance(item, Retained):
            self._retain(item)
        elif isinstance(item, Stats):
            doc = {"v": SCHEMA_VERSION, "node": self.node, "timestamp": iso_utc(time.time()),
                   "epoch": round(time.time(), 3), **item.doc, "publisher": self.stats()}
            if self.client.connected:
                self.client.publish(topics.stats(self.prefix), _dumps(doc), qos=0)
        elif isinstance(item, SetRequest):
            self.setdesk.handle(item)
        elif isinstance(item, Live):  # live data (score sensor): not kept while disconnected
            if self.client.connected:
                self.client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
        elif isinstance(item, ErrorReport):  # QoS 1: paho keeps it while disconnected and sends it on reconnect
            self.client.publish(topics.error(self.prefix), item.payload, qos=1)
        elif isinstance(item, Connected):
            for topic, payload in self._retained.items():
                self.client.publish(topic, payload, qos=1, retain=True)
        else:
            raise TypeError(f"the publisher has no handling for {item!r}")

    def _retain(self, item: Retained) -> None:
        """Keep a retained message for reconnects and publish it now when connected."""
        self._retained[item.topic] = item.payload
        if self.client.connected:
            self.client.publish(item.topic, item.payload, qos=1, retain=True)

    def _send_error(self, payload: bytes) -> None:
        """An encoded ``<prefix>/error`` document, now and only when connected (a refused setting)."""
        if self.client.connected:
            self.client.publish(topics.error(self.prefix), payload, qos=1)

    def _send_result(self, r, alarm_id: str | None, pub) -> None:
        to_mqtt = self._want_mqtt(r)
        to_evidence = self.evidence is not None and r.anomalous and self._evidence_due(r.camera)
        to_ha = self.ha is not None and r.anomalous and self.client.connected and self.ha.image_due(r.camera)
        if not (to_mqtt or to_evidence or to_ha or pub is not None):
            return  # nobody takes this result: skip the encoding
        h, w = r.frame.shape[:2]
        amap, mask, found = regions.analyse(r, self.cfg.publish.min_region_area, self.cfg.publish.max_regions,
                                             self.cfg.publish.mask_peak_fraction)
        payload = _dumps(result_payload(self.node, r, found, alarm_id))
        want_png = pub is not None or to_evidence or (to_mqtt and self.cfg.publish.mask)
        mask_png = regions.mask_png(mask, w, h) if want_png else b""
        overlay = regions.overlay_jpeg(r, amap, mask) if (to_ha or (to_mqtt and self.cfg.publish.overlay
                                                                  and r.anomalous)) else None
        if pub is not None:
            pub.send(topics.result(self.prefix, r.camera), payload, mask_png)
        if to_mqtt:
            q = self.cfg.mqtt.qos_results
            frame_props = [("camera", r.camera), ("frame_id", str(int(r.frame_id)))]  # MQTT 5: pairs mask ↔ result
            self.client.publish(topics.result(self.prefix, r.camera), payload, qos=q)
            if self.cfg.publish.mask:
                self.client.publish(topics.camera(self.prefix, r.camera, topics.MASK), mask_png, qos=q,
                                    user_properties=frame_props)
            if self.cfg.publish.overlay and r.anomalous:
                self.client.publish(topics.camera(self.prefix, r.camera, topics.OVERLAY), overlay, qos=q,
                                    user_properties=frame_props)
            self.counters["results"] += 1
            if self.on_published is not None:
                self.on_published(r, time.time() - r.timestamp)
        if to_ha:
            self._retain(Retained(self.ha.image_topic(r.camera), overlay))
        if to_evidence:
            self._save_evidence(r, amap, mask, mask_png, payload, overlay)

    def _want_mqtt(self, r) -> bool:
        mode = self.cfg.publish.results
        if mode == "none" or (mode == "anomalous" and not r.anomalous):
            return False
        if not self.client.connected:
            self.counters["offline_skipped"] += 1  # results are live data: no backlog while offline
            return False
        rate = self.cfg.publish.max_rate_hz
        now = time.monotonic()
        if rate and now - self._last_sent.get(r.camera, -math.inf) < 1.0 / rate:
            return False
        self._last_sent[r.camera] = now
        return True

    def _evidence_due(self, camera: str) -> bool:
        now = time.monotonic()
        if now - self._last_evidence.get(camera, -math.inf) < self.cfg.evidence.min_interval_s:
            return False
        self._last_evidence[camera] = now
        return True

    def _save_evidence(self, r, amap, mask, mask_png: bytes, payload: bytes, overlay: bytes | None) -> None:
        ext = self.cfg.evidence.frame_format
        files = {f"_frame.{ext}": regions.encode_frame(r.frame, ext), "_mask.png": mask_png,
                 "_overlay.jpg": overlay or regions.overlay_jpeg(r, amap, mask), ".json": payload}
        self.evidence.save(r.camera, r.frame_id, r.timestamp, files)
