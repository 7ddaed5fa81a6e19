"""Capture: one worker thread per camera, from source to the latest-frame hand-off (edge/ipc.py).

Sources (OpenCV unless said): V4L2 device index or path, RTSP/HTTP URL (FFmpeg), GStreamer
pipeline ending in ``appsink`` (``cv2.CAP_GSTREAMER``), video file (optionally looping), image
folder (sorted, optionally looping) and ``synthetic`` (:class:`~haloae.edge.synthetic.LineSimulator`).

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
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import zmq

from haloae.errors import HaloaeError

from .config import CameraConfig, ConfigError, HealthConfig
from .frames import CameraStatus
from .ipc import FrameSender
from .synthetic import LineSimulator

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MAX_BAD_IN_A_ROW = 50  # this many bad frames in a row: treat the source as lost
MIN_SIDE = 8  # smaller frames are garbage
OPEN_TIMEOUT_MS = 5000  # network sources: FFmpeg open / read timeouts


class SourceLost(HaloaeError):
    """The source cannot be opened or read: reopen with backoff."""


class SourceEnded(HaloaeError):
    """A finite source (file or folder without loop) reached its end."""


class BadFrame(HaloaeError):
    """One frame is unusable: skip it and count an error."""


def source_kind(cam: CameraConfig) -> str:
    """``cam.kind``, or for ``auto`` a guess from the source string."""
    if cam.kind != "auto":
        return cam.kind
    src = cam.source
    if src == "synthetic":
        return "synthetic"
    if src.isdigit() or src.startswith("/dev/"):
        return "v4l2"
    if "://" in src:
        return "url"
    if "!" in src:
        return "gstreamer"
    return "folder" if Path(src).is_dir() else "file"


def redact(source: str) -> str:
    """The source for logs and MQTT, without a password (``rtsp://user:***@host``)."""
    return re.sub(r"(://[^/:@]*):[^/@]*@", r"\1:***@", source)


def check_source(cam: CameraConfig, index: int) -> None:
    """Refuse at start what no retry can fix: a missing OpenCV backend, a missing file/folder."""
    kind, where = source_kind(cam), f"cameras.{index}.source"
    if kind == "gstreamer" and not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        raise ConfigError(f"{where}: this OpenCV ({cv2.__version__}) has no GStreamer support; "
                          "install an OpenCV built with GStreamer (JetPack's python3-opencv)")
    if kind == "v4l2" and not cv2.videoio_registry.hasBackend(cv2.CAP_V4L2):
        raise ConfigError(f"{where}: this OpenCV ({cv2.__version__}) has no V4L2 support; install "
                          "opencv-python(-headless) from PyPI or JetPack's python3-opencv")
    if kind == "url" and not cv2.videoio_registry.hasBackend(cv2.CAP_FFMPEG):
        raise ConfigError(f"{where}: this OpenCV has no FFmpeg support for URLs; use a GStreamer "
                          "pipeline (kind: gstreamer) or an OpenCV built with FFmpeg")
    if kind == "file" and not Path(cam.source).is_file():
        raise ConfigError(f"{where}: no video file {cam.source}; check the path (relative paths "
                          "are relative to the config file)")
    if kind == "file":
        cap = cv2.VideoCapture(cam.source, cv2.CAP_ANY)
        opened = cap.isOpened() and cap.grab()
        cap.release()
        if not opened:
            raise ConfigError(f"{where}: OpenCV cannot read a frame from {cam.source} (not a video, or a codec "
                              "this OpenCV lacks); convert it (e.g. ffmpeg -i IN -c:v mjpeg OUT.avi) or fix the path")
    if kind == "folder" and not Path(cam.source).is_dir():
        raise ConfigError(f"{where}: no image folder {cam.source}; check the path")
    if kind == "folder" and not FolderSource(cam.source).listing():
        raise ConfigError(f"{where}: the folder {cam.source} holds no images ({', '.join(IMAGE_EXTS)})")
    if kind == "synthetic" and cam.source != "synthetic":
        raise ConfigError(f"{where}: kind synthetic needs source: synthetic")


class _Source:
    """A frame source: ``open()``, ``read() -> BGR or RGB array`` (``rgb`` says which), ``close()``.
    ``arrived`` is the wall-clock time the last raw frame became available."""

    rgb = False
    arrived = 0.0

    def open(self) -> None: ...
    def read(self) -> np.ndarray: ...
    def close(self) -> None: ...


class VideoSource(_Source):
    """Anything ``cv2.VideoCapture`` opens: device, URL, GStreamer pipeline, video file."""

    def __init__(self, kind: str, source: str, loop: bool = False):
        self.kind, self.source, self.loop = kind, source, loop
        self.name = redact(source)
        self.cap: cv2.VideoCapture | None = None

    def _capture(self) -> cv2.VideoCapture:
        if self.kind == "v4l2":
            return cv2.VideoCapture(int(self.source) if self.source.isdigit() else self.source, cv2.CAP_V4L2)
        if self.kind == "gstreamer":
            return cv2.VideoCapture(self.source, cv2.CAP_GSTREAMER)
        if self.kind == "url":
            return cv2.VideoCapture(self.source, cv2.CAP_FFMPEG, [
                cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, OPEN_TIMEOUT_MS])
        return cv2.VideoCapture(self.source, cv2.CAP_ANY)

    def open(self) -> None:
        if self.kind == "file" and not os.path.isfile(self.source):
            raise SourceLost(f"video file {self.source} is missing")
        self.cap = self._capture()
        if not self.cap.isOpened():
            self.close()
            raise SourceLost(f"cannot open {self.kind} source {self.name}")

    def read(self) -> np.ndarray:
        if self.kind == "file" and not os.path.isfile(self.source):
            raise SourceLost(f"video file {self.source} was removed")
        if not self.cap.grab():
            if self.kind != "file":
                raise SourceLost(f"{self.kind} source {self.name} stopped delivering frames")
            if self.loop:
                self.close()
                self.open()
                if not self.cap.grab():
                    raise SourceLost(f"video file {self.source} has no readable frame")
            else:
                raise SourceEnded(f"end of video file {self.source}")
        self.arrived = time.time()
        ok, frame = self.cap.retrieve()
        if not ok or frame is None:
            raise BadFrame("the frame could not be decoded")
        return frame

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


class FolderSource(_Source):
    """Images of a folder in sorted name order; the listing is refreshed at each loop."""

    def __init__(self, folder: str, loop: bool = False):
        self.folder, self.loop = Path(folder), loop
        self.files: list[Path] = []
        self.pos = 0

    def listing(self) -> list[Path]:
        return sorted(p for p in self.folder.iterdir()
                      if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".") and p.is_file())

    def _list(self) -> list[Path]:
        if not self.folder.is_dir():
            raise SourceLost(f"image folder {self.folder} is missing")
        return self.listing()

    def open(self) -> None:
        self.files, self.pos = self._list(), 0
        if not self.files:
            raise SourceLost(f"image folder {self.folder} holds no images ({', '.join(IMAGE_EXTS)})")

    def read(self) -> np.ndarray:
        if self.pos >= len(self.files):
            if not self.loop:
                raise SourceEnded(f"end of image folder {self.folder}")
            self.open()
        path = self.files[self.pos]
        self.pos += 1
        self.arrived = time.time()
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if img is None:
            if not self.folder.is_dir():
                raise SourceLost(f"image folder {self.folder} was removed")
            raise BadFrame(f"{path.name} is unreadable or not an image")
        return img


