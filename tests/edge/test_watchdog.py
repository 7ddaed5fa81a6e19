"""systemd notify protocol against a real AF_UNIX datagram socket (path and abstract '@')."""

from __future__ import annotations

import os
import socket
import time

import pytest

from haloae.edge.watchdog import Notifier


def _recv_all(sock: socket.socket) -> list[str]:
    out = []
    sock.setblocking(False)
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env_value = path
    else:
        name = f"haloae-test-{os.getpid()}-{time.monotonic_ns()}"
        sock.bind("\0" + name)
        env_value = "@" + name
    yield sock, env_value
    sock.close()


def test_ready_after_first_frame_then_watchdog_only_while_frames_flow(notify_socket):
    sock, addr = notify_socket
    n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "200000"})  # 0.2 s -> ping every 50 ms
    assert n.enabled and n.watchdog_s == pytest.approx(0.2)
    assert _recv_all(sock) == [], "nothing before the first scored frame"
    n.frame_scored(status="inspecting")
    assert _recv_all(sock) == ["READY=1\nSTATUS=inspecting"]
    n.frame_scored()  # too soon after READY: no ping
    assert _recv_all(sock) == []
    for _ in range(5):
        time.sleep(0.06)
        n.frame_scored()
    msgs = _recv_all(sock)
    assert msgs and set(msgs) == {"WATCHDOG=1"} and len(msgs) <= 5
    time.sleep(0.3)  # no frames scored: no pings, whatever the time
    assert _recv_all(sock) == []
    n.status("2/2 cameras online")
    n.stopping()
    assert _recv_all(sock) == ["STATUS=2/2 cameras online", "STOPPING=1\nSTATUS=stopping"]
    n.close()


def test_idle_alive_and_reload_messages(notify_socket):
    sock, addr = notify_socket
    n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "100000"})
    time.sleep(0.03)
    n.idle_alive()
    assert _recv_all(sock) == ["WATCHDOG=1"]
    n.reloading()
    n.reloaded("model m on onnxruntime")
    reloading, ready = _recv_all(sock)
    assert reloading.startswith("RELOADING=1\nMONOTONIC_USEC=") and ready == "READY=1\nSTATUS=model m on onnxruntime"


def test_no_watchdog_without_watchdog_usec_or_for_another_pid(notify_socket):
    sock, addr = notify_socket
    n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid() + 1)})
    assert n.watchdog_s is None
    n.frame_scored()
    time.sleep(0.05)
    n.frame_scored()
    assert _recv_all(sock) == ["READY=1"]


def test_noop_without_notify_socket():
    n = Notifier({})
    assert not n.enabled
    assert n.notify("READY=1") is False
    n.frame_scored()
    n.idle_alive()
    n.stopping()
