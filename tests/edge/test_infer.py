"""The inference worker: training-identical preprocessing, per-camera thresholds, batching with
padding across cameras, backend swap (SIGHUP), giving up on a backend that keeps failing."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import zmq

from haloae.bundle import Bundle
from haloae.edge.config import CameraConfig
from haloae.edge.infer import InferenceWorker
from haloae.edge.ipc import FrameSender, LatestFrames
from haloae.edge.stats import Stats
from haloae.preprocess import to_batch, to_model_input
from haloae.runtime import Backend
from haloae.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
from haloae.runtime.base import RuntimeOptions
from haloae.synthetic import LineSimulator


@pytest.mark.parametrize("shape", [(256, 256), (120, 200), (128, 128), (64, 96)])
def test_edge_batch_is_the_training_input_zero_padded(shape):
    data = pytest.importorskip("haloae.train.data")
    rgb = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    batch = to_batch([rgb, rgb[::-1]], (3, 3, 128, 128))
    np.testing.assert_array_equal(batch[0], data.to_model_input(rgb, 128))  # what training feeds
    np.testing.assert_array_equal(batch[1], to_model_input(rgb[::-1], 128))
    assert not batch[2].any() and batch.dtype == np.float32
    assert 0.0 <= batch.min() and batch.max() <= 1.0


class VirtualBatch(Backend):
    """A real backend run frame by frame behind a static batch of ``n`` (bundles are N=1 here)."""

    def __init__(self, inner: Backend, n: int):
        self.inner, self.name, self.device = inner, "virtual", "cpu"
        self.input_shape = (n, *inner.input_shape[1:])
        self.batches: list[np.ndarray] = []
        self.closed = False

    def run(self, batch):
        self.batches.append(batch.copy())
        outs = [self.inner.run(batch[i: i + 1]) for i in range(len(batch))]
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def close(self):
        self.closed = True


class Rig:
    def __init__(self, backend, manifest, cameras, batch_size=1):
        self.ctx = zmq.Context()
        self.base = f"inproc://infer-{id(self)}"
        self.frames = LatestFrames({c.id: True for c in cameras}, self.ctx, self.base).start()
        self.results, self.scored = [], []
        self.stats = Stats([c.id for c in cameras])
        self.worker = InferenceWorker(backend, manifest, "m1", self.frames, self.results.append, self.stats,
                                      cameras, batch_size, on_scored=lambda: self.scored.append(1))
        self.worker.start()

    def send(self, camera, frames):
        def go():
            s = FrameSender(self.ctx, self.base, camera, lossless=True)
            for i, f in enumerate(frames):
                s.send(i, time.time(), f)
            s.close()
        t = threading.Thread(target=go)
        t.start()
        return t

    def wait(self, n, timeout=30):
        deadline = time.monotonic() + timeout
        while len(self.results) < n and time.monotonic() < deadline and not self.worker.fatal:
            time.sleep(0.02)
        return self.results

    def close(self):
        self.worker.stop()
        self.worker.join(5)
        self.frames.stop()
        self.ctx.term()


@pytest.fixture(scope="module")
def ort(tiny_bundle):
    bundle = Bundle.open(tiny_bundle)
    return OnnxRuntimeBackend(bundle, RuntimeOptions(threads=1)), bundle.manifest


def test_batches_across_cameras_with_padding(ort):
    inner, manifest = ort
    size = inner.input_shape[2]
    sim = LineSimulator(size=256, seed=2, run_length=2, defect_every=2)
    frames = [sim.frame(i)[0] for i in range(4)]
    ref = [float(inner.run(to_model_input(f, size)[None])[0][0]) for f in frames]
    backend = VirtualBatch(inner, 4)
    cams = [CameraConfig(id=c, source="synthetic", threshold=t) for c, t in (("a", None), ("b", 0.9), ("c", None))]
    rig = Rig(backend, manifest, cams, batch_size=4)
    try:
        threads = [rig.send("a", frames), rig.send("b", frames), rig.send("c", frames[:1])]
        results = rig.wait(9)
        for t in threads:
            t.join(5)
        assert len(results) == 9
        for r in results:
            assert r.score == pytest.approx(ref[r.frame_id], abs=1e-5), "results go back to the right frame"
            assert r.anomaly_map.shape == (size, size) and r.anomaly_map.dtype == np.float32
            assert r.frame.shape == (256, 256, 3) and r.model_id == "m1" and r.pixel_threshold == 0.5
            assert r.threshold == (0.9 if r.camera == "b" else 0.5)
            assert r.anomalous == (r.score >= r.threshold)
            assert set(r.latency_ms) == {"capture", "queue", "inference", "total"}
        assert all(b.shape == (4, 3, size, size) for b in backend.batches)
        multi = [b for b in backend.batches if np.abs(b[1]).sum() > 0]
        assert multi, "frames of several cameras share a batch"
        padded = [b for b in backend.batches if np.abs(b[-1]).sum() == 0]
        assert padded, "short batches are padded with zeros"
        assert rig.scored and rig.stats.inspected("a") == 4 and rig.stats.snapshot()["inference"]["batches"] == len(backend.batches)
    finally:
        rig.close()


def test_runtime_threshold_and_backend_swap(ort):
    inner, manifest = ort
    first, second = VirtualBatch(inner, 1), VirtualBatch(inner, 1)
    cams = [CameraConfig(id="a", source="synthetic")]
    rig = Rig(first, manifest, cams)
    sim = LineSimulator(size=256, seed=3)
    try:
        rig.worker.set_threshold("a", 3.0)
        rig.send("a", [sim.frame(0)[0]]).join(5)
        assert rig.wait(1)[0].threshold == 3.0 and not rig.results[0].anomalous
        rig.worker.set_threshold(None, None)
        rig.worker.set_backend(second, manifest, "m2")
        rig.send("a", [sim.frame(1)[0]]).join(5)
        r = rig.wait(2)[1]
        assert r.threshold == 0.5 and r.model_id == "m2"
        assert first.closed and len(second.batches) == 1, "the new backend runs, the old one is closed"
    finally:
        rig.close()


class Broken(Backend):
    name, device, input_shape = "broken", "cpu", (1, 3, 16, 16)

    def run(self, batch):
        raise RuntimeError("device lost")


def test_backend_that_keeps_failing_is_fatal(ort):
    _, manifest = ort
    rig = Rig(Broken(), manifest, [CameraConfig(id="a", source="synthetic")])
    try:
        frames = [np.zeros((16, 16, 3), np.uint8)] * 12
        rig.send("a", frames)
        deadline = time.monotonic() + 20
        while not rig.worker.fatal and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rig.worker.fatal and "device lost" in rig.worker.fatal
        assert rig.stats.snapshot()["inference"]["errors"] >= 10 and rig.results == []
    finally:
        rig.close()


def test_stats_percentiles_fps_and_capture_fields():
    stats = Stats(["a"], window=100)
    for i in range(200):
        stats.record("a", {"capture": 1.0, "queue": 2.0, "inference": float(i % 100), "total": 10.0}, i % 4 == 0)
    stats.record_batch(2, 5.0)
    snap = stats.snapshot({"a": {"state": "online", "dropped": 7}}, {"backend": "x"})
    a = snap["cameras"]["a"]
    assert a["inspected"] == 200 and a["anomalous"] == 50 and a["dropped"] == 7 and a["state"] == "online"
    assert a["latency_ms"]["inference"] == {"p50": 49.5, "p99": 98.01}, "rolling window of the last 100"
    assert a["latency_ms"]["total"]["p99"] == 10.0 and a["fps"] > 0
    assert snap["backend"] == "x" and snap["inference"]["mean_batch"] == 2.0
