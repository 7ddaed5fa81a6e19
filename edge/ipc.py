"""ZeroMQ plumbing of the daemon: latest-frame hand-off (capture → inference) and a result PUB.

Latest-frame hand-off. Each camera's capture worker owns a :class:`FrameSender` (a PUSH socket,
``SNDHWM=1``) connected to its own endpoint ``<base>-<camera>`` (``inproc://`` for the
daemon's threads, ``ipc://`` works unchanged across processes). :class:`LatestFrames` binds one
PULL socket per camera and runs a collector thread that drains them continuously into a
one-slot mailbox per camera; a frame that replaces one inference has not taken yet is counted
as *dropped* for its camera. So a slow model always gets the newest frame of each camera and
never a backlog; queue depth per camera is 0 or 1.

``lossless`` cameras (replaying recordings, tests, benchmarks) are the exception: while their
slot is full the collector stops reading their socket, the 1-message pipe fills and the
sender's blocking ``send`` waits for inference: back-pressure instead of drops.

Wire format: a two-part message ``[header JSON, pixel bytes]``; the header holds camera, frame
id, capture wall-clock time, shape, dtype and the sender's own drop/error counters. Pixels
travel without a copy (``copy=False``) and are received as a numpy view of the message buffer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "inproc://haloae-frames"


def endpoint_for(base: str, camera: str) -> str:
    """The per-camera endpoint (camera ids are ``[A-Za-z0-9_-]``, safe in any transport)."""
    return f"{base}-{camera}"


@dataclass
class Frame:
    """One captured frame as inference receives it."""

    camera: str
    frame_id: int
    timestamp: float  # capture wall-clock time (time.time())
    image: np.ndarray  # HxWx3 uint8 RGB (after ROI crop)
    capture_ms: float = 0.0  # time spent reading/decoding/cropping the frame
    sent_mono: float = 0.0  # time.monotonic() at send (same host: queue latency)
    received_mono: float = field(default_factory=time.monotonic)


class FrameSender:
    """Capture side: sends frames of one camera; counts the ones it had to drop.

    Create and use it in the capture thread (ZeroMQ sockets are not thread-safe).
    """

    def __init__(self, ctx: zmq.Context, base: str, camera: str, lossless: bool = False):
        self.camera, self.lossless = camera, lossless
        self.dropped = 0  # frames refused because the pipe was full (lossy cameras only)
        self.sock = ctx.socket(zmq.PUSH)
        self.sock.setsockopt(zmq.SNDHWM, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint_for(base, camera))

    def send(self, frame_id: int, timestamp: float, image: np.ndarray, capture_ms: float = 0.0,
             errors: int = 0, stop: threading.Event | None = None) -> bool:
        """Send one frame; False when it was dropped (lossy) or ``stop`` was set (lossless)."""
        image = np.ascontiguousarray(image)
        header = json.dumps({"camera": self.camera, "frame_id": frame_id, "ts": timestamp,
                             "shape": list(image.shape), "dtype": image.dtype.str,
                             "capture_ms": capture_ms, "sent": time.monotonic(),
                             "dropped": self.dropped, "errors": errors}).encode()
        if not self.lossless:
            try:
                self.sock.send_multipart([header, image], flags=zmq.NOBLOCK, copy=False)
                return True
            except zmq.Again:
                self.dropped += 1
                return False
        while stop is None or not stop.is_set():  # lossless: wait for inference, stay stoppable
            if self.sock.poll(100, zmq.POLLOUT):
                self.sock.send_multipart([header, image], copy=False)
                return True
        return False

    def close(self) -> None:
        self.sock.close(linger=0)


class LatestFrames:
    """Inference side: a one-slot mailbox per camera, filled by a collector thread.

    ``take(max_n, timeout)`` returns the waiting frames (oldest first, at most one per camera)
    and empties their slots. ``dropped(camera)`` counts frames that never reached inference.
    """

    def __init__(self, cameras: dict[str, bool], ctx: zmq.Context | None = None,
                 base: str = DEFAULT_ENDPOINT):
        """``cameras`` maps camera id -> lossless flag."""
        self.ctx = ctx or zmq.Context.instance()
        self.base, self.cameras = base, dict(cameras)
        self._socks: dict[str, zmq.Socket] = {}
        for cam in self.cameras:  # bind before any sender connects
            s = self.ctx.socket(zmq.PULL)
            s.setsockopt(zmq.RCVHWM, 1)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(endpoint_for(base, cam))
            self._socks[cam] = s
        self._slots: dict[str, Frame] = {}
        self._overwritten = dict.fromkeys(self.cameras, 0)
        self._sender_dropped = dict.fromkeys(self.cameras, 0)
        self._received = dict.fromkeys(self.cameras, 0)
        self.taken = 0  # frames handed to inference so far
        self._inflight: dict[str, int] = dict.fromkeys(self.cameras, 0)  # taken, not yet released
        self._cond = threading.Condition()
        self._stop = threading.Event()
        # take() empties a lossless camera's slot from another thread: wake the collector at once
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._collect, name="frame-collector", daemon=True)

    def start(self) -> "LatestFrames":
        self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:  # pipe full (the collector is awake anyway) or already closed
            pass

    def _collect(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        polled: set[str] = set()
        while not self._stop.is_set():
            with self._cond:
                want = {c for c in self.cameras if not (self.cameras[c] and c in self._slots)}
            for cam in want - polled:
                poller.register(self._socks[cam], zmq.POLLIN)
            for cam in polled - want:
                poller.unregister(self._socks[cam])
            polled = want
            for sock, _ in poller.poll(100):
                if sock == self._wake_r:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    continue
                try:
                    header_b, pixels = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    continue
                self._store(header_b.bytes, pixels)
        for s in self._socks.values():
            s.close(linger=0)
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _store(self, header_b: bytes, pixels: zmq.Frame) -> None:
        h = json.loads(header_b)
        image = np.frombuffer(pixels.buffer, dtype=np.dtype(h["dtype"])).reshape(h["shape"])
        cam = h["camera"]
        frame = Frame(cam, h["frame_id"], h["ts"], image, h["capture_ms"], h["sent"])
        with self._cond:
            if cam in self._slots:
                self._overwritten[cam] += 1
            self._slots[cam] = frame
            self._received[cam] += 1
            self._sender_dropped[cam] = h["dropped"]
            self._cond.notify_all()

    def take(self, max_n: int, timeout: float | None = None) -> list[Frame]:
        """Up to ``max_n`` newest frames (one per camera, longest-waiting first); waits up to
        ``timeout`` seconds for the first one and returns ``[]`` when none came."""
        with self._cond:
            if not self._slots:
                self._cond.wait_for(lambda: self._slots or self._stop.is_set(), timeout)
            ready = sorted(self._slots.values(), key=lambda f: f.received_mono)[:max_n]
            for f in ready:
                del self._slots[f.camera]
                self._inflight[f.camera] += 1
            self.taken += len(ready)
        if any(self.cameras[f.camera] for f in ready):
            self._wake()  # a lossless camera's socket goes back into the poll set
        return ready

    def release(self, frames: list[Frame]) -> None:
        """Inference is done with ``frames`` (scored and handed on, or failed)."""
        with self._cond:
            for f in frames:
                self._inflight[f.camera] -= 1

    def busy(self, camera: str) -> bool:
        """A frame of ``camera`` waits for inference or is being scored."""
        with self._cond:
            return camera in self._slots or self._inflight[camera] > 0

    def put_back(self, frames: list[Frame]) -> None:
        """Return taken frames to their slots unless a newer frame arrived meanwhile (then they
        count as dropped)."""
        with self._cond:
            for f in frames:
                self.taken -= 1
                self._inflight[f.camera] -= 1
                if f.camera in self._slots:
                    self._overwritten[f.camera] += 1
                else:
                    self._slots[f.camera] = f
            self._cond.notify_all()

    def depth(self, camera: str) -> int:
        """Frames waiting for inference (0 or 1)."""
        with self._cond:
            return int(camera in self._slots)

    def pending(self) -> int:
        with self._cond:
            return len(self._slots)

    def dropped(self, camera: str) -> int:
        """Frames of ``camera`` that never reached inference (replaced or refused at send)."""
        with self._cond:
            return self._overwritten[camera] + self._sender_dropped[camera]

    def refused(self, camera: str) -> int:
        """Frames of ``camera`` its sender could not hand over (the pipe was full), as last reported."""
        with self._cond:
            return self._sender_dropped[camera]

    def received(self, camera: str) -> int:
        with self._cond:
            return self._received[camera]

    def stop(self, timeout: float = 1.0) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)


class ResultPub:
    """Local ZeroMQ PUB for high-rate consumers: ``[topic, JSON, optional mask PNG]``.

    ``send`` never blocks (PUB drops for slow subscribers, SNDHWM bounds memory). Use it from
    one thread only (the publisher's).
    """

    def __init__(self, endpoint: str, ctx: zmq.Context | None = None, hwm: int = 100):
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, hwm)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = endpoint

    def send(self, topic: str, payload: bytes, *extra: bytes) -> None:
        try:
            self.sock.send_multipart([topic.encode(), payload, *extra], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def close(self) -> None:
        self.sock.close(linger=0)
