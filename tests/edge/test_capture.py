"""Capture workers on real sources: a video file written with OpenCV, an image folder with
garbage in it, a file that disappears and comes back, the synthetic line."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from haloae.edge.capture import BadFrame, CaptureWorker, check_source, source_kind, to_rgb
from haloae.edge.config import ConfigError, HealthConfig
from haloae.edge.ipc import LatestFrames
from haloae.edge.sources import CameraConfig, parse_camera
from haloae.synthetic import LineSimulator

HEALTH = HealthConfig(reopen_min_s=0.1, reopen_max_s=0.4, stale_after_s=5)


def camera(**keys) -> CameraConfig:
    """A camera as the YAML would give it (``kind: auto`` unless said)."""
    return parse_camera(keys)


def write_video(path: Path, n: int, size: int = 64, seed: int = 0) -> list[np.ndarray]:
    """An MJPG .avi of LineSimulator frames; returns the RGB frames written."""
    sim = LineSimulator(size=size, seed=seed, run_length=4, defect_every=3)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (size, size))
    assert vw.isOpened(), "OpenCV cannot write MJPG .avi here"
    frames = []
    for i in range(n):
        rgb = sim.frame(i)[0]
        frames.append(rgb)
        vw.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    vw.release()
    return frames


class Rig:
    """Capture workers + the real latest-frame mailbox + a consumer thread collecting frames."""

    def __init__(self, cams: list[CameraConfig], lossless: bool = True):
        self.ctx = zmq.Context()
        self.base = f"inproc://cap-{id(self)}"
        self.frames = LatestFrames({c.id: lossless for c in cams}, self.ctx, self.base).start()
        self.statuses: list = []
        self.got: dict[str, list] = {c.id: [] for c in cams}
        self.workers = [CaptureWorker(c, HEALTH, self.ctx, self.base, self.statuses.append, lossless) for c in cams]
        self._stop = threading.Event()
        self._consumer = threading.Thread(target=self._consume, daemon=True)

    def _consume(self):
        while not self._stop.is_set():
            for f in self.frames.take(8, timeout=0.05):
                self.got[f.camera].append(f)

    def __enter__(self):
        self._consumer.start()
        for w in self.workers:
            w.start()
        return self

    def __exit__(self, *exc):
        for w in self.workers:
            w.stop()
        for w in self.workers:
            w.join(2)
        self._stop.set()
        self._consumer.join(2)
        self.frames.stop()
        self.ctx.term()

    def states(self, cam: str) -> list[str]:
        return [s.state for s in self.statuses if s.camera == cam]

    def wait(self, cond, timeout=10.0, what=""):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {what}; statuses {[(s.camera, s.state, s.detail) for s in self.statuses]}")


def test_video_file_every_frame_in_order_then_ended(tmp_path):
    written = write_video(tmp_path / "line.avi", 12)
    cam = camera(id="cam1", source=str(tmp_path / "line.avi"), roi=(8, 4, 48, 40))
    assert source_kind(cam) == "file"
    with Rig([cam]) as rig:
        rig.wait(lambda: "ended" in rig.states("cam1"), what="end of file")
        rig.wait(lambda: len(rig.got["cam1"]) == 12 or rig.frames.pending() == 0, what="last frames")
    got = rig.got["cam1"]
    assert [f.frame_id for f in got] == list(range(12))
    assert rig.states("cam1") == ["starting", "online", "ended"]
    for f, rgb in zip(got, written):
        assert f.image.shape == (40, 48, 3) and f.image.dtype == np.uint8
        # RGB order and ROI kept (MJPG is lossy: compare means per channel)
        ref = rgb[4:44, 8:56].astype(np.float32)
        assert np.abs(f.image.astype(np.float32) - ref).mean() < 6.0
        assert f.timestamp <= time.time() and f.capture_ms >= 0


def test_folder_garbage_is_skipped_and_counted(tmp_path):
    sim = LineSimulator(size=32, seed=1)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(sim.frame(i)[0], cv2.COLOR_RGB2BGR))
    (folder / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage, truncated")  # corrupt
    cv2.imwrite(str(folder / "002.png"), np.full((32, 32), 128, np.uint8))  # grey, one channel
    cv2.imwrite(str(folder / "004.png"), np.zeros((20, 32, 3), np.uint8))  # wrong size
    (folder / "notes.txt").write_text("not an image")  # ignored, not counted
    cam = camera(id="f", source=str(folder))
    assert source_kind(cam) == "folder"
    with Rig([cam]) as rig:
        rig.wait(lambda: "ended" in rig.states("f"), what="end of folder")
        rig.wait(lambda: len(rig.got["f"]) == 3, what="good frames")
    assert [f.frame_id for f in rig.got["f"]] == [0, 3, 5]
    assert rig.workers[0].errors == 3 and rig.workers[0].frames == 3
    assert rig.states("f")[-1] == "ended"
    np.testing.assert_array_equal(rig.got["f"][1].image, sim.frame(3)[0])


def test_removed_file_goes_offline_and_comes_back_other_camera_unaffected(tmp_path):
    video = tmp_path / "loop.avi"
    write_video(video, 6)
    cams = [camera(id="vid", source=str(video), loop=True, fps=50),
            camera(id="syn", source="synthetic", fps=50)]
    with Rig(cams, lossless=False) as rig:
        rig.wait(lambda: "online" in rig.states("vid") and "online" in rig.states("syn"), what="online")
        hidden = tmp_path / "hidden.avi"
        os.rename(video, hidden)
        rig.wait(lambda: rig.states("vid")[-1] == "offline", what="offline")
        offline = [s for s in rig.statuses if s.camera == "vid" and s.state == "offline"][-1]
        assert "removed" in offline.detail or "missing" in offline.detail, offline.detail
        n_syn = len(rig.got["syn"])
        time.sleep(0.6)  # a few backoff rounds
        assert len(rig.got["syn"]) > n_syn + 10, "the other camera must keep delivering"
        n_vid = len(rig.got["vid"])
        os.rename(hidden, video)
        rig.wait(lambda: rig.states("vid")[-1] == "online", what="back online")
        rig.wait(lambda: len(rig.got["vid"]) > n_vid + 3, what="frames after reopen")
    ids = [f.frame_id for f in rig.got["vid"]]
    assert ids == sorted(ids) and len(set(ids)) == len(ids), "frame ids keep increasing across reopens"
    assert rig.states("syn") == ["starting", "online"]


def test_synthetic_source_matches_the_simulator():
    cam = camera(id="s", source="synthetic", seed=3, defect_every=2)
    with Rig([cam]) as rig:
        rig.wait(lambda: len(rig.got["s"]) >= 5, what="5 frames")
    sim = LineSimulator(size=256, seed=3, defect_every=2)
    for f in rig.got["s"][:5]:
        np.testing.assert_array_equal(f.image, sim.frame(f.frame_id)[0])


def test_stale_camera_reported_offline(tmp_path):
    cam = camera(id="s", source="synthetic")
    ctx = zmq.Context()
    statuses = []
    w = CaptureWorker(cam, HealthConfig(stale_after_s=1.0), ctx, "inproc://stale", statuses.append)
    w.state = "online"
    w.check_stale(time.monotonic() + 0.5)
    assert statuses == []
    w.check_stale(time.monotonic() + 2.0)
    assert statuses[-1].state == "offline" and "no frame for" in statuses[-1].detail
    ctx.term()


def test_to_rgb_rejects_bad_frames():
    ok = np.zeros((16, 16, 3), np.uint8)
    assert to_rgb(ok, False, None, None).shape == (16, 16, 3)
    bgr = ok.copy()
    bgr[..., 0] = 255  # blue in BGR
    assert to_rgb(bgr, False, None, None)[0, 0].tolist() == [0, 0, 255]
    for bad, why in [(None, "no image"), (np.zeros((16, 16), np.uint8), "1 channel"),
                     (np.zeros((16, 16, 4), np.uint8), "4 channel"), (np.zeros((16, 16, 3), np.uint16), "8-bit"),
                     (np.zeros((4, 4, 3), np.uint8), "too small")]:
        with pytest.raises(BadFrame, match=why):
            to_rgb(bad, False, None, None)
    with pytest.raises(BadFrame, match="differs"):
        to_rgb(ok, False, (20, 16), None)
    with pytest.raises(BadFrame, match="roi"):
        to_rgb(ok, False, None, (8, 8, 10, 4))


def test_check_source_refuses_what_no_retry_fixes(tmp_path):
    with pytest.raises(ConfigError, match=r"cameras\.0\.source: no video file"):
        check_source(camera(id="a", source=str(tmp_path / "nope.avi")), 0)
    with pytest.raises(ConfigError, match=r"cameras\.1\.source: no image folder"):
        check_source(camera(id="a", source=str(tmp_path / "nope"), kind="folder"), 1)
    if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
        with pytest.raises(ConfigError, match="GStreamer"):
            check_source(camera(id="a", source="videotestsrc ! appsink"), 0)
    check_source(camera(id="a", source="/dev/video9"), 0)  # devices: offline + retry, not fatal
