"""Home Assistant discovery and the retained alarm state (issue 14, "Done when"), with
``haloae-edge`` as a subprocess on the toy bundle and a real mosquitto: the discovery payloads
(keys from Home Assistant's MQTT documentation), ``alarm/state`` ``ON`` during a defective run,
``OFF`` after it and after a restart, ``available`` ``offline`` after a clean stop and after
SIGKILL, the threshold ``number`` and Home Assistant's birth message."""

from __future__ import annotations

import json
import signal
import subprocess

import paho.mqtt.publish as mqtt_publish
import yaml
from conftest import CHILD_ENV, bin_path
from mqtt_helpers import Subscriber
from toy_bundle import BRIGHT, MID, make_toy_bundle, write_video

P = "haloae/ha1"
DEVICE = "haloae_ha1"
# Keys Home Assistant's MQTT integration documents for each platform (the ones this daemon may use)
COMMON = {"name", "unique_id", "availability", "availability_mode", "device", "origin", "icon", "qos",
          "entity_category", "enabled_by_default", "object_id", "default_entity_id"}
ALLOWED = {
    "binary_sensor": COMMON | {"state_topic", "payload_on", "payload_off", "device_class", "expire_after",
                               "force_update", "off_delay", "value_template"},
    "sensor": COMMON | {"state_topic", "state_class", "unit_of_measurement", "device_class", "expire_after",
                        "suggested_display_precision", "force_update", "value_template"},
    "number": COMMON | {"command_topic", "state_topic", "min", "max", "step", "mode", "retain", "optimistic",
                        "unit_of_measurement", "device_class", "command_template", "value_template"},
    "image": COMMON | {"image_topic", "content_type", "image_encoding", "url_topic", "url_template"},
}
REQUIRED = {"binary_sensor": {"state_topic"}, "sensor": {"state_topic"},
            "number": {"command_topic", "state_topic"}, "image": {"image_topic", "content_type"}}


