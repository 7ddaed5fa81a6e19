"""Soak: the edge daemon at full rate for minutes, with broker bounces; leaks and lost alarms.

1. starts its own mosquitto (loopback, free port, persistence on) and a persistent-session QoS 1
   subscriber (fixed client id, ``clean_session`` false) that records every alarm event by
   ``(id, seq)``, counts result messages and keeps the daemon's ``stats``;
2. starts ``haloae-edge`` on a ``synthetic`` camera at full rate (no fps cap, regular defect
   runs) with the given bundle, ``OMP_NUM_THREADS=threads``, evidence on with a small quota;
3. samples the daemon's RSS (``/proc/PID/status`` VmRSS), open file descriptors
   (``/proc/PID/fd``) and threads every ``--sample-s`` seconds; "start" is the first sample
   after ``--warmup-s``;
4. bounces the broker ``--bounces`` times, evenly spread over the run after warm-up (stopped for
   ``--outage-s``, restarted on the same port with its persisted sessions);
5. at the end waits until a ``stats`` message reports an empty outbox, SIGTERMs the daemon, lets
   the subscriber listen ``--linger-s`` more seconds, and compares the alarm events the daemon
   raised (its log: one ``alarm <kind> <id>`` line per event, written when the event is stored)
   with the distinct ``(id, seq)`` the subscriber received, per alarm.

Targets (issue 6): RSS growth <= 20 MB, no fd or thread growth, every raised alarm event
delivered. Writes one JSON file; exit code 0 when the targets hold, 3 when not, 1 on failure.

    python bench/soak.py --bundle BUNDLE --minutes 10 --bounces 2 --out bench/results/soak.json
    python bench/soak.py --bundle BUNDLE --minutes 1.5 --bounces 1 --out /tmp/soak.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from haloae.edge import topics
from haloae import runtime
from haloae.manifest import is_bundle

NODE = "soak"
PREFIX = f"haloae/{NODE}"
ALARM_LINE = re.compile(r"\balarm (start|update|end) (\S+) on (\S+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Broker:
    """mosquitto on a loopback port with persistence; ``stop()`` / ``start()`` on the same port."""

    def __init__(self, workdir: Path):
        self.exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
        if self.exe is None:
            sys.exit("bench/soak.py: mosquitto is not installed (apt-get install mosquitto)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.conf, self.proc = free_port(), workdir / "mosquitto.conf", None
        user = "user root\n" if os.geteuid() == 0 else ""  # root mosquitto would drop to a user that cannot write here
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{user}persistence true\n"
                             f"persistence_location {workdir}/\nlog_dest file {workdir}/mosquitto.log\n")

    def start(self) -> None:
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        sys.exit(f"bench/soak.py: mosquitto did not listen on port {self.port}; see {self.conf.parent}/mosquitto.log")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: mosquitto writes its persistence file
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class Listener:
    """Persistent-session subscriber: alarm events by (id, seq), result count, latest stats."""

    def __init__(self, port: int, client_id: str = "haloae-soak-listener"):
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.events: dict[tuple[str, int], dict] = {}
        self.alarm_messages = self.results = self.connects = 0
        self.stats: dict | None = None
        self.stats_at = 0.0  # monotonic arrival time of ``stats``
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  clean_session=False)  # the broker queues QoS 1 alarms while we are away
        self.client.reconnect_delay_set(0.2, 1.0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason, properties) -> None:
        if not reason.is_failure:
            self.connects += 1
            client.subscribe([(topics.every_camera(PREFIX, topics.ALARM), 1), (topics.every_camera(PREFIX, topics.RESULT), 0),
                              (topics.stats(PREFIX), 0)])

    def _on_message(self, client, userdata, msg) -> None:
        with self._lock:
            kind = topics.kind_of(msg.topic)
            if kind == topics.ALARM:
                ev = json.loads(msg.payload)
                self.alarm_messages += 1
                self.events.setdefault((ev["id"], int(ev["seq"])), ev)
            elif kind == topics.RESULT:
                self.results += 1
            elif kind == topics.STATS:
                self.stats, self.stats_at = json.loads(msg.payload), time.monotonic()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def proc_sample(pid: int) -> tuple[float, int, int] | None:
    """(RSS MB, open fds, threads) of a live process, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024.0, fds, int(fields["Threads"])


def raised_events(log_path: Path) -> dict[str, list[str]]:
    """Alarm id -> kinds of the events the daemon raised, in order, from its log."""
    out: dict[str, list[str]] = {}
    for line in log_path.read_text(errors="replace").splitlines():
        m = ALARM_LINE.search(line)
        if m:
            out.setdefault(m.group(2), []).append(m.group(1))
    return out


