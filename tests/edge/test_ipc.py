"""Latest-frame hand-off over real ZeroMQ sockets: a slow consumer sees only recent frames,
drops are counted per camera, lossless cameras get back-pressure instead of drops."""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from haloae.edge.ipc import FrameSender, LatestFrames, ResultPub


def _send_frames(ctx, base, camera, n, lossless=False, period=0.0, stop=None):
    sender = FrameSender(ctx, base, camera, lossless)
    try:
        for i in range(n):
            if stop is not None and stop.is_set():
                break
            img = np.full((12, 16, 3), i % 256, np.uint8)
            sender.send(i, time.time(), img, stop=stop)
            if period:
                time.sleep(period)
    finally:
        sender.close()
    return sender


def test_slow_consumer_gets_latest_frames_and_drops_are_counted():
    ctx = zmq.Context()
    base = "inproc://test-latest"
    frames = LatestFrames({"a": False, "b": False}, ctx, base).start()
    try:
        ta = threading.Thread(target=_send_frames, args=(ctx, base, "a", 200, False, 0.002))
        tb = threading.Thread(target=_send_frames, args=(ctx, base, "b", 100, False, 0.004))
        ta.start(), tb.start()
        seen = {"a": [], "b": []}
        deadline = time.monotonic() + 10
        while (ta.is_alive() or tb.is_alive() or frames.pending()) and time.monotonic() < deadline:
            got = frames.take(8, timeout=0.1)
            assert len({f.camera for f in got}) == len(got), "at most one frame per camera per take"
            for f in got:
                seen[f.camera].append(f.frame_id)
                assert f.image.shape == (12, 16, 3) and f.image[0, 0, 0] == f.frame_id % 256
            time.sleep(0.05)  # a slow model: 50 ms per batch
        ta.join(), tb.join()
        for cam, n in (("a", 200), ("b", 100)):
            ids = seen[cam]
            assert ids == sorted(ids) and len(ids) < n / 3, f"{cam}: a backlog was built: {len(ids)} of {n}"
            assert ids[-1] == n - 1, f"{cam}: the newest frame must reach inference, got {ids[-1]}"
            # every frame is either inspected or counted as dropped
            assert len(ids) + frames.dropped(cam) == n, (cam, len(ids), frames.dropped(cam))
            assert frames.received(cam) + frames._sender_dropped[cam] == n
    finally:
        frames.stop()
        ctx.term()


def test_frames_are_fresh_when_consumer_is_slow():
    """The frame handed over is the newest one, not one that waited during inference."""
    ctx = zmq.Context()
    base = "inproc://test-fresh"
    frames = LatestFrames({"a": False}, ctx, base).start()
    stop = threading.Event()
    try:
        t = threading.Thread(target=_send_frames, args=(ctx, base, "a", 10_000, False, 0.002, stop))
        t.start()
        ages = []
        for _ in range(8):
            time.sleep(0.1)  # "inference"
            got = frames.take(1, timeout=1.0)
            ages.append(time.time() - got[0].timestamp)
        stop.set()
        assert max(ages) < 0.05, f"stale frames handed over: ages {ages}"
        t.join(5)
    finally:
        stop.set()
        frames.stop()
        ctx.term()


def test_lossless_camera_is_never_dropped():
    ctx = zmq.Context()
    base = "inproc://test-lossless"
    frames = LatestFrames({"a": True}, ctx, base).start()
    try:
        t = threading.Thread(target=_send_frames, args=(ctx, base, "a", 30, True))
        t.start()
        ids = []
        while len(ids) < 30:
            got = frames.take(1, timeout=2.0)
            assert got, f"lossless frames stopped arriving after {ids[-1:]}"
            ids.append(got[0].frame_id)
            time.sleep(0.01)
        t.join(5)
        assert ids == list(range(30)) and frames.dropped("a") == 0
    finally:
        frames.stop()
        ctx.term()


def test_result_pub_reaches_a_subscriber():
    ctx = zmq.Context()
    pub = ResultPub("inproc://test-results", ctx)
    sub = ctx.socket(zmq.SUB)
    sub.connect("inproc://test-results")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        deadline = time.monotonic() + 5
        while not sub.poll(50) and time.monotonic() < deadline:  # slow-joiner: resend until seen
            pub.send("cam/result", b'{"score": 1}')
        topic, payload = sub.recv_multipart()
        assert topic == b"cam/result" and payload == b'{"score": 1}'
    finally:
        sub.close(0)
        pub.close()
        ctx.term()
