"""``haloae-demo``: the whole pipeline on one machine, no camera, GPU or broker needed.

Steps (each reused when its output exists, so a second run takes seconds):
1. ``haloae-synth``: a synthetic line data set (good parts for training, defects for testing);
2. ``haloae-train``: the ``edge`` model, briefly (the shipped training config ``synthetic-edge``);
3. ``haloae-export --fp16``: the deployable bundle;
4. an MQTT broker: the one given with ``--broker`` if reachable, else mosquitto on a free
   port, else an embedded pure-Python broker (amqtt);
5. a line video with known defective runs, inspected by ``haloae-edge`` while
   ``haloae-monitor`` prints what a subscriber sees;
6. a summary: frames inspected, alarms raised (during defective / clean runs), evidence.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import cv2

from . import cli
from .errors import Failure, UserError
from .manifest import MANIFEST

DEMO_TRAIN_IMAGES = 3200  # good parts: 200 to train on, 3000 to calibrate the 0.999 quantile (synthetic-edge)
BIN = Path(sys.executable).parent
EPILOG = """examples:
  haloae-demo                         # everything, in ./.haloae-demo/
  haloae-demo --frames 240            # a longer line video
  haloae-demo --broker 192.0.2.10:1883   # publish to your own broker
  haloae-demo --retrain               # train again instead of reusing the model
