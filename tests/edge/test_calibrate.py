"""``<prefix>/<camera>/calibrate/set``: a threshold proposed from the frames judged normal, with
its false-positive estimate published BEFORE it takes effect, applied only on confirm.
A real ``haloae-edge`` subprocess, real mosquitto, ONNX Runtime, a video written with OpenCV."""

from __future__ import annotations

import json
import signal

import numpy as np
import paho.mqtt.publish as mqtt_publish
from mqtt_helpers import Subscriber
from test_faults_inspection import daemon_config, start
from toy_bundle import write_video

from haloae.edge.recalibrate import ScoreHistory, propose

P = "haloae/fi"


def test_propose_counts_and_estimates_out_of_sample():
    rng = np.random.default_rng(0)
    t = np.arange(2000, dtype=np.float64)
    s = np.concatenate([rng.normal(0.3, 0.02, 1000), rng.normal(0.34, 0.02, 1000)]).astype(np.float32)
    doc = propose(t, s, 0.01, current=0.5)
    assert doc["threshold"] == round(float(np.quantile(s, 0.99, method="higher")), 4)
    assert doc["current_false_positive_rate"] == 0.0 and doc["frames"] == 2000
    assert abs(doc["proposed_false_positive_rate"] - 0.01) < 0.002
    # the newer half drifted up: fitted on the older half, far more than 1 % would alarm
    assert doc["held_out_false_positive_rate"] > 0.1
    h = ScoreHistory(["c"], capacity=5)
    for i in range(8):
        h.add("c", float(i), float(i))
    times, scores = h.since("c", 4.0)
    assert times.tolist() == [4, 5, 6, 7] and scores.tolist() == [4, 5, 6, 7]


def test_calibrate_proposes_then_applies_on_confirm(tmp_path, broker):
    from toy_bundle import make_toy_bundle

    bundle = make_toy_bundle(tmp_path / "bundle")
    levels = [100 + i for i in range(19)] + [133]  # scores 0.39-0.46, one frame in 20 at 0.52
    video = write_video(tmp_path / "line.avi", levels)
    config = daemon_config(tmp_path, broker.port, bundle, [{"id": "cam0", "source": str(video), "loop": True,
                                                            "fps": 40}])
    sub = Subscriber(broker.port, [f"{P}/#"])
    sub.wait_subscribed()
    proc = start(config)
    results = lambda: [json.loads(p) for p in sub.on(f"{P}/cam0/result")]  # noqa: E731
    states = lambda: [json.loads(p) for p in sub.on(f"{P}/cam0/calibrate/state")]  # noqa: E731

    def send(doc) -> None:
        body = doc if isinstance(doc, str) else json.dumps(doc)
        mqtt_publish.single(f"{P}/cam0/calibrate/set", body, qos=1, hostname="127.0.0.1", port=broker.port)

    try:
        sub.wait_for(lambda m: len(results()) >= 160, timeout=40)
        assert not sub.on(f"{P}/cam0/alarm"), "single frames above 0.5 raise no alarm (2 of 3)"
        send({"hours": 0.00001, "false_positive_rate": 0.05})  # 36 ms of frames: too few
        sub.wait_for(lambda m: states() and states()[-1]["state"] == "refused", timeout=15)
        assert "normal frame(s) in the window" in states()[-1]["error"]
        send({"hours": 1, "false_positive_rate": 0.05})
        sub.wait_for(lambda m: states()[-1]["state"] == "proposed", timeout=15)
        prop = states()[-1]
        seen = {round(r["score"], 4) for r in results()}
        assert prop["frames"] >= 160 and prop["threshold"] in seen and 0.45 < prop["threshold"] < 0.53
        assert abs(prop["current_false_positive_rate"] - 0.05) < 0.02 and prop["current_threshold"] == 0.5
        assert 0 <= prop["held_out_false_positive_rate"] <= 0.1
        # nothing changed yet
        n = len(results())
        sub.wait_for(lambda m: len(results()) > n + 20, timeout=15)
        assert {r["threshold"] for r in results()[n:]} == {0.5}
        send({"confirm": "0000beef"})
        sub.wait_for(lambda m: states()[-1]["state"] == "refused", timeout=15)
        assert "no proposal" in states()[-1]["error"]
        send({"hours": 1, "false_positive_rate": 0.05})  # a fresh proposal, then confirmed
        sub.wait_for(lambda m: states()[-1]["state"] == "proposed" and states()[-1]["id"] != prop["id"], timeout=15)
        prop = states()[-1]
        send({"confirm": prop["id"]})
        sub.wait_for(lambda m: states()[-1]["state"] == "applied", timeout=15)
        assert sub.on(f"{P}/cam0/threshold/state")[-1] == str(prop["threshold"]).encode()
        n = len(results())
        sub.wait_for(lambda m: len(results()) > n + 20, timeout=15)
        assert results()[-1]["threshold"] == prop["threshold"]
        for bad in ('{"hours": -1, "false_positive_rate": 0.01}', '{"hours": 1}', "8"):
            send(bad)
        sub.wait_for(lambda m: sum(json.loads(p)["kind"] == "command" for p in sub.on(f"{P}/error")) == 3)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        sub.close()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
    assert "proposing threshold" in err and "applied (proposal" in err
