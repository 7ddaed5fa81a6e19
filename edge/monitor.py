"""haloae-monitor: print HaloAE results and alarms as they arrive (the example to copy).

Subscribes to ``<prefix>/+/result``, ``<prefix>/+/alarm`` and ``<prefix>/available`` (and
``<prefix>/+/mask`` with ``--save-masks``); prints one line per result and a highlighted line
per alarm event. Replace ``on_alarm`` with what your plant needs (a PLC output, a text
message, an MES call). Alarm events are QoS 1 and may arrive twice: drop repeats by
``(id, seq)``, as done here. A ``mask`` names its frame in the MQTT 5 user property
``frame_id`` (with 3.1.1: it follows its ``result``). A broker that cannot be reached or that
refuses the connection is said on stderr (once per reason) while the monitor retries.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from haloae import cli
from haloae.errors import UserError

from . import topics
from .mqtt_health import code_of, refusal_hint

EPILOG = """examples:
  haloae-monitor --broker localhost                       # every node under haloae/
  haloae-monitor --broker mqtt.plant:8883 --tls-ca ca.crt --username monitor --prefix haloae/line1
  haloae-monitor --broker localhost --save-masks masks/ --count 100
  HALOAE_MQTT_PASSWORD=secret haloae-monitor --broker localhost --username ops --json
"""
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
RED, BOLD, RESET = "\033[31m", "\033[1m", "\033[0m"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="haloae-monitor", description=__doc__.splitlines()[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--broker", required=True, help="HOST or HOST:PORT (port 1883, or 8883 with --tls-ca)")
    p.add_argument("--prefix", default="haloae/+", help="topic prefix; default haloae/+ (all nodes)")
    p.add_argument("--username", help="MQTT user; the password is read from $HALOAE_MQTT_PASSWORD")
    p.add_argument("--tls-ca", type=Path, help="CA certificate: connect with TLS")
    p.add_argument("--save-masks", type=Path, metavar="DIR", help="save each mask PNG as DIR/<camera>_<frame>.png")
    p.add_argument("--count", type=int, help="exit after this many results")
    p.add_argument("--timeout", type=float, help="exit after this many seconds (exit code 1 if --count was not reached)")
    p.add_argument("--json", action="store_true", help="print the raw JSON payloads, one per line")
    p.add_argument("--mqtt3", action="store_true", help="speak MQTT 3.1.1 instead of 5 (older brokers)")
    cli.add_version(p)
    return p.parse_args(argv)


def _broker(args: argparse.Namespace) -> tuple[str, int]:
    """``--broker HOST[:PORT]`` as (host, port); a bad port or an unreadable --tls-ca is the user's to fix."""
    host, _, port = args.broker.partition(":")
    if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)):
        raise UserError(f"--broker {args.broker}: use HOST or HOST:PORT with a port 1..65535")
    if args.tls_ca and not args.tls_ca.is_file():
        raise UserError(f"--tls-ca {args.tls_ca}: no such file; pass the CA certificate the broker's "
                        "certificate is signed with")
    return host, int(port or (8883 if args.tls_ca else 1883))