class SyntheticSource(_Source):
    """An endless simulated line (edge/synthetic.py): RGB frames with known defective runs."""

    rgb = True

    def __init__(self, seed: int, defect_every: int, size: int = 256, lighting: float = 1.0, lighting_from: int = 0):
        self.sim = LineSimulator(size=size, seed=seed, defect_every=defect_every)
        self.index = 0
        self.lighting, self.lighting_from = lighting, lighting_from

    def read(self) -> np.ndarray:
        self.arrived = time.time()
        rgb, _ = self.sim.frame(self.index)
        if self.lighting != 1.0 and self.index >= self.lighting_from:  # a dimmed (or brighter) lamp
            rgb = cv2.convertScaleAbs(rgb, alpha=self.lighting)
        self.index += 1
        return rgb


def make_source(cam: CameraConfig) -> _Source:
    kind = source_kind(cam)
    if kind == "synthetic":
        return SyntheticSource(cam.seed, cam.defect_every, lighting=cam.lighting, lighting_from=cam.lighting_from_frame)
    if kind == "folder":
        return FolderSource(cam.source, cam.loop)
    return VideoSource(kind, cam.source, cam.loop)


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
    return img if is_rgb else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class CaptureWorker(threading.Thread):
    """Runs one camera: open, read, check, crop, send; reopen with backoff when lost."""

    def __init__(self, cam: CameraConfig, health: HealthConfig, ctx: zmq.Context, endpoint_base: str,
                 on_status: Callable[[CameraStatus], None], lossless: bool = False):
        super().__init__(name=f"capture-{cam.id}", daemon=True)
        self.cam, self.health, self.ctx = cam, health, ctx
        self.endpoint_base, self.on_status, self.lossless = endpoint_base, on_status, lossless
        self.kind = source_kind(cam)
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

    def _stream(self, source: _Source, sender: FrameSender) -> None:
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
                self._set_state("online", f"{self.kind} source {self._describe()}")

    def _describe(self) -> str:
        return "synthetic line" if self.kind == "synthetic" else redact(self.cam.source)
