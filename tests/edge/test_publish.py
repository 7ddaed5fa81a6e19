"""Publisher against a real broker: result/mask/overlay payloads, alarms, settings, status, stop."""

import json
import time

import numpy as np
import pytest
import zmq
from conftest import free_port
from mqtt_helpers import Subscriber, edge_config, make_result

from haloae.edge import regions
from haloae.edge.publish import Publisher
from haloae.edge.settings import SettingError, parse_threshold

P = "haloae/n1"


@pytest.fixture
def pub_sub(tmp_path, broker):
    """(publisher, subscriber, settings seen by on_setting) on a fresh broker."""
    seen = []
    cfg = edge_config(tmp_path, broker.port, publish={"overlay": True})
    sub = Subscriber(broker.port, [f"{P}/#"])
    sub.wait_subscribed()
    pub = Publisher(cfg, cfg.state_dir, lambda cam, name, value: seen.append((cam, name, value)))
    pub.start()
    assert pub.client.wait_connected(10)
    yield pub, sub, seen
    pub.stop()
    sub.close()


def test_result_json_mask_png_and_overlay(pub_sub):
    pub, sub, _ = pub_sub
    pub.publish_result(make_result("cam0", 7, anomalous=True, size=(96, 64), blob=(40, 16, 24, 16)))
    sub.wait_for(lambda m: any(t == f"{P}/cam0/overlay" for t, _, _ in m))
    (doc,) = [json.loads(p) for p in sub.on(f"{P}/cam0/result")]
    assert doc["v"] == 1 and doc["camera"] == "cam0" and doc["frame_id"] == 7 and doc["node"] == "n1"
    assert doc["verdict"] == "defect" and doc["score"] == 0.9 and doc["threshold"] == 0.5 and doc["model"] == "m1"
    assert set(doc["latency_ms"]) == {"capture", "queue", "inference", "total"}
    assert doc["timestamp"].endswith("Z") and abs(doc["epoch"] - time.time()) < 30
    assert (doc["width"], doc["height"]) == (96, 64)
    (r,) = doc["regions"]                       # the blob, in frame pixels (map was 32x32)
    assert abs(r["x"] - 40) <= 3 and abs(r["y"] - 16) <= 3 and abs(r["w"] - 24) <= 6 and abs(r["h"] - 16) <= 6
    assert r["area"] > 200 and r["max_score"] > 0.5
    mask = regions.decode_png(sub.on(f"{P}/cam0/mask")[0])
    assert mask.shape == (64, 96) and set(np.unique(mask)) == {0, 255}
    assert mask[24, 52] == 255 and mask[5, 5] == 0
    overlay = sub.on(f"{P}/cam0/overlay")[0]
    assert overlay[:2] == b"\xff\xd8"
    # a normal frame: verdict ok, empty mask of the frame's size, no overlay
    pub.publish_result(make_result("cam0", 8, anomalous=False, size=(96, 64)))
    sub.wait_for(lambda m: len([1 for t, _, _ in m if t == f"{P}/cam0/mask"]) >= 2)
    doc = json.loads(sub.on(f"{P}/cam0/result")[1])
    assert doc["verdict"] == "ok" and doc["regions"] == [] and doc["alarm"] is None
    assert not regions.decode_png(sub.on(f"{P}/cam0/mask")[1]).any()
    assert len(sub.on(f"{P}/cam0/overlay")) == 1


def test_alarm_start_and_end_reach_subscribers_and_results_carry_the_alarm_id(pub_sub):
    pub, sub, _ = pub_sub
    for i, bad in enumerate([1, 1, 1, 0, 0]):           # n=2 of m=3 starts, 2 normal frames end
        pub.publish_result(make_result("cam1", i, anomalous=bool(bad)))
    msgs = sub.wait_for(lambda m: len([1 for t, _, _ in m if t == f"{P}/cam1/alarm"]) >= 2)
    events = [json.loads(p) for p in sub.on(f"{P}/cam1/alarm")]
    assert [e["event"] for e in events] == ["start", "end"] and events[0]["id"] == events[1]["id"]
    assert events[0]["frame_id"] == 1 and events[1]["reason"] == "cleared"
    sub.wait_for(lambda m: len([1 for t, _, _ in m if t == f"{P}/cam1/result"]) >= 5)
    results = [json.loads(p) for p in sub.on(f"{P}/cam1/result")]
    assert [r["alarm"] for r in results] == [None] + [events[0]["id"]] * 4
    assert pub.sender.flush(5) and len(pub.outbox) == 0
    assert not [t for t, _, _ in msgs if t == f"{P}/cam0/alarm"]


