"""The data loop end to end on the synthetic line (issue 15): collect good frames from a video
with an ROI, train a tiny model on them, run the daemon, label alarms over MQTT, evaluate on the
labelled folder, retrain with it, promote the new bundle over MQTT while results keep flowing;
a broken bundle is refused and the old model keeps inspecting.

Everything real: OpenCV videos, haloae-collect / -train / -export / -eval / -retrain / -edge as
subprocesses, mosquitto, ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.publish as mqtt_publish
import yaml
from conftest import CHILD_ENV, REPO, bin_path, run_cli

sys.path.insert(0, str(Path(__file__).parent / "edge"))
from mqtt_helpers import Subscriber  # noqa: E402

from haloae.synthetic import LineSimulator  # noqa: E402

ROI = [16, 8, 128, 128]
P = "haloae/loop"


def _video(path: Path, sim: LineSimulator, n: int) -> Path:
    """Synthetic parts at (16, 8) in a 160x144 frame: the ROI is what the model must see."""
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (160, 144))
    for i in range(n):
        frame = np.full((144, 160, 3), 60, np.uint8)
        frame[8:136, 16:144] = cv2.cvtColor(sim.frame(i)[0], cv2.COLOR_RGB2BGR)
        vw.write(frame)
    vw.release()
    return path


def _config(tmp_path: Path, port: int, video: Path, bundle: Path) -> Path:
    cfg = {"node": "loop", "state_dir": str(tmp_path / "state"),
           "cameras": [{"id": "cam0", "source": str(video), "roi": ROI, "loop": True, "fps": 8}],
           "model": {"bundle": str(bundle), "threads": 1, "backend": "onnxruntime"},
           "mqtt": {"host": "127.0.0.1", "port": port, "keepalive": 5, "reconnect_min_s": 0.2, "reconnect_max_s": 1},
           "publish": {"zmq_pub": None, "stats_interval_s": 1},
           "alarms": {"n": 2, "m": 3, "clear_frames": 2},
           "evidence": {"enabled": True, "min_interval_s": 0}}
    path = tmp_path / "edge.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _send(port: int, topic: str, payload) -> None:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    mqtt_publish.single(f"{P}/{topic}", body, qos=1, hostname="127.0.0.1", port=port)


def test_collect_train_run_feedback_eval_retrain_promote(tmp_path, broker):
    tiny = str(REPO / "configs/train/tiny.yaml")
    # 1. collect good frames as the daemon sees them
    good_video = _video(tmp_path / "good.avi", LineSimulator(size=128, seed=3, defect_every=0), 90)
    collect_cfg = _config(tmp_path, broker.port, good_video, tmp_path / "v1")
    data = tmp_path / "data"
    run_cli(bin_path("haloae-collect"), "--config", str(collect_cfg), "--camera", "cam0", "--out", str(data),
            "--count", "90", "--quiet")
    assert len(list((data / "train" / "good").glob("*.png"))) >= 80
    # 2. train and export v1
    run_cli(bin_path("haloae-train"), "--config", tiny, "--data", str(data), "--out", str(tmp_path / "run1"),
            "--epochs", "6", "--quiet")
    v1 = tmp_path / "v1"
    run_cli(bin_path("haloae-export"), str(tmp_path / "run1" / "final.pt"), "--out", str(v1), "--data", str(data),
            "--samples", "2")
    # 3. the daemon on a line with defective runs
    line = _video(tmp_path / "line.avi", LineSimulator(size=128, seed=5, run_length=6, defect_every=3), 72)
    config = _config(tmp_path, broker.port, line, v1)
    sub = Subscriber(broker.port, [f"{P}/#"])
    sub.wait_subscribed()
    proc = subprocess.Popen([bin_path("haloae-edge"), "--config", str(config)], env=CHILD_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = lambda: [json.loads(p) for p in sub.on(f"{P}/cam0/result")]  # noqa: E731
    states = lambda topic: [json.loads(p) for p in sub.on(f"{P}/{topic}/state")]  # noqa: E731
    try:
        ends = lambda: [json.loads(p)["id"] for p in sub.on(f"{P}/cam0/alarm")  # noqa: E731
                        if json.loads(p)["event"] == "end"]
        sub.wait_for(lambda m: len(ends()) >= 2, timeout=120)
        v1_id = states("model")[0]["model"]
        # 4. the line labels the alarms: one a false positive, one confirmed
        _send(broker.port, "cam0/feedback/set", {"event": ends()[0], "label": "ok"})
        _send(broker.port, "cam0/feedback/set", {"event": ends()[1], "label": "defect"})
        sub.wait_for(lambda m: sum(s["state"] == "filed" for s in states("cam0/feedback")) >= 2, timeout=30)
        feedback = tmp_path / "state" / "feedback"
        n_ok = len(list((feedback / "good").glob("*.jpg")))
        n_defect = len(list((feedback / "defect").glob("*.jpg")))
        assert n_ok >= 1 and n_defect >= 1
        # 5. evaluate the running bundle on the labelled folder (image metrics: no masks)
        run_cli(bin_path("haloae-eval"), "--bundle", str(v1), "--data", str(feedback), "--out",
                str(tmp_path / "eval"), "--no-progress", "--threads", "1")
        m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
        assert (m["n_good"], m["n_defect"]) == (n_ok, n_defect) and m["pixel_auroc"] is None
        assert m["pixel_metrics_over"]["defect_without_mask"] == n_defect
        # 6. retrain with the fed-back good frames, compare side by side, export
        run_cli(bin_path("haloae-retrain"), "--config", tiny, "--data", str(data), "--feedback", str(feedback),
                "--current", str(v1), "--out", str(tmp_path / "run2"), "--epochs", "6", "--threads", "1", "--force")
        cmp = json.loads((tmp_path / "run2" / "compare.json").read_text())
        assert cmp["training_images"]["feedback"] == n_ok
        assert cmp["feedback"]["current"]["good"] == n_ok and "new" in cmp["feedback"]
        v2 = tmp_path / "run2" / "bundle"
        assert (v2 / "manifest.json").is_file()
        # 7. a broken bundle is refused; v1 keeps inspecting
        broken = tmp_path / "broken"
        shutil.copytree(v2, broken)
        (broken / "model.onnx").write_bytes((v2 / "model.onnx").read_bytes()[:-1000])
        _send(broker.port, "model/set", str(broken))
        sub.wait_for(lambda m: states("model")[-1]["state"] == "refused", timeout=60)
        n = len(results())
        sub.wait_for(lambda m: len(results()) > n + 5, timeout=30)
        assert {r["model"] for r in results()[-3:]} == {v1_id}
        # 8. promote v2 over MQTT while the daemon keeps publishing
        _send(broker.port, "model/set", str(v2))
        sub.wait_for(lambda m: states("model")[-1]["state"] == "ok" and states("model")[-1]["model"] != v1_id,
                     timeout=60)
        v2_id = states("model")[-1]["model"]
        n = len(results())
        sub.wait_for(lambda m: len(results()) > n + 5, timeout=30)
        assert results()[-1]["model"] == v2_id
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
        sub.close()
    assert proc.returncode == 0 and "Traceback" not in err, err[-3000:]
