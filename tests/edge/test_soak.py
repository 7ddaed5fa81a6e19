"""Endurance (issue 6), shortened: ``bench/soak.py`` for 60 s with one 10 s broker bounce.

The real soak (10 min, two bounces) is ``python bench/soak.py --bundle B --minutes 10 --bounces 2``;
its numbers live in docs/benchmarks.md. This runs the same script, real daemon, real mosquitto,
and checks the same targets: no RSS / fd / thread growth, every alarm event raised is delivered
to a persistent-session subscriber, including the events raised while the broker was down.
"""

import json
import subprocess
import sys

import pytest
from conftest import CHILD_ENV, REPO


@pytest.mark.slow
def test_soak_with_a_broker_bounce_leaks_nothing_and_loses_no_alarm(tmp_path, tiny_bundle):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/soak.py"), "--bundle", str(tiny_bundle),
                           "--minutes", "1", "--bounces", "1", "--outage-s", "10", "--warmup-s", "15",
                           "--out", str(out), "--keep", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=240, env=CHILD_ENV, cwd=REPO)
    assert proc.returncode in (0, 3) and out.is_file(), \
        f"bench/soak.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    r = json.loads(out.read_text())
    print(proc.stdout.splitlines()[-2])
    a, pub = r["alarms"], r["publisher"]
    assert r["daemon_exit_code"] == 0
    assert len(r["outages"]) == 1 and "start_s" in r["outages"][0]
    # it kept inspecting while the broker was down (live results skipped), and reconnected
    assert pub["offline_skipped"] > 0 and pub["connected"]
    assert r["frames_inspected"] > 100
    # no lost alarm: every event the daemon raised arrived, those of the outage included
    assert a["raised"] > 0 and a["delivered_raised_during_outages"] > 0
    assert a["lost"] == 0, f"{a['lost']} alarm events lost, e.g. {a['lost_events']}"
    assert a["unexpected"] == 0 and a["delivered"] == a["raised"] and a["left_in_outbox"] == 0
    # no leaks
    assert r["rss_mb"]["growth"] <= 20.0, r["rss_mb"]
    assert r["fds"]["end"] <= r["fds"]["start"], r["fds"]
    assert r["threads"]["end"] <= r["threads"]["start"], r["threads"]
    assert r["targets_met"] and proc.returncode == 0
