"""Fault injection, inspection side (issue 12): never a live daemon with dead inspection, never a
silent failure. Real ``haloae-edge`` subprocesses on real ONNX Runtime sessions of tiny graphs
(``toy_bundle.py``), videos written with OpenCV, a real mosquitto.

Each test prints a ``FIGURES`` line that docs/operations.md quotes ("Fault injection").
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
from conftest import CHILD_ENV, bin_path
from mqtt_helpers import Subscriber, edge_config, make_result
from toy_bundle import BRIGHT, DARK, MID, make_toy_bundle, write_video

from haloae.edge.app import EdgeApp
from haloae.runtime import Backend
from haloae.edge.publish import Publisher
from haloae.edge.watchdog import Notifier

NODE = "fi"
P = f"haloae/{NODE}"


def daemon_config(tmp_path: Path, port: int, bundle: Path, cameras: list[dict], **over) -> Path:
    cfg = {"node": NODE, "state_dir": str(tmp_path / "state"), "cameras": cameras,
           "model": {"bundle": str(bundle), "threads": 1, "backend": "onnxruntime"},
           "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 5, "reconnect_min_s": 0.2, "reconnect_max_s": 1},
           "publish": {"zmq_pub": None, "stats_interval_s": 0.5, "mask": False},
           "alarms": {"n": 2, "m": 3, "clear_frames": 2},
           "evidence": {"enabled": False},
           "health": {"reopen_min_s": 0.2, "reopen_max_s": 1}}
    cfg.update(over)
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(config: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([bin_path("haloae-edge"), "--config", str(config), *extra], env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results(sub: Subscriber, camera: str = "cam0") -> list[dict]:
    return [json.loads(p) for p in sub.on(f"{P}/{camera}/result")]


def figures(case: str, **values) -> None:
    print(f"\nFIGURES {case}: " + " ".join(f"{k}={v}" for k, v in values.items()))


def _edit(path: Path, fn) -> None:
    m = json.loads(path.read_text())
    fn(m)
    path.write_text(json.dumps(m))


def test_reload_keeps_the_running_model_on_every_failure_and_applies_good_changes(tmp_path, broker):
    bundle = make_toy_bundle(tmp_path / "bundle")
    video = write_video(tmp_path / "line.avi", [MID] * 6 + [BRIGHT] * 6)
    cams = [{"id": "cam0", "source": str(video), "loop": True, "fps": 25}]
    config = daemon_config(tmp_path, broker.port, bundle, cams)
    sub = Subscriber(broker.port, [f"{P}/#"])
    sub.wait_subscribed()
    proc = start(config)
    manifest = bundle / "manifest.json"
    good_manifest, good_model = manifest.read_text(), (bundle / "model.onnx").read_bytes()

    def reload_and_wait(errors_before: int, fail: bool) -> list[dict]:
        n = len(results(sub))
        proc.send_signal(signal.SIGHUP)
        if fail:
            sub.wait_for(lambda m: len(sub.on(f"{P}/error")) > errors_before, timeout=15)
        sub.wait_for(lambda m: len(results(sub)) > n + 15, timeout=15)  # inspection goes on
        return results(sub)[-5:]

    try:
        sub.wait_for(lambda m: len(results(sub)) >= 10, timeout=30)
        assert {r["threshold"] for r in results(sub)} == {0.5}
        # 1: a manifest threshold that is not a number
        _edit(manifest, lambda m: m["threshold"].update(image="0,6"))
        reload_and_wait(0, fail=True)
        # 2: a truncated model file (the manifest is fine again)
        manifest.write_text(good_manifest)
        (bundle / "model.onnx").write_bytes(good_model[:-50])
        reload_and_wait(1, fail=True)
        # 3: a broken YAML (a key twice)
        (bundle / "model.onnx").write_bytes(good_model)
        good_yaml = config.read_text()
        config.write_text(good_yaml + "node: other\n")
        last = reload_and_wait(2, fail=True)
        assert {r["model"] for r in last} == {"toy-1"} and {r["threshold"] for r in last} == {0.5}
        errors = [json.loads(p) for p in sub.on(f"{P}/error")]
        assert [e["kind"] for e in errors] == ["reload"] * 3
        assert "threshold.image" in errors[0]["error"] and "sha256" in errors[1]["error"]
        assert "appears twice" in errors[2]["error"]
        assert all("still running model toy-1" in e["error"] for e in errors)
        # 4: a good new bundle (new threshold, new id) is swapped in
        config.write_text(good_yaml)
        _edit(manifest, lambda m: (m["threshold"].update(image=0.7), m["model"].update(id="toy-2")))
        last = reload_and_wait(3, fail=False)
        assert {r["model"] for r in last} == {"toy-2"} and {r["threshold"] for r in last} == {0.7}
        # 5: an edited YAML: the camera threshold applies live, keepalive needs a restart (said so)
        cfg = yaml.safe_load(good_yaml)
        cfg["cameras"][0]["threshold"] = 0.8
        cfg["mqtt"]["keepalive"] = 7
        config.write_text(yaml.safe_dump(cfg))
        last = reload_and_wait(3, fail=False)
        assert {r["threshold"] for r in last} == {0.8}
        assert json.loads(sub.on(f"{P}/cam0/status")[-1])["state"] == "online"
        assert sub.on(f"{P}/cam0/threshold/state")[-1] == b"0.8"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        sub.close()
    assert proc.returncode == 0, err[-3000:]
    assert err.count("reload failed, still running model toy-1") == 3 and "Traceback" not in err, err[-3000:]
    assert "mqtt.keepalive changed" in err and "after a restart" in err
    raised = len(re.findall(r"\balarm (?:start|update|end) ", err))
    delivered = len({(e["id"], e["seq"]) for e in map(json.loads, sub.on(f"{P}/cam0/alarm"))})
    figures("reload", reloads=5, refused=3, reported_on_error_topic=len(errors), results=len(results(sub)),
            alarms_raised=raised, alarms_delivered=delivered)
    assert raised > 0 and delivered == raised


def test_nan_outputs_are_counted_and_never_published_as_ok(tmp_path, broker):
    """A model that gives NaN for dark frames: those are not inspections."""
    bundle = make_toy_bundle(tmp_path / "bundle", offset=0.3)
    levels = ([DARK] * 4 + [MID] * 4 + [BRIGHT] * 4) * 3
    video = write_video(tmp_path / "line.avi", levels)
    config = daemon_config(tmp_path, broker.port, bundle, [{"id": "cam0", "source": str(video), "lossless": True}])
    sub = Subscriber(broker.port, [f"{P}/#"])
    sub.wait_subscribed()
    proc = start(config, "--exit-when-done")
    out, err = proc.communicate(timeout=60)
    sub.wait_for(lambda m: any(json.loads(p)["state"] == "ended" for p in sub.on(f"{P}/cam0/status")), timeout=10)
    sub.close()
    assert proc.returncode == 0, err[-3000:]
    got = results(sub)
    dark = {i for i, v in enumerate(levels) if v == DARK}
    assert sorted(r["frame_id"] for r in got) == sorted(set(range(len(levels))) - dark)
    assert all(r["score"] is not None for r in got), "no null score"
    assert {r["verdict"] for r in got if levels[r["frame_id"]] == BRIGHT} == {"defect"}
    stats = json.loads(sub.on(f"{P}/stats")[-1])
    status = json.loads(sub.on(f"{P}/cam0/status")[-1])
    assert stats["cameras"]["cam0"]["invalid"] == len(dark) and stats["inference"]["invalid"] == len(dark)
    assert status["invalid"] == len(dark)
    assert "output NaN/inf" in err and "Traceback" not in err
    figures("nan-some-frames", frames=len(levels), published=len(got), nan_frames=len(dark),
            published_as_ok_with_null_score=0, status_invalid=status["invalid"])


def test_a_model_that_only_outputs_nan_stops_the_daemon(tmp_path, broker):
    bundle = make_toy_bundle(tmp_path / "bundle", offset=2.0)
    video = write_video(tmp_path / "line.avi", [MID, BRIGHT] * 5)
    config = daemon_config(tmp_path, broker.port, bundle, [{"id": "cam0", "source": str(video), "loop": True}])
    sub = Subscriber(broker.port, [f"{P}/#"])
    sub.wait_subscribed()
    t0 = time.monotonic()
    proc = start(config)
    _, err = proc.communicate(timeout=60)
    sub.close()
    assert proc.returncode == 1, err[-3000:]
    assert "stopping: model toy-1 output NaN/inf for 50 frames in a row" in err, err[-3000:]
    assert results(sub) == [], "nothing published as a result"
    figures("nan-every-frame", exit_code=proc.returncode, seconds_to_exit=round(time.monotonic() - t0, 1),
            results_published=0)


def test_a_replay_with_no_usable_frame_ends_with_a_clear_error(tmp_path, broker):
    bundle = make_toy_bundle(tmp_path / "bundle")
    shots = tmp_path / "shots"
    shots.mkdir()
    (shots / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cv2.imwrite(str(shots / "1.png"), np.full((32, 32), 90, np.uint8))  # grey
    cv2.imwrite(str(shots / "2.png"), np.full((4, 4, 3), 90, np.uint8))  # too small
    config = daemon_config(tmp_path, broker.port, bundle, [{"id": "shots", "source": str(shots), "lossless": True}])
    proc = start(config, "--exit-when-done")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2, err[-3000:]
    line = [ln for ln in err.splitlines() if "nothing was inspected" in ln]
    assert len(line) == 1 and "camera shots: 0 frame(s) delivered, 3 unusable" in line[0], err[-3000:]
    assert "Traceback" not in err
    figures("replay-nothing-usable", frames=3, inspected=0, exit_code=proc.returncode)


class CrashesAfter(Backend):
    """A real ONNX Runtime backend whose ``input_shape`` fails after ``n`` reads: a bug outside
    the per-batch error handling of the inference loop."""

    def __init__(self, inner: Backend, n: int):
        self.inner, self.name, self.device, self.reads, self.n = inner, inner.name, inner.device, 0, n

    @property
    def input_shape(self):
        self.reads += 1
        if self.reads > self.n:
            raise RuntimeError("boom")
        return self.inner.input_shape

    def run(self, batch):
        return self.inner.run(batch)


def test_a_dead_inference_thread_ends_the_process_and_starves_the_watchdog(tmp_path, broker, caplog):
    bundle = make_toy_bundle(tmp_path / "bundle")
    video = write_video(tmp_path / "line.avi", [MID] * 10)
    cfg = edge_config(tmp_path, broker.port, cameras=[{"id": "cam0", "source": str(video), "loop": True, "fps": 30}],
                      model={"bundle": str(bundle), "threads": 1, "backend": "onnxruntime"})
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    app = EdgeApp(cfg, notifier=Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}),
                  endpoint=f"inproc://fi-{id(cfg)}")
    app.prepare()
    app.backend = CrashesAfter(app.backend, 40)
    caplog.set_level(logging.INFO, logger="haloae.edge")
    code = []
    t = threading.Thread(target=lambda: code.append(app.run()))
    t0 = time.monotonic()
    t.start()
    t.join(30)
    assert not t.is_alive() and code == [1], "the daemon must stop when inspection stops"
    stop_s = time.monotonic() - t0
    msgs = []
    while True:
        try:
            msgs.append(notify.recv(4096).decode())
        except (TimeoutError, OSError):
            break
    notify.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stopping:")]
    assert lines == ["stopping: the inference thread crashed: RuntimeError: boom"], lines
    last_ready = max(i for i, m in enumerate(msgs) if m.startswith("READY=1"))
    assert any("STATUS=stopping: the inference thread crashed" in m for m in msgs[last_ready:])
    figures("dead-inference-thread", exit_code=code[0], seconds_to_exit=round(stop_s, 1))


def test_two_daemons_with_the_same_node_are_reported_as_duplicates(tmp_path, broker, caplog):
    caplog.set_level(logging.INFO, logger="haloae.edge")
    sub = Subscriber(broker.port, ["haloae/n1/#"])
    sub.wait_subscribed()
    pubs = []
    for name in ("a", "b"):
        cfg = edge_config(tmp_path / name, broker.port)
        pubs.append(Publisher(cfg, cfg.state_dir))
        pubs[-1].start()
    a, b = pubs
    try:
        deadline = time.monotonic() + 20
        i = 0
        while not (a.client.takeovers and b.client.takeovers) and time.monotonic() < deadline:
            for k in range(8):
                a.publish_result(make_result("cam0", i + k, anomalous=k < 3))
            i += 8
            time.sleep(0.2)
        assert a.client.takeovers and b.client.takeovers, "both daemons see the duplicate"
        detect_s = 20 - (deadline - time.monotonic())
        sub.wait_for(lambda m: any(json.loads(p)["kind"] == "duplicate_node" for p in sub.on("haloae/n1/error")),
                     timeout=15)
        journal = [r.getMessage() for r in caplog.records if "duplicate node" in r.getMessage()
                   and r.levelno >= logging.ERROR]
        assert journal and "haloae-n1" in journal[0] and "own node" in journal[0]
        b.stop()
        pubs.remove(b)
        assert a.sender.flush(15), f"{len(a.outbox)} pending after the other daemon stopped"
        raised = a.alarms.raised
        events = [json.loads(p) for p in sub.on("haloae/n1/cam0/alarm")]
        sub.wait_for(lambda m: len({(e["id"], e["seq"]) for e in map(json.loads, sub.on("haloae/n1/cam0/alarm"))})
                     >= raised)
        events = [json.loads(p) for p in sub.on("haloae/n1/cam0/alarm")]
        unique = {(e["id"], e["seq"]) for e in events}
        figures("duplicate-node", seconds_to_detect=round(detect_s, 1), raised=raised, delivered=len(unique),
                dead_lettered=0, duplicates=len(events) - len(unique))
        assert len(unique) == raised
    finally:
        for p in pubs:
            p.stop()
        sub.close()