def compare(raised: dict[str, list[str]], received: dict[tuple[str, int], dict]) -> dict:
    """Raised vs delivered, per alarm: event k of an alarm is delivered iff (id, k) arrived."""
    n_raised = sum(len(k) for k in raised.values())
    lost = [(i, seq) for i, kinds in raised.items() for seq in range(len(kinds)) if (i, seq) not in received]
    unexpected = [key for key in received if key[0] not in raised or key[1] >= len(raised[key[0]])]
    return {"alarms": len(raised), "raised": n_raised, "delivered": len(received) - len(unexpected),
            "lost": len(lost), "lost_events": [f"{i}#{s}" for i, s in lost[:20]], "unexpected": len(unexpected)}


def write_config(work: Path, args, port: int) -> Path:
    cfg = {"node": NODE, "state_dir": str(work / "state"),
           "cameras": [{"id": "cam0", "source": "synthetic", "defect_every": args.defect_every}],
           "model": {"bundle": str(args.bundle.resolve()), "backend": args.backend, "threads": args.threads},
           "mqtt": {"host": "127.0.0.1", "port": port, "reconnect_min_s": 0.5, "reconnect_max_s": 5.0},
           "publish": {"zmq_pub": None, "stats_interval_s": args.stats_s},
           "alarms": {"n": 2, "m": 3, "clear_frames": 3, "update_interval_s": 0.1},  # short alarms get updates too
           "evidence": {"enabled": True, "quota_mb": 5.0, "min_interval_s": 1.0},
           "health": {"log_level": "INFO"}}
    path = work / "soak.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def daemon_command(config: Path) -> list[str]:
    exe = Path(sys.executable).parent / "haloae-edge"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "haloae.edge"]
    return [*cmd, "--config", str(config)]


def bounce_times(args) -> list[float]:
    """Seconds after the daemon's start at which the broker stops (evenly after warm-up)."""
    total = args.minutes * 60
    gap = (total - args.warmup_s) / (args.bounces + 1)
    if args.bounces and gap < args.outage_s + 5:
        sys.exit(f"bench/soak.py: {args.minutes} min cannot hold {args.bounces} bounce(s) of {args.outage_s:g} s "
                 f"after a {args.warmup_s:g} s warm-up; run longer or lower --bounces / --outage-s")
    return [args.warmup_s + k * gap for k in range(1, args.bounces + 1)]


def soak(args, work: Path) -> dict:
    stops = bounce_times(args)
    broker = Broker(work / "broker")
    broker.start()
    listener = Listener(broker.port)
    if not listener.subscribed.wait(10):
        listener.close()
        broker.stop()
        raise RuntimeError("the subscriber could not subscribe to the soak's broker")
    config = write_config(work, args, broker.port)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "PYTHONUNBUFFERED": "1"}
    log_path = work / "daemon.log"
    log_file = log_path.open("w")
    daemon = subprocess.Popen(daemon_command(config), stdout=log_file, stderr=subprocess.STDOUT, env=env)
    t0, total = time.monotonic(), args.minutes * 60
    samples, outages, stats_start, next_sample, next_progress = [], [], None, 0.0, args.progress_s
    exit_code = drained_at = stats_end = None
    try:
        print(f"soak: daemon pid {daemon.pid}, broker port {broker.port}, {args.minutes:g} min, "
              f"bounces at {[round(s) for s in stops]} s", flush=True)
        while (t := time.monotonic() - t0) < total:
            if daemon.poll() is not None:
                raise RuntimeError(f"haloae-edge exited {daemon.returncode} after {t:.0f} s:\n"
                                   + log_path.read_text()[-3000:])
            if stops and t >= stops[0]:
                stops.pop(0)
                broker.stop()
                outages.append({"stop_s": round(t, 1), "stop_epoch": time.time()})
                print(f"[{t:5.0f} s] broker stopped for {args.outage_s:g} s", flush=True)
            if outages and "start_s" not in outages[-1] and t >= outages[-1]["stop_s"] + args.outage_s:
                broker.start()
                outages[-1].update(start_s=round(t, 1), start_epoch=time.time())
                print(f"[{t:5.0f} s] broker restarted", flush=True)
            if t >= next_sample:
                next_sample = t + args.sample_s
                s = proc_sample(daemon.pid)
                if s:
                    samples.append((round(t, 1), *s))
                    if stats_start is None and t >= args.warmup_s and listener.stats:
                        stats_start = listener.stats
            if t >= next_progress:
                next_progress = t + args.progress_s
                _progress(t, samples, listener, raised_events(log_path), broker.proc is not None)
            time.sleep(0.2)
        drained_at = _wait_drained(listener, outages, t0, args.drain_timeout_s)
        end = proc_sample(daemon.pid)
        if end:
            samples.append((round(time.monotonic() - t0, 1), *end))
        stats_end = listener.stats
        daemon.send_signal(signal.SIGTERM)
        try:
            exit_code = daemon.wait(15)
        except subprocess.TimeoutExpired:
            daemon.kill()
            exit_code = daemon.wait()
        time.sleep(args.linger_s)  # the last events (shutdown ends) reach the subscriber
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log_file.close()
        listener.close()
        broker.stop()
    return summarise(args, work, samples, outages, listener, stats_start, stats_end, drained_at, exit_code, log_path)


