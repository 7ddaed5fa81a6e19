"""haloae-monitor against a real broker and a real Publisher (subprocess, --count)."""

import json
import signal
import subprocess
import time

from conftest import CHILD_ENV, bin_path, run_cli
from mqtt_helpers import edge_config, make_result

from haloae.edge import regions
from haloae.edge.publish import Publisher


def _start(*args):
    proc = subprocess.Popen([bin_path("haloae-monitor"), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=CHILD_ENV)
    line = proc.stderr.readline()
    assert "listening on" in line, line + proc.stderr.read()  # printed once the broker confirmed the subscription
    return proc


def test_monitor_prints_results_and_alarms_and_saves_masks(tmp_path, broker):
    masks = tmp_path / "masks"
    mon = _start("--broker", f"127.0.0.1:{broker.port}", "--save-masks", str(masks), "--count", "4", "--timeout", "30")
    cfg = edge_config(tmp_path, broker.port)
    pub = Publisher(cfg, cfg.state_dir)
    pub.start()
    assert pub.client.wait_connected(10)
    for i, bad in enumerate([0, 1, 1, 0]):
        pub.publish_result(make_result("cam0", i, anomalous=bool(bad), blob=(30, 20, 16, 16) if bad else None))
        time.sleep(0.05)
    out, err = mon.communicate(timeout=30)
    pub.stop()
    assert mon.returncode == 0, err
    lines = out.splitlines()
    results = [ln for ln in lines if " frame " in ln and "ALARM" not in ln]
    assert len(results) == 4 and "cam0 frame 0 score 0.2 ok" in results[0] and "defect" in results[1]
    assert "[" in results[1]  # region boxes
    assert any(ln.startswith("ALARM START cam0 id n1-cam0-") for ln in lines)
    saved = sorted(p.name for p in masks.glob("*.png"))
    assert "cam0_1.png" in saved and regions.decode_png((masks / "cam0_1.png").read_bytes()).shape == (64, 96)


def test_monitor_json_mode_times_out_and_stops_on_ctrl_c(tmp_path, broker):
    mon = _start("--broker", f"127.0.0.1:{broker.port}", "--json", "--count", "1", "--timeout", "1")
    out, err = mon.communicate(timeout=15)
    assert mon.returncode == 1 and "timed out after 1 s with 0 of 1 results" in err
    mon = _start("--broker", f"127.0.0.1:{broker.port}", "--json", "--prefix", "haloae/n1")
    cfg = edge_config(tmp_path, broker.port)
    pub = Publisher(cfg, cfg.state_dir)
    pub.start()
    assert pub.client.wait_connected(10)
    pub.publish_result(make_result("cam1", 5))
    time.sleep(0.5)
    mon.send_signal(signal.SIGINT)
    out, err = mon.communicate(timeout=30)
    pub.stop()
    assert mon.returncode == 0 and "Traceback" not in err
    docs = [json.loads(ln) for ln in out.splitlines()]
    assert {"prefix": "haloae/n1", "available": "online"} in docs
    assert [d["frame_id"] for d in docs if "frame_id" in d] == [5]


def test_monitor_help_has_examples():
    out = run_cli(bin_path("haloae-monitor"), "--help").stdout
    assert "examples:" in out and "--save-masks" in out


def test_monitor_says_when_the_broker_is_unreachable_or_refuses(tmp_path):
    from conftest import Broker, free_port

    port = free_port()  # nothing listens there
    proc = subprocess.run([bin_path("haloae-monitor"), "--broker", f"127.0.0.1:{port}", "--timeout", "2"],
                          capture_output=True, text=True, env=CHILD_ENV, timeout=30)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot reach the broker 127.0.0.1:{port} (ConnectionRefusedError" in proc.stderr, proc.stderr
    assert proc.stderr.count("cannot reach") == 1, "said once per reason, not once per retry"
    assert "without a connection" in proc.stderr
    strict = Broker(tmp_path / "strict", extra_conf="allow_anonymous false\n").start()
    try:
        proc = subprocess.run([bin_path("haloae-monitor"), "--broker", f"127.0.0.1:{strict.port}", "--timeout", "2"],
                              capture_output=True, text=True, env=CHILD_ENV, timeout=30)
    finally:
        strict.stop()
    assert proc.returncode == 1 and "refused the connection: Not authorized (reason code 0x87" in proc.stderr, proc.stderr


def test_each_mask_names_its_frame(tmp_path, broker):
    from mqtt_helpers import Subscriber

    sub = Subscriber(broker.port, ["haloae/n1/cam0/result", "haloae/n1/cam0/mask"], mqtt5=True)
    sub.wait_subscribed()
    cfg = edge_config(tmp_path, broker.port, publish={"zmq_pub": None, "max_rate_hz": 0})
    pub = Publisher(cfg, cfg.state_dir)
    pub.start()
    assert pub.client.wait_connected(10)
    for i in (3, 7, 9):
        pub.publish_result(make_result("cam0", i, anomalous=True, blob=(30, 20, 16, 16)))
    sub.wait_for(lambda m: len(m) >= 6)
    pub.stop()
    sub.close()
    masks = [props for (t, _, _), props in zip(sub.messages, sub.properties) if t.endswith("/mask")]
    assert [m["frame_id"] for m in masks] == ["3", "7", "9"] and all(m["camera"] == "cam0" for m in masks)
