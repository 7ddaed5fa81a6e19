"""Capture: one worker thread per camera, from source to the latest-frame hand-off (edge/ipc.py).

The sources themselves are camera kinds in ``edge/sources/`` (one module each: V4L2 device,
RTSP/HTTP URL, GStreamer pipeline, video file, image folder, ``synthetic``); a kind opens and
reads frames, this module does the rest for all of them.

Each worker caps the frame rate, converts to RGB, checks the frame (HxWx3 uint8, same size as
the stream's first frame, large enough for the ROI), crops the ROI and sends it. Faults are the
normal weather:

- a bad frame (undecodable file, grey or 4-channel image, wrong size) is skipped and counted in
  ``errors``; a long run of nothing but bad frames counts as a lost source;
- a lost source (open or read fails, file or folder removed, stream stale) is reported
  ``offline`` and reopened with exponential backoff (``health.reopen_min_s`` doubling up to
  ``reopen_max_s``); it goes back ``online`` with its next good frame; other cameras run on;
- a finite source (file or folder without ``loop``) that reaches its end reports ``ended``.

Threads, not processes: OpenCV releases the GIL while it grabs and decodes, frames reach
inference through ``inproc://`` without a copy, and a Python exception in one worker is caught
and turned into ``offline`` + reopen (docs/architecture.md, "Edge daemon").
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import numpy as np
import zmq

from haloae import preprocess

from .config import ConfigError, HealthConfig
from .frames import CameraStatus
from .ipc import FrameSender
from .sources import BadFrame, CameraConfig, Source, SourceEnded, SourceLost, redact

__all__ = ["BadFrame", "CaptureWorker", "SourceEnded", "SourceLost", "check_source", "make_source", "redact",
           "source_kind", "to_rgb"]

log = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 50  # this many bad frames in a row: treat the source as lost
MIN_SIDE = 8  # smaller frames are garbage


def source_kind(cam: CameraConfig) -> str:
    """The camera's kind (``kind: auto`` was resolved when the config was read)."""
    return cam.kind


def check_source(cam: CameraConfig, index: int) -> None:
    """Refuse at start what no retry can fix: a missing OpenCV backend, a missing file/folder."""
    problem = cam.problem()
    if problem:
        raise ConfigError(f"cameras.{index}.source: {problem}")


def make_source(cam: CameraConfig) -> Source:
    """A fresh, unopened reader of the camera's frames (its kind's :meth:`open_source`)."""
    return cam.open_source()


def to_rgb(img: np.ndarray | None, is_rgb: bool, expected: tuple | None,
           roi: tuple[int, int, int, int] | None) -> np.ndarray:
    """Check one raw frame and return its RGB ROI crop; raise :class:`BadFrame` if unusable."""
    if img is None or not isinstance(img, np.ndarray):
        raise BadFrame("no image data")
    if img.dtype != np.uint8:
        raise BadFrame(f"pixel type {img.dtype}, expected 8-bit")
    if img.ndim != 3 or img.shape[2] != 3:
        channels = 1 if img.ndim == 2 else (img.shape[2] if img.ndim == 3 else "?")
        raise BadFrame(f"{channels} channel(s), expected 3 (colour)")
    h, w = img.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise BadFrame(f"frame {w}x{h} is too small")
    if expected is not None and (h, w) != expected:
        raise BadFrame(f"frame {w}x{h} differs from the stream's {expected[1]}x{expected[0]}")
    if roi is not None:
        x, y, rw, rh = roi
        if x + rw > w or y + rh > h:
            raise BadFrame(f"roi {list(roi)} does not fit in the {w}x{h} frame; fix cameras.*.roi")
        img = img[y: y + rh, x: x + rw]
    return img if is_rgb else preprocess.to_rgb(img)  # THE colour rule (haloae/preprocess.py)