def _progress(t: float, samples: list, listener: Listener, raised: dict, broker_up: bool) -> None:
    rss, fds, threads = samples[-1][1:] if samples else (0.0, 0, 0)
    st = listener.stats or {}
    cam = st.get("cameras", {}).get("cam0", {})
    n_raised = sum(len(k) for k in raised.values())
    print(f"[{t:5.0f} s] RSS {rss:6.1f} MB, {fds} fds, {threads} threads | {cam.get('inspected', 0)} frames "
          f"({cam.get('fps', 0):.1f}/s) | alarm events raised {n_raised}, received {len(listener.events)} | "
          f"broker {'up' if broker_up else 'DOWN'}", flush=True)


def _wait_drained(listener: Listener, outages: list, t0: float, timeout: float) -> float | None:
    """Wait for a stats message, newer than the last broker restart, that shows an empty outbox."""
    after = max([t0 + o["start_s"] for o in outages if "start_s" in o], default=t0)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = listener.stats or {}
        pub = st.get("publisher", {})
        if listener.stats_at > after and pub.get("connected") and pub.get("outbox_pending") == 0:
            return round(time.monotonic() - t0, 1)
        time.sleep(0.2)
    print(f"soak: the outbox did not drain within {timeout:g} s of the end", flush=True)
    return None