@pytest.mark.parametrize("payload", [b"abc", b"NaN", b"-1", b"inf", b"0", b"11", b"\xff\xfe", b"7" * 10240])
def test_parse_threshold_rejects_garbage(payload):
    with pytest.raises(SettingError):
        parse_threshold(payload)


def test_settings_are_validated_and_state_is_retained(pub_sub):
    pub, sub, seen = pub_sub
    pub.set_state(None, "threshold", 0.5)
    sub.wait_for(lambda m: len([1 for t, _, _ in m if t.endswith("/threshold/state")]) >= 2)
    bad = [b"abc", b"NaN", b"-1", b"9" * 10240]
    for payload in bad:
        pub.client.publish(f"{P}/cam0/threshold/set", payload, qos=1)
    pub.client.publish(f"{P}/nocam/threshold/set", b"0.6", qos=1)
    pub.client.publish(f"{P}/cam0/colour/set", b"0.6", qos=1)
    sub.wait_for(lambda m: len([1 for t, _, _ in m if t == f"{P}/error"]) >= 6)
    errors = [json.loads(p) for p in sub.on(f"{P}/error")]
    assert len(errors) == 6 and all(e["v"] == 1 and e["error"] for e in errors)
    assert all("plain decimal number in (0, 10]" in e["error"] for e in errors[:3])
    assert [e["kind"] for e in errors] == ["setting"] * 6 and errors[4]["camera"] == "nocam"
    assert "too long" in errors[3]["error"] and "unknown camera" in errors[4]["error"]
    assert "unknown setting" in errors[5]["error"]
    assert seen == [] and sub.on(f"{P}/cam0/threshold/state") == [b"0.5"]
    # a valid value: on_setting called, retained state updated
    pub.client.publish(f"{P}/cam0/threshold/set", b" 0.62\n", qos=1)
    sub.wait_for(lambda m: (f"{P}/cam0/threshold/state", b"0.62", False) in m)
    assert seen == [("cam0", "threshold", 0.62)]
    # all cameras at once
    pub.client.publish(f"{P}/threshold/set", b"0.7", qos=1)
    sub.wait_for(lambda m: (f"{P}/cam1/threshold/state", b"0.7", False) in m)
    assert seen[-1] == (None, "threshold", 0.7)
    late = Subscriber(pub.cfg.mqtt.port, [f"{P}/+/threshold/state"])
    states = late.wait_for(lambda m: len(m) >= 2)
    late.close()
    assert sorted(states) == [(f"{P}/cam0/threshold/state", b"0.7", True), (f"{P}/cam1/threshold/state", b"0.7", True)]


def test_on_setting_can_refuse_a_value(tmp_path, broker):
    def refuse(cam, name, value):
        raise ValueError("threshold above 2 is not allowed on this line")
    cfg = edge_config(tmp_path, broker.port)
    sub = Subscriber(broker.port, [f"{P}/#"])
    sub.wait_subscribed()
    pub = Publisher(cfg, cfg.state_dir, refuse)
    pub.start()
    assert pub.client.wait_connected(10)
    pub.client.publish(f"{P}/cam0/threshold/set", b"3", qos=1)
    sub.wait_for(lambda m: any(t == f"{P}/error" for t, _, _ in m))
    assert "not allowed" in json.loads(sub.on(f"{P}/error")[0])["error"]
    assert sub.on(f"{P}/cam0/threshold/state") == []
    pub.stop()
    sub.close()


