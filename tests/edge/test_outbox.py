"""The SQLite alarm outbox: persisted before publish, deleted on PUBACK, in order, bounded."""

import json
import logging
import os
import signal
import sqlite3
import time

from mqtt_helpers import Subscriber

from haloae.edge.config import MqttConfig
from haloae.edge.mqtt_client import MqttClient
from haloae.edge.delivery import OutboxSender
from haloae.edge.outbox import Outbox

TOPIC = "haloae/n1/cam0/alarm"


def _rows(path):
    with sqlite3.connect(path) as db:
        return db.execute("SELECT kind, payload FROM events ORDER BY seq").fetchall()


def _sender(outbox, port, name):
    sender = None
    client = MqttClient(MqttConfig(host="127.0.0.1", port=port, reconnect_min_s=0.2, reconnect_max_s=1.0),
                        "haloae/n1", name, on_connect=lambda: sender.wake(),
                        on_publish=lambda mid, rc: sender.on_publish(mid, rc))
    sender = OutboxSender(outbox, client, window=4)
    return client, sender


def test_events_are_committed_before_publish_and_survive_a_new_instance(tmp_path):
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    box.add("start", TOPIC, b'{"seq":0}')
    box.add("end", TOPIC, b'{"seq":1}')
    # another connection (another process after a crash) sees both, committed, in order
    assert _rows(path) == [("start", b'{"seq":0}'), ("end", b'{"seq":1}')]
    again = Outbox(path)
    assert len(again) == 2 and [e.kind for e in again.pending()] == ["start", "end"]
    again.delete([again.pending()[0].seq])
    assert len(again) == 1 and _rows(path) == [("end", b'{"seq":1}')]


def test_pending_events_are_delivered_in_order_and_deleted_only_on_puback(tmp_path, broker):
    path = tmp_path / "outbox.sqlite"
    box = Outbox(path)
    for i in range(30):  # raised while no broker connection exists yet (e.g. left by a crash)
        box.add("update", TOPIC, json.dumps({"seq": i}).encode())
    sub = Subscriber(broker.port, [TOPIC])
    sub.wait_subscribed()
    client, sender = _sender(box, broker.port, "t-outbox")
    sender.start()
    client.start()
    msgs = sub.wait_for(lambda m: len(m) >= 30)
    assert [json.loads(p)["seq"] for _, p, _ in msgs] == list(range(30))
    assert sender.flush(5.0)
    assert len(box) == 0 and _rows(path) == [] and sender.delivered == 30
    # a frozen broker reads nothing and acks nothing: the events stay on disk until it acks
    os.kill(broker.proc.pid, signal.SIGSTOP)
    try:
        for i in range(30, 33):
            box.add("update", TOPIC, json.dumps({"seq": i}).encode())
        sender.wake()
        time.sleep(1.0)
        assert len(box) == 3 and len(_rows(path)) == 3
    finally:
        os.kill(broker.proc.pid, signal.SIGCONT)
    assert sender.flush(5.0) and len(box) == 0
    msgs = sub.wait_for(lambda m: len(m) >= 33)
    assert [json.loads(p)["seq"] for _, p, _ in msgs] == list(range(33))
    sender.stop()
    client.stop()
    sub.close()


def test_size_bound_drops_oldest_updates_first(tmp_path, caplog):
    box = Outbox(tmp_path / "o.sqlite", max_events=10)
    caplog.set_level(logging.WARNING, logger="haloae.edge.outbox")
    box.add("start", TOPIC, b"s")
    for i in range(12):
        box.add("update", TOPIC, str(i).encode())
    box.add("end", TOPIC, b"e")
    kept = [(e.kind, e.payload) for e in box.pending()]
    assert len(kept) == 10 and len(box) == 10
    assert kept[0] == ("start", b"s") and kept[-1] == ("end", b"e")
    assert [p for k, p in kept if k == "update"] == [str(i).encode() for i in range(4, 12)]
    assert box.dropped == 4 and any("dropped" in r.getMessage() for r in caplog.records)
    # only start/end events left: the oldest go
    box2 = Outbox(tmp_path / "o2.sqlite", max_events=10)
    for i in range(11):
        box2.add("start" if i % 2 == 0 else "end", TOPIC, str(i).encode())
    assert [e.payload for e in box2.pending()][0] == b"1" and len(box2) == 10


def test_a_schema_1_outbox_is_migrated_and_keeps_its_events(tmp_path):
    path = tmp_path / "outbox.sqlite"
    with sqlite3.connect(path) as db:  # the layout written before the schema version was recorded
        db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, "
                   "topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)")
        db.execute("INSERT INTO events (kind, topic, payload, created) VALUES ('start', ?, ?, 1.0)", (TOPIC, b"s"))
    box = Outbox(path)
    assert [(e.kind, e.payload) for e in box.pending()] == [("start", b"s")]
    box.dead_letter(box.pending()[0], "refused")
    assert len(box) == 0 and box.dead == 1
    box.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("SELECT topic, payload, reason FROM dead_letters").fetchall() == [(TOPIC, b"s", "refused")]


def test_delivered_events_that_cannot_be_deleted_are_not_offered_again(tmp_path):
    box = Outbox(tmp_path / "o.sqlite")
    seqs = [box.add("update", TOPIC, str(i).encode()) for i in range(3)]
    box._db.execute("PRAGMA query_only = ON")  # every write now fails, as on a full disk
    box.delete(seqs[:2])
    assert box.problem and "cannot delete" in box.problem
    assert [e.seq for e in box.pending()] == seqs[2:] and len(box) == 1
    new = box.add("end", TOPIC, b"e")  # the disk refuses it: kept in memory, after the others
    assert new < 0 and [e.seq for e in box.pending()] == [seqs[2], new]
    box._db.execute("PRAGMA query_only = OFF")
    box._retry_at = 0.0  # skip the backoff wait (1 s, then 2 s)
    box.maintain()
    assert box.problem is None and box.in_memory == 0 and [e.payload for e in box.pending()] == [b"2", b"e"]
