"""Fault injection, delivery side (issue 12): every alarm event is delivered or dead-lettered and
reported, none is lost, none blocks the others, with a real mosquitto (ACL file, packet-size
limits), a real tmpfs that fills up, a real SIGKILL.

Each test prints a ``FIGURES`` line (raised / delivered / dead-lettered / duplicates) that
docs/operations.md quotes ("Fault injection").
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import CHILD_ENV, REPO, Broker, free_port
from mqtt_helpers import Subscriber, edge_config, make_result

from haloae.edge.frames import CameraStatus
from haloae.edge.outbox import Outbox
from haloae.edge.publish import Publisher

P = "haloae/n1"
PATTERN = [1, 1, 1, 0, 0, 0, 0, 0]  # n=2 of m=3, clear 2: one start + one end per 8 frames


def feed(pub: Publisher, camera: str, frames: int, start: int = 0) -> int:
    for i in range(start, start + frames):
        pub.publish_result(make_result(camera, i, anomalous=bool(PATTERN[i % len(PATTERN)])))
    return start + frames


def alarm_events(sub: Subscriber, camera: str = "+") -> list[dict]:
    return [json.loads(p) for t, p, _ in list(sub.messages)
            if t.endswith("/alarm") and (camera == "+" or t == f"{P}/{camera}/alarm")]


def figures(case: str, raised: int, delivered: int, dead: int, duplicates: int, **extra) -> None:
    more = "".join(f" {k}={v}" for k, v in extra.items())
    print(f"\nFIGURES {case}: raised={raised} delivered={delivered} dead_lettered={dead} "
          f"duplicates={duplicates}{more}")


def in_order(events: list[dict]) -> bool:
    """Per alarm, the events arrived in seq order (repeats dropped by (id, seq))."""
    seen, last = set(), {}
    for e in events:
        key = (e["id"], e["seq"])
        if key in seen:
            continue
        seen.add(key)
        if e["seq"] != last.get(e["id"], -1) + 1:
            return False
        last[e["id"]] = e["seq"]
    return True


def test_acl_refusal_dead_letters_the_refused_events_and_the_others_flow(tmp_path, caplog):
    acl = tmp_path / "acl"
    acl.write_text("topic read #\n" + "".join(f"topic write {P}/{t}\n" for t in (
        "available", "error", "stats", "cam0/#", "cam1/result", "cam1/mask", "cam1/status", "+/threshold/state")))
    broker = Broker(tmp_path / "b", extra_conf=f"allow_anonymous true\nacl_file {acl}\n").start()
    caplog.set_level(logging.INFO, logger="haloae.edge")
    try:
        sub = Subscriber(broker.port, [f"{P}/#"])
        sub.wait_subscribed()
        cfg = edge_config(tmp_path, broker.port)
        pub = Publisher(cfg, cfg.state_dir)
        pub.start()
        assert pub.client.wait_connected(10)
        pub.publish_camera_status(CameraStatus("cam1", "online", "synthetic"))
        for i in range(0, 40, 8):  # cam1 (refused) raises first each time: nothing may wait behind it
            feed(pub, "cam1", 8, i)
            feed(pub, "cam0", 8, i)
        raised = pub.alarms.raised
        assert raised == 20
        assert pub.sender.flush(10), f"{len(pub.outbox)} event(s) still pending"
        got = sub.wait_for(lambda m: len([1 for t, _, _ in m if t == f"{P}/error"]) >= 10 and
                           len(alarm_events(sub, "cam0")) >= 10)
        cam0, cam1 = alarm_events(sub, "cam0"), alarm_events(sub, "cam1")
        unique0 = {(e["id"], e["seq"]) for e in cam0}
        assert len(unique0) == 10 and in_order(cam0) and cam1 == []
        dead = pub.outbox.dead_letters()
        assert len(dead) == 10 and all(t == f"{P}/cam1/alarm" and "Not authorized" in r and "0x87" in r
                                       for t, _, r in dead)
        errors = [json.loads(p) for t, p, _ in got if t == f"{P}/error"]
        assert len(errors) == 10 and {e["kind"] for e in errors} == {"dead_letter"}
        assert len({(e["event_id"], e["seq"]) for e in errors}) == 10, "each dead letter reported once"
        assert all(e["camera"] == "cam1" and e["reason_code"] == 0x87 for e in errors)
        status = sub.wait_for(lambda m: any(json.loads(p).get("alarms_dead") == 10 for t, p, _ in m
                                            if t == f"{P}/cam1/status"))
        assert pub.stats()["alarms_dead"] == 10 and pub.stats()["outbox_dead"] == 10 and len(pub.outbox) == 0
        journal = [r.getMessage() for r in caplog.records if "dead letter" in r.getMessage()]
        assert len(journal) == 10
        time.sleep(1.5)  # nothing is retried
        assert len(alarm_events(sub)) == len(cam0) and len(pub.outbox.dead_letters()) == 10
        pub.stop()
        again = Publisher(cfg, cfg.state_dir)  # the next start neither resends nor forgets them
        assert len(again.outbox) == 0 and again.stats()["outbox_dead"] == 10
        again.outbox.close()
        figures("acl-refusal", raised, len(unique0), len(dead), len(cam0) - len(unique0),
                status_alarms_dead=json.loads([p for t, p, _ in status if t == f"{P}/cam1/status"][-1])["alarms_dead"])
        sub.close()
    finally:
        broker.stop()


def _prefill(state: Path, events: list[tuple[str, str, bytes]]) -> None:
    """Events a previous run (with another config) left in the outbox."""
    box = Outbox(state / "outbox.sqlite")
    for kind, topic, payload in events:
        box.add(kind, topic, payload)
    box.close()


def _event(i: int, camera: str = "cam0") -> bytes:
    return json.dumps({"v": 1, "event": "update", "id": f"old-{camera}", "seq": i, "camera": camera}).encode()


@pytest.mark.parametrize("limit", ["max_packet_size", "message_size_limit"])
def test_poison_events_never_block_the_ones_behind_them(tmp_path, limit, caplog):
    """Topics no broker takes (a wildcard, a newline) and a packet the broker refuses: with
    max_packet_size the broker says its limit at CONNACK; with message_size_limit it only drops
    the connection, and the sender has to find the culprit."""
    good = f"{P}/cam0/alarm"
    events = [("update", good, _event(0)), ("update", f"{P}/ca#m0/alarm", _event(1)),
              ("update", good, _event(2)), ("update", f"{P}/cam0\n/alarm", _event(3)),
              ("update", good, _event(4)), ("update", good, _event(5) + b" " * 3000),
              *[("update", good, _event(i)) for i in range(6, 12)]]
    state = tmp_path / "state"
    _prefill(state, events)
    broker = Broker(tmp_path / "b", extra_conf=f"allow_anonymous true\n{limit} 2000\n").start()
    caplog.set_level(logging.INFO, logger="haloae.edge")
    try:
        sub = Subscriber(broker.port, [f"{P}/#"])
        sub.wait_subscribed()
        cfg = edge_config(tmp_path, broker.port)
        pub = Publisher(cfg, cfg.state_dir)
        t0 = time.monotonic()
        pub.start()
        assert pub.sender.flush(20), f"{len(pub.outbox)} event(s) still pending: blocked"
        flush_s = time.monotonic() - t0
        feed(pub, "cam1", 8)  # new alarms after the poison ones flow as well
        assert pub.sender.flush(10)
        got = sub.wait_for(lambda m: len([1 for t, _, _ in m if t == f"{P}/cam1/alarm"]) >= 2)
        old = [json.loads(p)["seq"] for t, p, _ in got if t == good]
        assert sorted(set(old)) == [0, 2, 4, *range(6, 12)], old
        dead = {json.loads(p)["seq"]: r for t, p, r in pub.outbox.dead_letters()}
        assert sorted(dead) == [1, 3, 5]
        assert "wildcard" in dead[1] and "control character" in dead[3]
        assert ("at most 2000 bytes" in dead[5]) if limit == "max_packet_size" else ("dropped the connection" in dead[5])
        errors = [json.loads(p) for t, p, _ in got if t == f"{P}/error"]
        # once each (a QoS 1 message can arrive twice when the connection drops, as it does here)
        assert sorted({e["seq"] for e in errors if e["kind"] == "dead_letter"}) == [1, 3, 5]
        assert pub.client.takeovers == 0 and not any(e["kind"] == "duplicate_node" for e in errors), \
            "a broker dropping us over a packet is not another client with our id"
        raised = len(events) + pub.alarms.raised
        unique = len(set(old)) + len({(json.loads(p)["id"], json.loads(p)["seq"]) for t, p, _ in got
                                      if t == f"{P}/cam1/alarm"})
        figures(f"poison-{limit}", raised, unique, len(dead), len(old) - len(set(old)), seconds_to_settle=round(flush_s, 2))
        pub.stop()
        sub.close()
    finally:
        broker.stop()


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs root with CAP_SYS_ADMIN; skipped where mounting is not allowed)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode}): the full-disk case "
                    "needs root with CAP_SYS_ADMIN")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def _fill(disk: Path) -> Path:
    """Fill the file system to the last byte (unbuffered writes, smaller and smaller)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1 << 8, 1):
            while True:
                try:
                    os.write(fd, b"\0" * chunk)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def test_full_state_disk(tmp_path, small_disk, caplog):
    """Events stored, broker down, disk full: the stored ones are delivered once although their
    rows cannot be deleted; new ones are held in memory; one report; then the disk frees up."""
    broker = Broker(tmp_path / "b").start()
    caplog.set_level(logging.INFO, logger="haloae.edge")
    try:
        sub = Subscriber(broker.port, [f"{P}/#"], client_id="ops", persistent=True)
        sub.wait_subscribed()
        cfg = edge_config(tmp_path, broker.port, state_dir=str(small_disk / "state"), evidence={"enabled": False})
        pub = Publisher(cfg, cfg.state_dir)
        pub.start()
        assert pub.client.wait_connected(10)
        pub.publish_camera_status(CameraStatus("cam0", "online", "synthetic"))
        i = feed(pub, "cam0", 16)  # 4 events, delivered and deleted
        assert pub.sender.flush(10)
        sub.wait_for(lambda m: len(alarm_events(sub)) >= 4)
        before = {(e["id"], e["seq"]) for e in alarm_events(sub)}
        broker.stop()
        i = feed(pub, "cam0", 16, i)  # 4 events on disk, waiting for the broker
        assert len(pub.outbox) == 4 and pub.outbox.in_memory == 0
        _fill(small_disk)
        i = feed(pub, "cam0", 16, i)  # 4 events the disk cannot take: held in memory
        assert pub.outbox.problem and pub.outbox.in_memory == 4 and len(pub.outbox) == 8
        assert pub.stats()["outbox_problem"] == pub.outbox.problem
        broker.start()
        assert pub.sender.flush(15), f"{len(pub.outbox)} pending"  # delivered although nothing can be deleted
        raised = pub.alarms.raised
        sub.wait_for(lambda m: len({(e["id"], e["seq"]) for e in alarm_events(sub)}) >= raised, timeout=15)
        time.sleep(2.5)  # no resend loop: the delivered rows stay on disk but are not sent again
        events = alarm_events(sub)
        unique = {(e["id"], e["seq"]) for e in events}
        assert len(unique) == raised == 12 and in_order(events)
        assert len(events) - len(unique) <= 4, "at most the events in flight at the outage repeat (QoS 1)"
        journal = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len([m for m in journal if "alarm outbox" in m]) == 1, journal  # reported once, no flood
        assert not any(r.exc_info for r in caplog.records), "no traceback"
        status = [json.loads(p) for t, p, _ in sub.messages if t == f"{P}/cam0/status"]
        assert status[-1]["outbox_problem"], "the problem is on the retained status"
        errors = [json.loads(p) for t, p, _ in sub.messages if t == f"{P}/error"]
        assert [e["kind"] for e in errors] == ["outbox"]
        # the disk works again: memory and stale rows go, the problem is cleared
        (small_disk / "filler").unlink()
        i = feed(pub, "cam0", 8, i)
        deadline = time.monotonic() + 15
        while (pub.outbox.problem or pub.outbox.in_memory) and time.monotonic() < deadline:
            pub.sender.wake()
            time.sleep(0.2)
        assert pub.outbox.problem is None and pub.sender.flush(10)
        assert any("works again" in r.getMessage() for r in caplog.records)
        with sqlite3.connect(pub.outbox.path) as db:
            assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
        total = pub.alarms.raised
        sub.wait_for(lambda m: len({(e["id"], e["seq"]) for e in alarm_events(sub)}) >= total)
        sub.wait_for(lambda m: json.loads([p for t, p, _ in m if t == f"{P}/cam0/status"][-1])["outbox_problem"] is None)
        events = alarm_events(sub)
        keys = [(e["id"], e["seq"]) for e in events]
        redelivered = sum(1 for k in keys if k in before) - len(before)  # the broker's own resends after its restart
        figures("disk-full", total, len(set(keys)), pub.stats()["alarms_dead"], len(keys) - len(set(keys)),
                held_in_memory=4, of_which_broker_redelivered_after_restart=redelivered)
        pub.stop()
        sub.close()
    finally:
        broker.stop()


