"""``<prefix>/<camera>/feedback/set``: an alarm or a frame labelled from the line files its
evidence into ``<state_dir>/feedback/<good|defect>``, a folder haloae-eval reads as it is.
A real ``haloae-edge`` subprocess, real mosquitto, ONNX Runtime, a video written with OpenCV."""

from __future__ import annotations

import json
import signal

import paho.mqtt.publish as mqtt_publish
from mqtt_helpers import Subscriber
from test_faults_inspection import daemon_config, start
from toy_bundle import BRIGHT, MID, make_toy_bundle, write_video

from haloae.train.data import find_eval_samples

P = "haloae/fi"


def _send(port: int, payload) -> None:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    mqtt_publish.single(f"{P}/cam0/feedback/set", body, qos=1, hostname="127.0.0.1", port=port)


def _states(sub):
    return [json.loads(p) for p in sub.on(f"{P}/cam0/feedback/state")]


def test_feedback_files_the_evidence_of_an_alarm_and_of_a_frame(tmp_path, broker):
    bundle = make_toy_bundle(tmp_path / "bundle")
    video = write_video(tmp_path / "line.avi", [MID] * 8 + [BRIGHT] * 8)
    config = daemon_config(tmp_path, broker.port, bundle,
                           [{"id": "cam0", "source": str(video), "loop": True, "fps": 25}],
                           evidence={"enabled": True, "min_interval_s": 0})
    state = tmp_path / "state"
    sub = Subscriber(broker.port, [f"{P}/#"])
    sub.wait_subscribed()
    proc = start(config)
    try:
        events = lambda: [json.loads(p) for p in sub.on(f"{P}/cam0/alarm")]  # noqa: E731
        sub.wait_for(lambda m: sum(e["event"] == "end" for e in events()) >= 2, timeout=40)
        first, second = [e["id"] for e in events() if e["event"] == "end"][:2]
        # what the evidence holds for the first alarm, read independently of the daemon
        evid = [p for p in (state / "evidence" / "cam0").rglob("*.json")
                if json.loads(p.read_text()).get("alarm") == first]
        assert evid, "the alarm's frames are in the evidence"
        _send(broker.port, {"event": first, "label": "ok", "by": "inspector 4", "note": "glare"})
        sub.wait_for(lambda m: _states(sub) and _states(sub)[-1]["state"] == "filed", timeout=15)
        s = _states(sub)[-1]
        assert s["event"] == first and s["label"] == "ok" and s["frames"] == len(evid)
        good = sorted((state / "feedback" / "good").glob("*.jpg"))
        assert len(good) == len(evid) and s["totals"] == {"good": len(evid), "defect": 0}
        for frame in good:
            details = state / "feedback" / "evidence" / "good"
            record = json.loads((details / f"{frame.stem}.json").read_text())
            assert record["label"] == "ok" and record["by"] == "inspector 4" and record["note"] == "glare"
            assert record["result"]["alarm"] == first and record["result"]["verdict"] == "defect"
            assert (details / f"{frame.stem}_mask.png").stat().st_size > 0
            assert (details / f"{frame.stem}_overlay.jpg").stat().st_size > 0
            assert frame.stat().st_size > 100
        # labelled again: the frames move from good/ to defect/
        _send(broker.port, {"event": first, "label": "defect"})
        sub.wait_for(lambda m: _states(sub)[-1]["label"] == "defect", timeout=15)
        assert not list((state / "feedback" / "good").glob("*"))
        assert not list((state / "feedback" / "evidence" / "good").glob("*"))
        assert len(list((state / "feedback" / "defect").glob("*.jpg"))) == len(evid)
        # one frame of the second alarm, by its frame id, labelled ok
        frame_id = next(json.loads(p.read_text())["frame_id"] for p in (state / "evidence" / "cam0").rglob("*.json")
                        if json.loads(p.read_text()).get("alarm") == second)
        _send(broker.port, {"frame_id": frame_id, "label": "ok"})
        sub.wait_for(lambda m: _states(sub)[-1].get("frame_id") == frame_id, timeout=15)
        assert _states(sub)[-1]["frames"] == 1
        assert _states(sub)[-1]["totals"] == {"good": 1, "defect": len(evid)}
        # unknown ids are reported; bad payloads never reach the desk; results keep flowing
        _send(broker.port, {"event": "fi-cam0-1-deadbeef", "label": "ok"})
        sub.wait_for(lambda m: _states(sub)[-1]["state"] == "not_found", timeout=15)
        n = len(sub.on(f"{P}/cam0/result"))
        for bad in ('{"event": "x", "label": "maybe"}', "ok", '{"frame_id": -1, "label": "ok"}'):
            _send(broker.port, bad)
        sub.wait_for(lambda m: sum(json.loads(p)["kind"] == "command" for p in sub.on(f"{P}/error")) == 3)
        errors = [json.loads(p) for p in sub.on(f"{P}/error")]
        assert [e["kind"] for e in errors].count("feedback") == 1
        refusals = [e["error"] for e in errors if e["kind"] == "command"]
        assert "label must be ok or defect" in refusals[0] and "frame_id must be" in refusals[2]
        sub.wait_for(lambda m: len(sub.on(f"{P}/cam0/result")) > n + 10, timeout=15)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        sub.close()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    # the feedback folder is a plant folder for haloae-eval: good/ + defect/, evidence/ is no class
    samples = find_eval_samples(state / "feedback")
    assert sorted({s.defect_class for s in samples}) == ["defect", "good"]
    assert len(samples) == 1 + len(evid) and all(s.mask_path is None for s in samples)