class CaptureWorker(threading.Thread):
    """Runs one camera: open, read, check, crop, send; reopen with backoff when lost."""

    def __init__(self, cam: CameraConfig, health: HealthConfig, ctx: zmq.Context, endpoint_base: str,
                 on_status: Callable[[CameraStatus], None], lossless: bool = False):
        super().__init__(name=f"capture-{cam.id}", daemon=True)
        self.cam, self.health, self.ctx = cam, health, ctx
        self.endpoint_base, self.on_status, self.lossless = endpoint_base, on_status, lossless
        self.kind = cam.kind
        self.frames = 0  # frames sent to inference
        self.errors = 0  # bad frames skipped
        self.last_error = ""  # why the last bad frame was skipped
        self.next_id = 0  # id of the next frame read (bad frames use up ids too)
        self.last_raw: tuple[np.ndarray, bool] | None = None  # last source frame (with a roi), is_rgb
        self.state, self.detail = "starting", ""
        self.last_frame = time.monotonic()  # monotonic time of the last good frame
        self._since = time.time()
        self._delivered = False
        self._lock = threading.Lock()
        self._stop_evt = threading.Event()

    # -- state ------------------------------------------------------------------------------
    def status(self) -> CameraStatus:
        with self._lock:
            return CameraStatus(self.cam.id, self.state, self.detail, self.frames, 0, self.errors, self._since)

    def _set_state(self, state: str, detail: str = "") -> None:
        with self._lock:
            if state == self.state and detail == self.detail:
                return
            self.state, self.detail, self._since = state, detail, time.time()
        (log.warning if state == "offline" else log.info)("camera %s: %s %s", self.cam.id, state, detail)
        try:
            self.on_status(self.status())
        except Exception:  # noqa: BLE001 - a publishing problem must not stop capture
            log.exception("camera %s: status callback failed", self.cam.id)

    def check_stale(self, now: float) -> None:
        """Called by the app: an ``online`` camera without frames for too long goes ``offline``."""
        limit = max(self.health.stale_after_s, 3.0 / self.cam.fps if self.cam.fps else 0.0)
        if self.state == "online" and now - self.last_frame > limit:
            self._set_state("offline", f"no frame for {now - self.last_frame:.0f} s")

    def stop(self) -> None:
        self._stop_evt.set()

    # -- loop -------------------------------------------------------------------------------
    def run(self) -> None:
        sender = FrameSender(self.ctx, self.endpoint_base, self.cam.id, self.lossless)
        delay = self.health.reopen_min_s
        self._set_state("starting", f"opening {self.kind} source")
        try:
            while not self._stop_evt.is_set():
                source = make_source(self.cam)
                self._delivered = False
                try:
                    source.open()
                    self._stream(source, sender)
                except SourceEnded as e:
                    if self.frames == 0:
                        log.error("camera %s: %s without one usable frame (%d unusable%s); nothing of it was "
                                  "inspected", self.cam.id, e, self.errors,
                                  f", last: {self.last_error}" if self.last_error else "")
                    self._set_state("ended", str(e) if self.frames else f"{e}; no usable frame "
                                    f"({self.errors} unusable{', last: ' + self.last_error if self.last_error else ''})")
                    return
                except SourceLost as e:
                    self._set_state("offline", f"{e}; retrying in {delay:g} s")
                except Exception as e:  # noqa: BLE001 - one camera's bug must not stop the others
                    log.exception("camera %s: capture failed", self.cam.id)
                    self._set_state("offline", f"capture error {type(e).__name__}: {e}; retrying in {delay:g} s")
                finally:
                    source.close()
                if self._delivered:  # it worked for a while: start the backoff afresh
                    delay = self.health.reopen_min_s
                if self._stop_evt.wait(delay):
                    break
                delay = min(delay * 2, self.health.reopen_max_s)
        finally:
            sender.close()

    def _stream(self, source: Source, sender: FrameSender) -> None:
        """Read until stopped (returns) or the source fails (raises)."""
        period = 1.0 / self.cam.fps if self.cam.fps else 0.0
        next_t, expected, bad = time.monotonic(), None, 0
        while not self._stop_evt.is_set():
            if period:
                wait = next_t - time.monotonic()
                if wait > 0 and self._stop_evt.wait(wait):
                    break
                next_t = max(next_t + period, time.monotonic())
            frame_id = self.next_id
            try:
                raw = source.read()
                self.next_id += 1
                rgb = to_rgb(raw, source.rgb, expected, self.cam.roi)
            except BadFrame as e:
                self.next_id = max(self.next_id, frame_id + 1)
                with self._lock:
                    self.errors += 1
                    self.last_error = str(e)
                bad += 1
                if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                    log.warning("camera %s: frame %d skipped: %s (%d unusable frame(s) so far; counted in "
                                "status.errors)", self.cam.id, frame_id, e, self.errors)
                else:
                    log.debug("camera %s: frame %d skipped: %s", self.cam.id, frame_id, e)
                if bad >= MAX_BAD_IN_A_ROW:
                    raise SourceLost(f"{bad} bad frames in a row (last: {e})") from None
                continue
            expected = expected or raw.shape[:2]
            if self.cam.roi is not None:
                self.last_raw = (raw, source.rgb)  # a reference, no copy: the live view shows the ROI in it
            bad, self._delivered = 0, True
            self.last_frame = time.monotonic()
            capture_ms = (time.time() - source.arrived) * 1000.0
            if sender.send(frame_id, source.arrived, rgb, capture_ms, self.errors, self._stop_evt):
                with self._lock:
                    self.frames += 1
            if self.state != "online":
                self._set_state("online", f"{self.kind} source {self.cam.describe()}")