def test_read_only_state_disk(tmp_path, small_disk, caplog):
    """The state file system is read-only (remounted after I/O errors): the outbox cannot even
    be created; alarms are delivered from memory and the problem reported until it is writable."""
    (small_disk / "state").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    broker = Broker(tmp_path / "b").start()
    caplog.set_level(logging.INFO, logger="haloae.edge")
    try:
        sub = Subscriber(broker.port, [f"{P}/#"])
        sub.wait_subscribed()
        cfg = edge_config(tmp_path, broker.port, state_dir=str(small_disk / "state"), evidence={"enabled": False})
        pub = Publisher(cfg, cfg.state_dir)
        assert pub.outbox.problem and "cannot open the alarm outbox" in pub.outbox.problem
        pub.start()
        assert pub.client.wait_connected(10)
        feed(pub, "cam0", 32)
        assert pub.sender.flush(10)
        raised = pub.alarms.raised
        sub.wait_for(lambda m: len({(e["id"], e["seq"]) for e in alarm_events(sub)}) >= raised)
        sub.wait_for(lambda m: any(t == f"{P}/error" for t, _, _ in m))
        assert json.loads(sub.on(f"{P}/error")[0])["kind"] == "outbox"
        assert pub.stats()["outbox_problem"] and not (small_disk / "state" / "outbox.sqlite").exists()
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        deadline = time.monotonic() + 15
        while pub.outbox.problem and time.monotonic() < deadline:
            pub.sender.wake()
            time.sleep(0.2)
        assert pub.outbox.problem is None and (small_disk / "state" / "outbox.sqlite").is_file()
        broker.stop()
        feed(pub, "cam0", 8, 32)  # on disk again, waiting for the broker
        with sqlite3.connect(pub.outbox.path) as db:
            assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 2
        events = alarm_events(sub)
        unique = {(e["id"], e["seq"]) for e in events}
        assert len(unique) == raised and in_order(events)
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR and "alarm outbox" in r.getMessage()]
        assert len(errors) == 1 and not any(r.exc_info for r in caplog.records)
        figures("disk-read-only", raised, len(unique), 0, len(events) - len(unique), held_in_memory=raised)
        pub.stop()
        sub.close()
    finally:
        broker.stop()


CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    from mqtt_helpers import edge_config, make_result
    from haloae.edge.publish import Publisher
    cfg = edge_config(Path(sys.argv[1]), int(sys.argv[2]), publish={"overlay": True},
                      evidence={"enabled": True, "frame_format": "png", "min_interval_s": 0})
    pub = Publisher(cfg, cfg.state_dir)
    pub.start()                       # no broker: nothing leaves the machine
    big = dict(size=(3840, 2160), blob=(200, 200, 2400, 1600))
    first, deciding = (make_result("cam0", i, anomalous=True, **big) for i in (0, 1))
    pub.publish_result(first)      # slow to encode (4K mask, overlay, PNG evidence): the encoder is busy
    t0 = time.perf_counter()
    pub.publish_result(deciding)   # decides: alarm start
    print(f"decided {(time.perf_counter() - t0) * 1000:.1f}", flush=True)
    time.sleep(60)
""")


def test_sigkill_right_after_the_deciding_frame_loses_no_alarm(tmp_path):
    port = free_port()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(port), str(REPO / "tests/edge")],
                             stdout=subprocess.PIPE, text=True, env=CHILD_ENV)
    try:
        line = child.stdout.readline().split()
        os.kill(child.pid, signal.SIGKILL)  # while the encoder thread is still busy with frame 0
        child.wait(5)
    finally:
        child.kill()
        child.wait()
    assert line[0] == "decided", line
    decide_ms = float(line[1])
    with sqlite3.connect(tmp_path / "state" / "outbox.sqlite") as db:
        rows = [json.loads(p) for (p,) in db.execute("SELECT payload FROM events")]
    assert [(r["event"], r["frame_id"]) for r in rows] == [("start", 1)], rows
    slow_work_done = any((tmp_path / "state" / "evidence").rglob("*.png"))  # frame 0's evidence, if it got that far
    broker = Broker(tmp_path / "broker", port=port).start()
    try:
        sub = Subscriber(port, [f"{P}/+/alarm"])
        sub.wait_subscribed()
        cfg = edge_config(tmp_path, port)
        pub = Publisher(cfg, cfg.state_dir)
        pub.start()
        got = sub.wait_for(lambda m: len(m) >= 1)
        assert json.loads(got[0][1])["id"] == rows[0]["id"]
        assert pub.sender.flush(5)
        figures("sigkill-after-deciding-frame", 1, len(got), 0, len(got) - 1, decide_ms=decide_ms,
                encoding_of_the_previous_frame_done=slow_work_done)
        assert decide_ms < 200, f"the deciding call took {decide_ms} ms"
        pub.stop()
        sub.close()
    finally:
        broker.stop()


def test_alarms_flow_within_5_s_of_the_broker_coming_back(tmp_path):
    """Default backoff (1 s doubling up to 30 s): after an 8 s outage the old client waited
    until its attempt at ~15 s; a lost working connection is now retried every 2 s."""
    broker = Broker(tmp_path / "b").start()
    try:
        sub = Subscriber(broker.port, [f"{P}/+/alarm"], client_id="ops-5s", persistent=True)
        sub.wait_subscribed()
        cfg = edge_config(tmp_path, broker.port, mqtt={"reconnect_min_s": 1.0, "reconnect_max_s": 30.0})
        pub = Publisher(cfg, cfg.state_dir)
        pub.start()
        assert pub.client.wait_connected(10)
        broker.stop()
        i, end = 0, time.monotonic() + 8.0
        while time.monotonic() < end:
            i = feed(pub, "cam0", 8, i)
            time.sleep(0.5)
        raised = pub.alarms.raised
        assert not pub.connected and len(pub.outbox) == raised
        broker.start()
        t0 = time.monotonic()
        sub.wait_for(lambda m: len({(e["id"], e["seq"]) for e in alarm_events(sub)}) >= raised, timeout=30)
        flow_s = time.monotonic() - t0
        events = alarm_events(sub)
        figures("broker-back-8s-outage", raised, len({(e["id"], e["seq"]) for e in events}), 0,
                len(events) - len({(e["id"], e["seq"]) for e in events}), seconds_to_deliver=round(flow_s, 2))
        assert flow_s < 5.0, f"alarms flowed {flow_s:.1f} s after the broker came back"
        pub.stop()
        sub.close()
    finally:
        broker.stop()