def _config(tmp_path, port, video, loop):
    cfg = {"node": "ha1", "state_dir": str(tmp_path / "state"),
           "cameras": [{"id": "cam0", "source": str(video), "fps": 10, "loop": loop}],
           "model": {"bundle": str(tmp_path / "bundle"), "threads": 1},
           "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 5, "reconnect_min_s": 0.2},
           "publish": {"zmq_pub": None, "stats_interval_s": 1},
           "alarms": {"n": 2, "m": 3, "clear_frames": 2},
           "homeassistant": {"enabled": True, "image_interval_s": 1}}
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _daemon(config, *extra):
    return subprocess.Popen([bin_path("haloae-edge"), "--config", str(config), *extra], env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _on(sub, topic):
    return [p.decode() for p in sub.on(topic)]


def test_discovery_alarm_state_and_availability(tmp_path, broker):
    make_toy_bundle(tmp_path / "bundle")
    run = write_video(tmp_path / "run.avi", [MID] * 6 + [BRIGHT] * 12 + [MID] * 10)
    sub = Subscriber(broker.port, [f"{P}/#", "homeassistant/#"])
    sub.wait_subscribed()
    state, avail = f"{P}/cam0/alarm/state", f"{P}/available"

    # run 1: a defective run in a finite video, then a clean stop (--exit-when-done)
    proc = _daemon(_config(tmp_path, broker.port, run, loop=False), "--exit-when-done")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    sub.wait_for(lambda m: _on(sub, avail)[-1:] == ["offline"], timeout=10)
    states = _on(sub, state)
    assert states[0] == "OFF" and "ON" in states, states
    assert states[states.index("ON"):][1] == "OFF" and states[-1] == "OFF"  # OFF after the defective run
    last_status = json.loads(sub.on(f"{P}/cam0/status")[-1])
    assert last_status["state"] == "offline" and last_status["daemon"] == "stopped"

    configs = {t: json.loads(p) for t, p, _ in sub.messages if t.startswith("homeassistant/") and t.endswith("/config")}
    assert len(configs) == 4
    seen_ids = set()
    for topic, doc in configs.items():
        _, component, node_id, object_id, _ = topic.split("/")
        assert node_id == DEVICE and object_id.startswith("cam0_")
        assert set(doc) <= ALLOWED[component], set(doc) - ALLOWED[component]
        assert REQUIRED[component] <= set(doc) and doc["name"] and doc["unique_id"] not in seen_ids
        seen_ids.add(doc["unique_id"])
        assert doc["device"]["identifiers"] == [DEVICE] and doc["origin"]["name"] == "haloae-edge"
        assert doc["availability"] == [{"topic": avail, "payload_available": "online", "payload_not_available": "offline"}]
    by = {t.split("/")[1]: d for t, d in configs.items()}
    assert by["binary_sensor"]["state_topic"] == state and by["binary_sensor"]["device_class"] == "problem"
    assert (by["binary_sensor"]["payload_on"], by["binary_sensor"]["payload_off"]) == ("ON", "OFF")
    assert by["number"]["command_topic"] == f"{P}/cam0/threshold/set"
    assert by["number"]["state_topic"] == f"{P}/cam0/threshold/state" and by["number"]["min"] < by["number"]["max"]
    scores = _on(sub, by["sensor"]["state_topic"])
    times = [t for (tp, _, _), t in zip(sub.messages, sub.times) if tp == by["sensor"]["state_topic"]]
    assert len(scores) >= 2 and all(0 <= float(s) <= 2 for s in scores)
    assert all(b - a > 0.8 for a, b in zip(times, times[1:])), "the score sensor publishes at most 1 Hz"
    assert any(float(s) >= 0.9 for s in scores)  # the defective run's highest score is not averaged away
    images = sub.on(by["image"]["image_topic"])
    assert images and images[0][:2] == b"\xff\xd8" and by["image"]["content_type"] == "image/jpeg"

    # run 2: defects without end, then SIGKILL: the broker's last will, the alarm state stays ON
    bright = write_video(tmp_path / "bright.avi", [BRIGHT] * 20)
    proc = _daemon(_config(tmp_path, broker.port, bright, loop=True))
    try:
        sub.wait_for(lambda m: _on(sub, state)[-1:] == ["ON"], timeout=30)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
    sub.wait_for(lambda m: _on(sub, avail)[-1:] == ["offline"], timeout=15)

    # run 3: a restart resets the alarm state to OFF before any frame; the number sets the threshold
    calm = write_video(tmp_path / "calm.avi", [MID] * 20)
    n_configs = sum(t.endswith("/config") for t, _, _ in sub.messages)
    proc = _daemon(_config(tmp_path, broker.port, calm, loop=True))
    try:
        sub.wait_for(lambda m: _on(sub, avail)[-1:] == ["online"], timeout=30)
        sub.wait_for(lambda m: _on(sub, state)[-1:] == ["OFF"], timeout=10)
        mqtt_publish.single(by["number"]["command_topic"], "0.8", hostname="127.0.0.1", port=broker.port)
        sub.wait_for(lambda m: _on(sub, f"{P}/cam0/threshold/state")[-1:] == ["0.8"], timeout=10)
        mqtt_publish.single("homeassistant/status", "online", hostname="127.0.0.1", port=broker.port)
        sub.wait_for(lambda m: sum(t.endswith("/config") for t, _, _ in m) >= n_configs + 8, timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err[-3000:]
    sub.wait_for(lambda m: _on(sub, avail)[-1:] == ["offline"], timeout=10)
    late = Subscriber(broker.port, [avail, state])  # what Home Assistant sees when it connects now: retained
    got = dict((t, p) for t, p, _ in late.wait_for(lambda m: len(m) >= 2))
    late.close()
    sub.close()
    assert got == {avail: b"offline", state: b"OFF"}