def summarise(args, work, samples, outages, listener, stats_start, stats_end, drained_at, exit_code, log_path) -> dict:
    steady = [s for s in samples if s[0] >= args.warmup_s] or samples
    if len(steady) < 2:
        raise RuntimeError("too few samples after the warm-up: run longer or lower --warmup-s")
    start, end = steady[0], steady[-1]
    ts, rss = np.array([s[0] for s in steady]), np.array([s[1] for s in steady])
    slope = float(np.polyfit(ts / 60.0, rss, 1)[0]) if len(steady) > 2 else 0.0
    cmp = compare(raised_events(log_path), listener.events)
    in_outage = sum(1 for ev in listener.events.values()
                    if any(o["stop_epoch"] <= ev["epoch"] <= o.get("start_epoch", float("inf")) for o in outages))
    db = work / "state" / "outbox.sqlite"
    with sqlite3.connect(db) as con:
        left = con.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    cam_end = (stats_end or {}).get("cameras", {}).get("cam0", {})
    cam_start = (stats_start or {}).get("cameras", {}).get("cam0", {})
    span = (stats_end or {}).get("uptime_s", 0) - (stats_start or {}).get("uptime_s", 0)
    fps = (cam_end.get("inspected", 0) - cam_start.get("inspected", 0)) / span if span > 0 else None
    growth = end[1] - start[1]
    targets = {"rss_growth_le_20mb": growth <= 20.0, "no_fd_growth": end[2] <= start[2],
               "no_thread_growth": end[3] <= start[3],
               "alarms_raised_eq_delivered": cmp["raised"] > 0 and cmp["lost"] == 0 and cmp["unexpected"] == 0,
               "daemon_exit_0": exit_code == 0}
    return {
        "command": " ".join(["bench/soak.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version()},
        "settings": {"minutes": args.minutes, "bounces": args.bounces, "outage_s": args.outage_s,
                     "warmup_s": args.warmup_s, "backend": args.backend, "threads": args.threads,
                     "defect_every": args.defect_every, "bundle": str(args.bundle)},
        "backend": (stats_end or {}).get("backend"),
        "outages": [{k: v for k, v in o.items() if not k.endswith("epoch")} for o in outages],
        "drained_at_s": drained_at,
        "rss_mb": {"start": round(start[1], 1), "end": round(end[1], 1), "growth": round(growth, 1),
                   "max": round(float(rss.max()), 1), "slope_mb_per_min": round(slope, 3), "start_at_s": start[0]},
        "fds": {"start": start[2], "end": end[2], "max": max(s[2] for s in steady)},
        "threads": {"start": start[3], "end": end[3], "max": max(s[3] for s in steady)},
        "frames_inspected": cam_end.get("inspected"), "fps": round(fps, 2) if fps else None,
        "frames_dropped_at_handoff": cam_end.get("dropped"), "capture_errors": cam_end.get("errors"),
        "results_received": listener.results, "publisher": (stats_end or {}).get("publisher"),
        "alarms": {**cmp, "raised_per_last_stats": ((stats_end or {}).get("publisher") or {}).get("alarm_events"),
                   "messages_received": listener.alarm_messages,
                   "duplicates": listener.alarm_messages - len(listener.events),
                   "delivered_raised_during_outages": in_outage, "left_in_outbox": left},
        "daemon_exit_code": exit_code, "targets": targets, "targets_met": all(targets.values()),
        "samples": [[t, round(r, 1), f, n] for t, r, f, n in samples],
    }


def summary_line(r: dict) -> str:
    a, t = r["alarms"], r["targets"]
    return (f"soak {r['settings']['minutes']:g} min, {len(r['outages'])} broker bounce(s) of "
            f"{r['settings']['outage_s']:g} s, {r['backend']}: {r['frames_inspected']} frames inspected "
            f"({r['fps']} frames/s); RSS {r['rss_mb']['start']} -> {r['rss_mb']['end']} MB "
            f"(growth {r['rss_mb']['growth']:+.1f} MB, slope {r['rss_mb']['slope_mb_per_min']:+.2f} MB/min); "
            f"fds {r['fds']['start']} -> {r['fds']['end']}, threads {r['threads']['start']} -> {r['threads']['end']}; "
            f"alarm events raised {a['raised']} ({a['alarms']} alarms), delivered {a['delivered']} distinct "
            f"({a['delivered_raised_during_outages']} raised during outages), lost {a['lost']}, duplicates "
            f"{a['duplicates']}, left in outbox {a['left_in_outbox']}; daemon exit {r['daemon_exit_code']}. "
            f"Targets {'MET' if r['targets_met'] else 'NOT MET: ' + ', '.join(k for k, v in t.items() if not v)}.")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="bundle folder (haloae-export --out)")
    p.add_argument("--out", type=Path, default=Path("bench/results/soak.json"), help="JSON written here")
    p.add_argument("--minutes", type=float, default=10.0, help="run time of the daemon before SIGTERM")
    p.add_argument("--bounces", type=int, default=2, help="broker restarts, evenly spread after the warm-up")
    p.add_argument("--outage-s", type=float, default=15.0, help="seconds the broker stays down per bounce")
    p.add_argument("--warmup-s", type=float, default=30.0, help="seconds before the 'start' sample")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between RSS / fd / thread samples")
    p.add_argument("--stats-s", type=float, default=5.0, help="the daemon's publish.stats_interval_s")
    p.add_argument("--progress-s", type=float, default=15.0, help="seconds between progress lines")
    p.add_argument("--drain-timeout-s", type=float, default=30.0, help="longest wait for the outbox to drain")
    p.add_argument("--linger-s", type=float, default=3.0, help="subscriber listens this long after the daemon exits")
    p.add_argument("--backend", default="onnxruntime", choices=runtime.choices())
    p.add_argument("--threads", type=int, default=1, help="inference threads (and OMP_NUM_THREADS of the daemon)")
    p.add_argument("--defect-every", type=int, default=2,
                   help="synthetic camera: every n-th run of 8 frames is defective")
    p.add_argument("--keep", type=Path, help="keep the work folder (daemon log, state, broker log) here")
    args = p.parse_args(argv)
    args.bundle = args.bundle.resolve()  # the daemon config lives in a temporary folder
    if not is_bundle(args.bundle):
        sys.exit(f"bench/soak.py: no bundle at {args.bundle} (manifest.json missing); make one with haloae-export")
    if args.keep:
        shutil.rmtree(args.keep, ignore_errors=True)
        args.keep.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="haloae-soak-") as tmp:
        work = args.keep.resolve() if args.keep else Path(tmp)
        try:
            report = soak(args, work)
        except RuntimeError as e:
            sys.exit(f"bench/soak.py: {e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(summary_line(report))
    print(f"written to {args.out}")
    sys.exit(0 if report["targets_met"] else 3)


if __name__ == "__main__":
    main()