def test_status_stats_and_stop(pub_sub):
    from haloae.edge.frames import CameraStatus
    pub, sub, _ = pub_sub
    pub.publish_result(make_result("cam0", 0, anomalous=True))
    pub.publish_result(make_result("cam0", 1, anomalous=True))          # alarm starts
    pub.publish_camera_status(CameraStatus("cam0", "offline", detail="file removed", frames=2, errors=1))
    pub.publish_stats({"fps": 12.5, "cameras": {"cam0": {"dropped": 3}}})
    msgs = sub.wait_for(lambda m: any(t == f"{P}/stats" for t, _, _ in m) and
                        len([1 for t, _, _ in m if t == f"{P}/cam0/alarm"]) >= 2)
    status = json.loads(sub.on(f"{P}/cam0/status")[0])
    assert status["v"] == 1 and status["state"] == "offline" and status["detail"] == "file removed"
    assert status["frames"] == 2 and status["errors"] == 1
    ends = [json.loads(p) for p in sub.on(f"{P}/cam0/alarm")]
    assert ends[-1]["event"] == "end" and ends[-1]["reason"] == "camera_offline"
    stats = json.loads(sub.on(f"{P}/stats")[0])
    assert stats["fps"] == 12.5 and stats["publisher"]["connected"] is True and stats["v"] == 1
    t0 = time.monotonic()
    pub.stop(timeout=2.0)
    assert time.monotonic() - t0 < 2.5
    sub.wait_for(lambda m: (f"{P}/available", b"offline", False) in m)
    assert any(t == f"{P}/available" and p == b"online" for t, p, _ in msgs)


def test_publish_result_never_blocks_and_counts_drops(tmp_path, broker):
    cfg = edge_config(tmp_path, broker.port, publish={"queue_size": 4, "overlay": True})
    pub = Publisher(cfg, cfg.state_dir)
    pub.start()
    assert pub.client.wait_connected(10)
    r = make_result("cam0", 0, anomalous=False, size=(1280, 720), blob=(100, 100, 400, 300))
    t0 = time.perf_counter()
    for i in range(300):
        pub.publish_result(r)
    per_call = (time.perf_counter() - t0) / 300
    # encoding one 1280x720 result with overlay takes tens of ms: a blocking call would show it
    assert per_call < 0.005, f"publish_result took {per_call * 1000:.2f} ms per call"
    assert pub.counters["dropped"] > 0
    pub.stop()


def test_local_zeromq_pub_carries_results(tmp_path, broker):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = edge_config(tmp_path, broker.port, publish={"zmq_pub": endpoint, "results": "none"})
    pub = Publisher(cfg, cfg.state_dir)
    pub.start()
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    s.setsockopt(zmq.RCVTIMEO, 200)
    s.connect(endpoint)
    got = None
    for i in range(50):  # PUB/SUB joins asynchronously: keep sending until one arrives
        pub.publish_result(make_result("cam1", i, anomalous=True, blob=(10, 10, 20, 20)))
        try:
            got = s.recv_multipart()
            break
        except zmq.Again:
            pass
    s.close(0)
    pub.stop()
    assert got is not None, "no result on the local ZeroMQ PUB"
    topic, payload, png = got
    assert topic == f"{P}/cam1/result".encode() and json.loads(payload)["camera"] == "cam1"
    assert regions.decode_png(png).shape == (64, 96)


def test_only_anomalous_results_without_masks(tmp_path, broker):
    cfg = edge_config(tmp_path, broker.port, publish={"results": "anomalous", "mask": False})
    sub = Subscriber(broker.port, [f"{P}/+/result", f"{P}/+/mask"])
    sub.wait_subscribed()
    pub = Publisher(cfg, cfg.state_dir)
    pub.start()
    assert pub.client.wait_connected(10)
    for i in range(6):
        pub.publish_result(make_result("cam0", i, anomalous=i in (2, 4)))
    msgs = sub.wait_for(lambda m: len(m) >= 2)
    time.sleep(0.3)
    pub.stop()
    sub.close()
    assert [json.loads(p)["frame_id"] for t, p, _ in msgs] == [2, 4] and len(sub.messages) == 2


def test_stop_publishes_the_queued_results_first(tmp_path, broker):
    cfg = edge_config(tmp_path, broker.port)
    sub = Subscriber(broker.port, [f"{P}/+/result", f"{P}/available"])
    sub.wait_subscribed()
    pub = Publisher(cfg, cfg.state_dir)
    pub.start()
    assert pub.client.wait_connected(10)
    for i in range(20):
        pub.publish_result(make_result("cam0", i, size=(320, 240)))
    pub.stop(timeout=2.0)  # right away: the queue still holds most of them
    msgs = sub.wait_for(lambda m: (f"{P}/available", b"offline", False) in m)
    sub.close()
    assert [json.loads(p)["frame_id"] for t, p, _ in msgs if t.endswith("/result")] == list(range(20))
    assert pub.counters["dropped"] == 0
