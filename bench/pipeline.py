"""Benchmark: the whole edge daemon vs its inference backend alone, on the same frames.

1. writes a video (MJPG .avi) of ``--frames`` synthetic line frames;
2. backend alone: decodes those frames, preprocesses them, and times ``backend.run`` (and
   preprocessing + run) frame by frame;
3. daemon, throughput: ``haloae-edge --exit-when-done`` on the video with ``lossless: true``
   (every frame inspected, capture never drops) and a real mosquitto; frames/s measured from the
   arrival of the first to the last ``result`` message at a subscriber;
4. daemon, latency: the same video paced at ``--live-fraction`` of the backend's rate, dropping
   frames like a live camera; capture-to-publish latency p50/p99 from the results' ``latency_ms``.

Writes one JSON file; ``ratio`` = daemon fps / backend fps (issue 5 target: >= 0.9).

    python bench/pipeline.py --bundle BUNDLE --out bench/results/pipeline.json
    python bench/pipeline.py --bundle BUNDLE --frames 100 --threads 2 --backend onnxruntime
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import yaml

from haloae import runtime


def write_video(path: Path, n: int, size: int) -> None:
    from haloae.synthetic import LineSimulator

    sim = LineSimulator(size=size, seed=0, run_length=8, defect_every=3)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (size, size))
    for i in range(n):
        vw.write(cv2.cvtColor(sim.frame(i)[0], cv2.COLOR_RGB2BGR))
    vw.release()


def read_video(path: Path) -> list[np.ndarray]:
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            return frames
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))


def bench_backend(bundle: Path, backend_name: str, threads: int, frames: list[np.ndarray], state: Path,
                  precision: str = "fp32") -> dict:
    from haloae.preprocess import to_batch
    from haloae.runtime import load_backend

    backend = load_backend(bundle, backend_name, threads=threads, precision=precision, engine_dir=state)
    n = backend.input_shape[0]
    xs = [to_batch([f] * n, backend.input_shape) for f in frames]
    for x in xs[:5]:  # warm-up
        backend.run(x)
    t0 = time.perf_counter()
    for x in xs:
        backend.run(x)
    run_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in frames:
        backend.run(to_batch([f] * n, backend.input_shape))
    full_s = time.perf_counter() - t0
    return {"backend": backend.description, "fps": len(xs) * n / run_s,
            "fps_with_preprocess": len(frames) * n / full_s, "ms_per_call": 1000 * run_s / len(xs)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_broker(workdir: Path) -> tuple[subprocess.Popen, int]:
    exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                             if os.path.exists(p)), None)
    if exe is None:
        sys.exit("bench/pipeline.py: mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    sys.exit("bench/pipeline.py: mosquitto did not start")


class ResultSink:
    """Subscribes to ``<prefix>/+/result`` and records (arrival time, payload)."""

    def __init__(self, port: int, prefix: str):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from haloae.edge import topics

        self.items: list[tuple[float, dict]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.client.on_connect = lambda c, *a: c.subscribe(topics.every_camera(prefix, topics.RESULT), qos=0)
        self.client.on_subscribe = lambda *a: self.ready.set()
        self.client.on_message = lambda c, u, m: self.items.append((time.monotonic(), json.loads(m.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self.ready.wait(10):
            sys.exit("bench/pipeline.py: cannot subscribe to the broker")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_daemon(work: Path, port: int, bundle: Path, video: Path, backend: str, threads: int,
               camera: dict, name: str, env: dict, precision: str = "fp32") -> list[tuple[float, dict]]:
    cfg = {"node": name, "state_dir": str(work / "state"),
           "cameras": [{"id": "cam1", "source": str(video), **camera}],
           "model": {"bundle": str(bundle), "backend": backend, "threads": threads, "precision": precision},
           "mqtt": {"host": "127.0.0.1", "port": port},
           "publish": {"zmq_pub": None, "stats_interval_s": 5},
           "evidence": {"enabled": False}, "health": {"log_level": "WARNING"}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sink = ResultSink(port, f"haloae/{name}")
    try:
        proc = subprocess.run([sys.executable, "-m", "haloae.edge", "--config", str(path), "--exit-when-done"],
                              env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            sys.exit(f"bench/pipeline.py: haloae-edge exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        time.sleep(0.5)  # last messages in flight
    finally:
        sink.close()
    return sink.items


def pct(values) -> dict:
    if not values:
        return {"p50": None, "p99": None}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 2), "p99": round(float(p99), 2)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (haloae-export --out)")
    p.add_argument("--out", type=Path, default=Path("bench/results/pipeline.json"), help="JSON written here")
    p.add_argument("--frames", type=int, default=200, help="frames in the test video")
    p.add_argument("--size", type=int, default=256, help="frame size (square)")
    p.add_argument("--backend", default="onnxruntime", choices=runtime.choices())
    p.add_argument("--threads", type=int, default=1, help="inference threads for both measurements")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16"], help="model file / TensorRT engine precision")
    p.add_argument("--live-fraction", type=float, default=0.6, help="latency run: source fps as a fraction of the backend's")
    args = p.parse_args(argv)
    args.bundle = args.bundle.resolve()  # the daemon config lives in a temporary folder
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}

    with tempfile.TemporaryDirectory(prefix="haloae-bench-") as tmp:
        work = Path(tmp)
        video = work / "line.avi"
        print(f"[1/4] writing {args.frames} frames of {args.size}x{args.size} to {video.name}", flush=True)
        write_video(video, args.frames, args.size)
        frames = read_video(video)
        print("[2/4] backend alone", flush=True)
        alone = bench_backend(args.bundle, args.backend, args.threads, frames, work / "state" / "engines", args.precision)
        print(f"      {alone['backend']}: {alone['fps']:.1f} frames/s ({alone['fps_with_preprocess']:.1f} with "
              "preprocessing)", flush=True)
        broker, port = start_broker(work)
        try:
            print("[3/4] daemon, lossless file source (throughput)", flush=True)
            items = run_daemon(work, port, args.bundle, video, args.backend, args.threads, {"lossless": True},
                               "bench", env, precision=args.precision)
            times = [t for t, _ in items]
            daemon_fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
            live_fps = round(args.live_fraction * alone["fps"], 1)
            print(f"      {len(items)} results, {daemon_fps:.1f} frames/s", flush=True)
            print(f"[4/4] daemon, file paced at {live_fps} frames/s (latency, drops like a live camera)", flush=True)
            live = run_daemon(work, port, args.bundle, video, args.backend, args.threads, {"fps": live_fps},
                              "benchlive", env, precision=args.precision)
        finally:
            broker.terminate()
            broker.wait(5)
    lat = {k: pct([d["latency_ms"][k] for _, d in live]) for k in ("capture", "queue", "inference", "total")}
    report = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "opencv": cv2.__version__},
        "frames": args.frames, "size": args.size, "threads": args.threads, "backend": alone["backend"],
        "backend_fps": round(alone["fps"], 2), "backend_fps_with_preprocess": round(alone["fps_with_preprocess"], 2),
        "daemon_fps": round(daemon_fps, 2), "daemon_results": len(items),
        "ratio": round(daemon_fps / alone["fps"], 3) if alone["fps"] else None,
        "throughput_latency_ms": {k: pct([d["latency_ms"][k] for _, d in items]) for k in ("inference", "total")},
        "live": {"source_fps": live_fps, "results": len(live), "latency_ms": lat},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"ratio daemon/backend {report['ratio']}; capture-to-publish latency p50 {lat['total']['p50']} ms, "
          f"p99 {lat['total']['p99']} ms; written to {args.out}")


if __name__ == "__main__":
    main()
