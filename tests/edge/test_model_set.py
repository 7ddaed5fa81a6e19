"""``<prefix>/model/set``: a new bundle promoted over MQTT while the daemon inspects; broken ones
refused with the old model still inspecting; the outcome retained on ``<prefix>/model/state``.
A real ``haloae-edge`` subprocess, real mosquitto, real ONNX Runtime sessions of tiny graphs."""

from __future__ import annotations

import json
import shutil
import signal
import time

import paho.mqtt.publish as mqtt_publish
from mqtt_helpers import Subscriber
from test_faults_inspection import daemon_config, start
from toy_bundle import BRIGHT, MID, make_toy_bundle, write_video

P = "haloae/fi"


def _states(sub: Subscriber) -> list[dict]:
    return [json.loads(p) for p in sub.on(f"{P}/model/state")]


def _results(sub: Subscriber) -> list[dict]:
    return [json.loads(p) for p in sub.on(f"{P}/cam0/result")]


def _send(port: int, payload: str) -> None:
    mqtt_publish.single(f"{P}/model/set", payload, qos=1, hostname="127.0.0.1", port=port)


def test_model_set_refuses_broken_bundles_and_promotes_a_good_one(tmp_path, broker):
    old = make_toy_bundle(tmp_path / "v1", model_id="toy-1")
    new = make_toy_bundle(tmp_path / "v2", model_id="toy-2")
    truncated = tmp_path / "v2-truncated"
    shutil.copytree(new, truncated)
    (truncated / "model.onnx").write_bytes((new / "model.onnx").read_bytes()[:-60])
    nan_model = make_toy_bundle(tmp_path / "v2-nan", offset=0.8, model_id="toy-nan")  # NaN on grey
    video = write_video(tmp_path / "line.avi", [MID] * 6 + [BRIGHT] * 6)
    config = daemon_config(tmp_path, broker.port, old,
                           [{"id": "cam0", "source": str(video), "loop": True, "fps": 25}])
    sub = Subscriber(broker.port, [f"{P}/#"])
    sub.wait_subscribed()
    proc = start(config)

    def refused(n_before: int, requested: str) -> dict:
        n = len(_results(sub))
        _send(broker.port, requested)
        sub.wait_for(lambda m: sum(s["state"] == "refused" for s in _states(sub)) > n_before, timeout=20)
        sub.wait_for(lambda m: len(_results(sub)) > n + 10, timeout=15)  # inspection goes on
        assert {r["model"] for r in _results(sub)[-5:]} == {"toy-1"}
        return [s for s in _states(sub) if s["state"] == "refused"][-1]

    try:
        sub.wait_for(lambda m: len(_results(sub)) >= 10 and _states(sub), timeout=30)
        first = _states(sub)[0]
        assert first["state"] == "ok" and first["model"] == "toy-1" and first["bundle"] == str(old)
        # broken bundles: each refused with its reason, toy-1 keeps inspecting
        s = refused(0, str(truncated))
        assert "sha256" in s["error"] and s["model"] == "toy-1" and s["requested"] == str(truncated)
        s = refused(1, json.dumps({"path": str(nan_model)}))
        assert "NaN" in s["error"] and s["model"] == "toy-1"
        s = refused(2, str(tmp_path / "nowhere"))
        assert "not a folder" in s["error"]
        # a payload that is not a path never reaches the loader: refused on <prefix>/error
        _send(broker.port, "bundles/v2")
        sub.wait_for(lambda m: any(json.loads(p).get("kind") == "command" for p in sub.on(f"{P}/error")))
        errors = [json.loads(p) for p in sub.on(f"{P}/error")]
        assert [e["kind"] for e in errors].count("model") == 3
        assert "relative path" in [e for e in errors if e["kind"] == "command"][0]["error"]
        # the good bundle is promoted while results keep flowing
        n = len(_results(sub))
        t_send = time.monotonic()
        _send(broker.port, str(new))
        sub.wait_for(lambda m: _states(sub)[-1]["state"] == "ok" and _states(sub)[-1]["model"] == "toy-2",
                     timeout=20)
        sub.wait_for(lambda m: len(_results(sub)) > n + 15, timeout=15)
        after = _results(sub)[n:]
        models = [r["model"] for r in after]
        assert models[-1] == "toy-2" and models.count("toy-2") >= 5
        assert models == sorted(models), "no old-model result after the first new-model one"
        with sub._cv:
            times = [t for (topic, _, _), t in zip(sub.messages, sub.times)
                     if topic == f"{P}/cam0/result" and t >= t_send]
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert max(gaps) < 2.0, f"results stalled {max(gaps):.2f} s during the swap"
        assert [s["state"] for s in _states(sub)][-2:] == ["loading", "ok"]
        assert _states(sub)[-1]["previous"] == "toy-1" and _states(sub)[-1]["bundle"] == str(new)
        # a subscriber that comes later sees the outcome (retained)
        late = Subscriber(broker.port, [f"{P}/model/state"])
        late.wait_for(lambda m: m, timeout=10)
        assert json.loads(late.messages[-1][1])["model"] == "toy-2" and late.messages[-1][2]
        late.close()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        sub.close()
    assert proc.returncode == 0, err[-3000:]
    assert err.count("still running model toy-1") == 3 and "Traceback" not in err, err[-3000:]
    assert "now running model toy-2" in err