class Monitor:
    def __init__(self, args: argparse.Namespace):
        self.args, self.results, self.done = args, 0, threading.Event()
        self.last_frame: dict[str, int] = {}  # camera -> frame id of its last result (names mask files)
        self.seen: set[tuple[str, int]] = set()  # (alarm id, seq): drops QoS 1 repeats
        self.color = sys.stdout.isatty()
        self.connected_once = False
        self._said: str | None = None  # the last connection problem printed (said once per reason)

    def say_problem(self, text: str) -> None:
        if text != self._said:
            self._said = text
            print(f"haloae-monitor: {text}", file=sys.stderr, flush=True)

    def on_connect(self, client, userdata, flags, reason, properties):
        if reason.is_failure:
            code = code_of(reason)
            self.say_problem(f"the broker {self.args.broker} refused the connection: {reason} (reason code "
                             f"0x{code:02X}; {refusal_hint(code)}); retrying")
            return
        self.connected_once, self._said = True, None
        kinds = [topics.RESULT, topics.ALARM] + ([topics.MASK] if self.args.save_masks else [])
        self.kinds = ",".join(kinds)
        client.subscribe([(topics.every_camera(self.args.prefix, k), 1) for k in kinds]
                         + [(topics.available(self.args.prefix), 1)])

    def on_connect_fail(self, client, userdata):
        err = sys.exc_info()[1]  # paho calls this inside its ``except OSError``
        what = f"{type(err).__name__}: {err}" if err else "connection failed"
        self.say_problem(f"cannot reach the broker {self.args.broker} ({what}); is it running, is the address "
                         "right (--broker HOST:PORT, --tls-ca for TLS)? retrying")

    def on_disconnect(self, client, userdata, flags, reason, properties):
        if self.connected_once and not self.done.is_set():
            self.say_problem(f"lost the broker {self.args.broker} ({reason}); reconnecting")

    def on_subscribe(self, client, userdata, mid, reason_codes, properties):
        print(f"listening on {self.args.broker} for {self.args.prefix}/+/{{{self.kinds}}} (Ctrl-C to stop)",
              file=sys.stderr, flush=True)

    def on_message(self, client, userdata, msg):
        parts = msg.topic.split("/")
        camera, kind = (parts[-2], parts[-1]) if len(parts) >= 2 else ("?", "?")
        if kind == topics.AVAILABLE:
            node, state = "/".join(parts[:-1]), msg.payload.decode(errors="replace")
            print(json.dumps({"prefix": node, "available": state}) if self.args.json else f"{node} is {state}", flush=True)
        elif kind == topics.MASK:
            props = dict(getattr(msg.properties, "UserProperty", None) or [])  # MQTT 5: the mask names its frame
            frame = props.get("frame_id")
            self.save_mask(camera, msg.payload, int(frame) if frame and frame.isdigit() else None)
        elif kind in (topics.RESULT, topics.ALARM):
            try:
                doc = json.loads(msg.payload)
            except ValueError:
                print(f"{msg.topic}: not JSON ({len(msg.payload)} bytes)", file=sys.stderr)
                return
            if kind == topics.RESULT:
                self.on_result(doc)
            elif (doc.get("id"), doc.get("seq")) not in self.seen:
                self.seen.add((doc.get("id"), doc.get("seq")))
                self.on_alarm(doc)

    def on_result(self, r: dict):
        self.last_frame[r.get("camera", "?")] = r.get("frame_id", 0)
        if self.args.json:
            print(json.dumps(r), flush=True)
        else:
            boxes = " ".join(f"[{g['x']},{g['y']} {g['w']}x{g['h']}]" for g in r.get("regions", [])[:4])
            print(f"{r.get('timestamp')} {r.get('camera')} frame {r.get('frame_id')} score {r.get('score')} "
                  f"{r.get('verdict')} {boxes}".rstrip(), flush=True)
        self.results += 1
        if self.args.count and self.results >= self.args.count:
            self.done.set()

    def on_alarm(self, a: dict):
        """Raise your alarm here: a['event'] is start / update / end, a['id'] names the alarm."""
        if self.args.json:
            print(json.dumps(a), flush=True)
            return
        line = (f"ALARM {a.get('event', '?').upper()} {a.get('camera')} id {a.get('id')} "
                f"score {a.get('score')} max {a.get('max_score')} frames {a.get('anomalous_frames')}/{a.get('frames')}")
        print(f"{BOLD}{RED}{line}{RESET}" if self.color else line, flush=True)

    def save_mask(self, camera: str, png: bytes, frame_id: int | None = None):
        """Save as ``<camera>_<frame id>.png``: the mask's own frame id (MQTT 5), else that of the
        camera's last result (3.1.1: a mask follows its result on the same connection)."""
        if not _SAFE.match(camera):  # a topic level becomes a file name: keep it harmless
            return
        self.args.save_masks.mkdir(parents=True, exist_ok=True)
        frame = frame_id if frame_id is not None else self.last_frame.get(camera, 0)
        (self.args.save_masks / f"{camera}_{frame}.png").write_bytes(png)


def _main(argv=None) -> int:
    args = parse_args(argv)
    host, port = _broker(args)
    mon = Monitor(args)
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311 if args.mqtt3 else mqtt.MQTTv5)
    client.on_connect, client.on_subscribe, client.on_message = mon.on_connect, mon.on_subscribe, mon.on_message
    client.on_connect_fail, client.on_disconnect = mon.on_connect_fail, mon.on_disconnect
    client.reconnect_delay_set(1, 10)
    if args.username:
        client.username_pw_set(args.username, os.environ.get("HALOAE_MQTT_PASSWORD"))
    if args.tls_ca:
        client.tls_set(ca_certs=str(args.tls_ca))
    client.connect_async(host, port)
    stopped = threading.Event()  # Ctrl-C / SIGTERM: a flag polled below, never an exception
    for sig in (signal.SIGINT, signal.SIGTERM):  # raised inside paho or a lock wait
        signal.signal(sig, lambda *_: stopped.set())
    client.loop_start()
    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    while not (mon.done.is_set() or stopped.is_set()):
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            break
        mon.done.wait(0.2 if left is None else min(0.2, left))
    finished = mon.done.is_set() or stopped.is_set()
    client.disconnect()
    client.loop_stop()
    if not finished and not mon.connected_once:
        print(f"haloae-monitor: timed out after {args.timeout:g} s without a connection to {args.broker}", file=sys.stderr)
        return 1
    if not finished and args.count:
        print(f"timed out after {args.timeout:g} s with {mon.results} of {args.count} results", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    """Exit 0 done (or stopped), 1 timed out, 2 bad arguments (one line)."""
    return cli.run("haloae-monitor", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