"""


def step(n: int, text: str) -> None:
    print(f"\n[{n}/6] {text}", flush=True)


def run(*args: str, env: dict | None = None) -> None:
    proc = subprocess.run([str(BIN / args[0]), *args[1:]], env=env)
    if proc.returncode != 0:
        raise Failure(f"`{' '.join(args)}` exited with code {proc.returncode} (see above)")


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DemoBroker:
    """The broker the demo talks to, started by the demo only when none is reachable."""

    def __init__(self, wanted: str | None, workdir: Path):
        self.proc: subprocess.Popen | None = None
        self.protocol = "5"
        host, _, port = (wanted or "127.0.0.1:1883").partition(":")
        self.host, self.port = host, int(port or 1883)
        if reachable(self.host, self.port):
            self.kind = f"existing broker at {self.host}:{self.port}"
            return
        if wanted:
            raise UserError(f"no MQTT broker answers at {wanted}; start it or leave out --broker")
        self.host, self.port = "127.0.0.1", free_port()
        mosq = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
        if mosq:
            conf = workdir / "mosquitto.conf"
            conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
            self.proc = subprocess.Popen([mosq, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.kind = f"mosquitto started on 127.0.0.1:{self.port}"
        else:
            self.proc = subprocess.Popen([sys.executable, "-m", "haloae.embedded_broker", "--port", str(self.port)])
            self.protocol = "3.1.1"
            self.kind = f"embedded broker (amqtt) started on 127.0.0.1:{self.port}"
        deadline = time.monotonic() + 15
        while not reachable(self.host, self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise Failure("the MQTT broker did not start; install mosquitto or pass --broker")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait(5)


def write_video(path: Path, frames: int, size: int, seed: int) -> list[bool]:
    """A line video of ``frames`` parts; returns which frames are defective. Lossless FFV1 (the
    frames reach the model as generated, like a raw industrial camera's), MJPG where OpenCV has
    no FFV1 encoder."""
    from haloae.synthetic import LineSimulator

    sim = LineSimulator(size=size, seed=seed, run_length=8, defect_every=3)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"FFV1"), 10.0, (size, size))
    if not writer.isOpened():
        writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (size, size))
    truth = []
    for i in range(frames):
        rgb, _ = sim.frame(i)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        truth.append(sim.is_defective(i))
    writer.release()
    return truth


def edge_config(workdir: Path, video: Path, bundle: Path, broker: DemoBroker, threads: int,
                threshold: float | None = None) -> Path:
    cfg = {
        "node": "demo",
        "state_dir": str(workdir / "state"),
        "cameras": [{"id": "line1", "source": str(video), "kind": "file", "lossless": True,
                     "threshold": threshold}],
        "model": {"bundle": str(bundle), "backend": "onnxruntime", "threads": threads},
        "mqtt": {"host": broker.host, "port": broker.port, "protocol": broker.protocol},
        "publish": {"results": "all", "mask": True, "overlay": True, "zmq_pub": None},
        "alarms": {"n": 3, "m": 5, "clear_frames": 4},
    }
    path = workdir / "edge.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is valid YAML
    return path


class Collector:
    """Subscribes like a plant system would and keeps what the summary needs."""

    def __init__(self, broker: DemoBroker, prefix: str):
        import paho.mqtt.client as mqtt

        self.results: dict[int, dict] = {}
        self.alarms: list[dict] = []
        self.available: list[str] = []
        proto = mqtt.MQTTv5 if broker.protocol == "5" else mqtt.MQTTv311
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=proto)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(f"{prefix}/#", qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        if msg.topic.endswith("/result"):
            r = json.loads(msg.payload)
            self.results[int(r["frame_id"])] = r
        elif msg.topic.endswith("/alarm"):
            self.alarms.append(json.loads(msg.payload))
        elif msg.topic.endswith("/available"):
            self.available.append(msg.payload.decode())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def defective_runs(truth: list[bool]) -> list[tuple[int, int]]:
    """(first, last) frame of every run of consecutive defective frames."""
    runs, start = [], None
    for i, bad in enumerate([*truth, False]):
        if bad and start is None:
            start = i
        elif not bad and start is not None:
            runs.append((start, i - 1))
            start = None
    return runs


def summarise(col: Collector, truth: list[bool], workdir: Path, elapsed: float) -> dict:
    starts = [a for a in col.alarms if a.get("event") == "start"]
    frames = [int(a.get("frame_id", -1)) for a in starts]
    during_defect = sum(1 for f in frames if _near_defect(f, truth))
    runs = defective_runs(truth)
    alarmed = sum(1 for lo, hi in runs if any(lo <= f <= hi + 5 for f in frames))
    clean = [r for fid, r in col.results.items() if 0 <= fid < len(truth) and not truth[fid]]
    summary = {
        "frames_in_video": len(truth),
        "frames_inspected": len(col.results),
        "defective_frames": sum(truth),
        "frames_flagged": sum(1 for r in col.results.values() if r.get("verdict") == "defect"),
        "clean_frames_flagged": sum(1 for r in clean if r.get("verdict") == "defect"),
        "clean_frames_with_regions": sum(1 for r in clean if r.get("regions")),
        "frames_judged_ok_with_regions": sum(1 for r in col.results.values()
                                             if r.get("verdict") != "defect" and r.get("regions")),
        "alarms_raised": len(starts),
        "alarms_during_defective_runs": during_defect,
        "alarms_during_clean_runs": len(starts) - during_defect,
        "defective_runs": len(runs),
        "defective_runs_with_an_alarm": alarmed,
        "evidence": str(workdir / "state" / "evidence"),
        "seconds": round(elapsed, 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _near_defect(frame_id: int, truth: list[bool], slack: int = 5) -> bool:
    """An alarm belongs to a defective run if it starts inside one or within ``slack`` frames
    after one ended (debouncing needs a few frames)."""
    return any(truth[i] for i in range(max(frame_id - slack, 0), min(frame_id + 1, len(truth))))


def _same_training(run_dir: Path, train_config: str) -> bool:
    """Whether ``run_dir`` holds a loadable model trained with this config (else: train again)."""
    import yaml

    from haloae.train.checkpoint import CheckpointError, load_checkpoint
    from haloae.train.train_config import load_train_config

    try:
        done = yaml.safe_load((run_dir / "train_config.yaml").read_text())
        load_checkpoint(run_dir / "final.pt")  # an older haloae's checkpoint does not load
    except (OSError, yaml.YAMLError, CheckpointError):
        return False
    return done == load_train_config(train_config).to_dict()


def prepare_bundle(wd: Path, args: argparse.Namespace, env: dict) -> Path:
    """Steps 1-3: data, training, export; each reused when its output exists."""
    step(1, "synthetic line data (good parts to train on, defects to test with)")
    data = wd / "data"
    good = data / "train" / "good"
    if good.is_dir() and len(list(good.glob("*.png"))) >= DEMO_TRAIN_IMAGES:
        print(f"  reusing {data}")
    else:
        shutil.rmtree(data, ignore_errors=True)  # an older, smaller demo set
        run("haloae-synth", "--out", str(data), "--seed", "0", "--train", str(DEMO_TRAIN_IMAGES), env=env)

    step(2, f"training the model (training config {args.train_config})")
    run_dir = wd / "run"
    ckpt = run_dir / "final.pt"
    if ckpt.is_file() and not args.retrain and _same_training(run_dir, args.train_config):
        print(f"  reusing the model trained earlier: {ckpt} (--retrain to train again)")
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # a half-finished earlier run: start afresh
        run("haloae-train", "--config", args.train_config, "--data", str(data), "--out", str(run_dir),
            "--threads", str(args.threads), env=env)

    step(3, "exporting the deployable bundle (ONNX fp32 + fp16)")
    bundle = wd / "bundle"
    manifest = bundle / MANIFEST
    if manifest.is_file() and manifest.stat().st_mtime > ckpt.stat().st_mtime:
        print(f"  reusing {bundle}")
    else:
        run("haloae-export", str(ckpt), "--out", str(bundle), "--data", str(data), "--samples", "4", "--fp16", env=env)
    return bundle


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="haloae-demo", description=__doc__, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path(".haloae-demo"),
                        help="where everything is written (default ./.haloae-demo)")
    parser.add_argument("--frames", type=int, default=96, help="frames in the line video (default 96)")
    parser.add_argument("--broker", help="HOST:PORT of an MQTT broker to use instead of starting one")
    parser.add_argument("--train-config", default="synthetic-edge",
                        help="training config: a shipped name or a YAML path (default synthetic-edge)")
    parser.add_argument("--retrain", action="store_true", help="train again even if a model exists")
    parser.add_argument("--bundle", type=Path, help="use this exported bundle (skips steps 1-3)")
    parser.add_argument("--threshold", type=float, help="image threshold of the camera (default: the bundle's, 0.5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads for training and inference")
    parser.add_argument("--readme-image", type=Path, help="also write the README's detection picture here")
    cli.add_version(parser)
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    wd = args.workdir.resolve()
    wd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}

    if args.bundle:
        bundle = args.bundle.resolve()
        print(f"\n[1-3/6] using the bundle {bundle} (no data, training or export needed)")
    else:
        bundle = prepare_bundle(wd, args, env)

    step(4, "MQTT broker")
    broker = DemoBroker(args.broker, wd)
    print(f"  {broker.kind}")

    step(5, f"inspecting a line video of {args.frames} parts with haloae-edge (haloae-monitor shows what a subscriber sees)")
    video = wd / "line.avi"
    truth = write_video(video, args.frames, 256, seed=7)
    shutil.rmtree(wd / "state", ignore_errors=True)
    config = edge_config(wd, video, bundle, broker, args.threads, args.threshold)
    collector = Collector(broker, "haloae/demo")
    monitor = subprocess.Popen([str(BIN / "haloae-monitor"), "--broker", f"{broker.host}:{broker.port}",
                                "--prefix", "haloae/demo", "--save-masks", str(wd / "masks"),
                                *(["--mqtt3"] if broker.protocol == "3.1.1" else [])], env=env)
    try:
        time.sleep(1.0)
        edge = subprocess.run([str(BIN / "haloae-edge"), "--config", str(config), "--exit-when-done"], env=env)
        time.sleep(1.0)
    finally:
        monitor.terminate()
        monitor.wait(5)
        collector.close()
        broker.stop()
    if edge.returncode != 0:
        raise Failure(f"haloae-edge exited with code {edge.returncode} (see above)")

    step(6, "summary")
    summary = summarise(collector, truth, wd, time.monotonic() - t0)
    for key, value in summary.items():
        print(f"  {key.replace('_', ' '):32s} {value}")
    if args.readme_image:
        from haloae.readme_image import write_detection_image

        write_detection_image(bundle, args.readme_image)
        print(f"  README picture written to {args.readme_image}")
    ok = (summary["defective_runs_with_an_alarm"] == summary["defective_runs"] > 0
          and summary["alarms_during_clean_runs"] == 0
          and summary["clean_frames_with_regions"] == 0
          and summary["frames_judged_ok_with_regions"] == 0)
    print("\n" + ("demo OK: every defective run raised an alarm, clean parts raised none and "
                  "showed no defect region, and no part judged ok showed one" if ok else
                  "demo finished, but alarms or regions did not match the defective runs: see "
                  "summary.json"))
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    return cli.run("haloae-demo", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
