"""Inference backends on the real tiny bundle: ONNX Runtime matches torch, fp16 stays close,
``auto`` without TensorRT picks ONNX Runtime and says why; the TensorRT binding code runs
against a stand-in engine (we have no GPU here)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from haloae.bundle import Bundle
from haloae.manifest import Manifest
from haloae.preprocess import to_model_input
from haloae.runtime import Backend, BackendUnavailable, RuntimeOptions, load_backend
from haloae.synthetic import LineSimulator

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None


def frames_batch(n: int, size: int, seed: int = 5) -> np.ndarray:
    sim = LineSimulator(size=256, seed=seed, run_length=2, defect_every=2)  # frames 2, 3 defective
    return np.stack([to_model_input(sim.frame(i)[0], size) for i in range(n)])  # n, 3, size, size


def run_each(backend: Backend, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = backend.input_shape[0]
    scores, maps = [], []
    for i in range(0, len(x), n):
        s, m = backend.run(x[i: i + n])
        scores.append(s), maps.append(m)
    return np.concatenate(scores), np.concatenate(maps)


def test_onnxruntime_matches_torch_on_the_tiny_bundle(tiny_bundle, trained_tiny, tmp_path):
    ckpt, _ = trained_tiny
    bundle = Bundle.open(tiny_bundle)
    ort_b = load_backend(bundle, "onnxruntime", threads=1)
    torch_b = load_backend(bundle, "torch", checkpoint=ckpt, threads=1)
    assert ort_b.name == "onnxruntime" and ort_b.device == "CPUExecutionProvider"
    assert torch_b.name == "torch" and torch_b.input_shape == ort_b.input_shape
    size = ort_b.input_shape[2]
    x = frames_batch(4, size)
    s_ort, m_ort = run_each(ort_b, x)
    s_t, m_t = run_each(torch_b, x)
    assert s_ort.shape == (4,) and m_ort.shape == (4, 1, size, size) and s_ort.dtype == np.float32
    assert np.abs(s_ort - s_t).max() < 1e-4, (s_ort, s_t)
    assert np.abs(m_ort - m_t).max() < 1e-3
    assert np.ptp(s_ort) > 1e-3 and np.ptp(m_ort) > 1e-3, "outputs depend on the frame"


def test_fp16_model_is_close_to_fp32(tiny_bundle, tmp_path):
    b32 = load_backend(tiny_bundle, "onnxruntime", threads=1)
    b16 = load_backend(tiny_bundle, "onnxruntime", precision="fp16", threads=1)
    assert b16.path.name == "model.fp16.onnx" and b32.path.name == "model.onnx"
    x = frames_batch(2, b32.input_shape[2])
    s32, _ = run_each(b32, x)
    s16, _ = run_each(b16, x)
    assert np.abs(s32 - s16).max() < 0.02 * max(1.0, float(np.abs(s32).max()))


@pytest.mark.skipif(HAVE_TRT, reason="tensorrt is installed here: auto would pick it")
def test_auto_without_tensorrt_picks_onnxruntime_and_says_why(tiny_bundle, tmp_path, caplog):
    bundle = Bundle.open(tiny_bundle)
    caplog.set_level("INFO", logger="haloae.runtime.registry")
    b = load_backend(bundle, threads=1, engine_dir=tmp_path)
    assert b.name == "onnxruntime"
    assert len(b.skipped) == 1 and b.skipped[0].startswith("tensorrt: tensorrt not installed")
    assert "tensorrt not installed" in caplog.text and "inference backend: onnxruntime" in caplog.text
    with pytest.raises(BackendUnavailable, match="tensorrt not installed"):
        load_backend(bundle, "tensorrt", engine_dir=tmp_path)


def test_torch_backend_needs_a_checkpoint(tiny_bundle, tmp_path):
    with pytest.raises(BackendUnavailable, match="model.checkpoint"):
        load_backend(tiny_bundle, "torch")


# --- TensorRT binding code against a stand-in engine (TensorRT needs an NVIDIA GPU) ------------

class _FakeTrt:
    """The slice of the TensorRT 8.5-10.x Python API the backend uses; "device" memory is host memory."""

    __version__ = "10.0-fake"

    class Logger:
        WARNING = 2

        def __init__(self, level):
            pass

    class TensorIOMode:
        INPUT, OUTPUT = "in", "out"

    @staticmethod
    def nptype(dt):
        return dt

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return _FakeEngine() if data == b"engine" else None


class _FakeEngine:
    tensors = {"image": ("in", np.float32), "score": ("out", np.float16), "anomaly_map": ("out", np.float32)}
    num_io_tensors = 3

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, n):
        return self.tensors[n][0]

    def get_tensor_dtype(self, n):
        return self.tensors[n][1]

    def create_execution_context(self):
        return _FakeContext()


class _FakeContext:
    def __init__(self):
        self.addr, self.calls = {}, []

    def set_input_shape(self, name, shape):
        self.n, _, self.h, self.w = shape

    def get_tensor_shape(self, name):
        return {"image": (self.n, 3, self.h, self.w), "score": (self.n,), "anomaly_map": (self.n, 1, self.h, self.w)}[name]

    def set_tensor_address(self, name, ptr):
        self.addr[name] = ptr

    def execute_async_v3(self, stream):
        self.calls.append(stream)
        x, score, amap = (_HostMemory.arrays[self.addr[n]] for n in ("image", "score", "anomaly_map"))
        amap[:] = x.mean(axis=1, keepdims=True)
        score[:] = amap.reshape(len(amap), -1).max(axis=1)
        return True


class _HostMemory:
    arrays: dict[int, np.ndarray] = {}
    stream_handle = 1234

    def alloc(self, shape, dtype):
        a = np.zeros(shape, dtype)
        self.arrays[a.ctypes.data] = a
        return a, a.ctypes.data

    def htod(self, handle, host):
        handle[...] = host

    def dtoh(self, host, handle):
        host[...] = handle

    def synchronize(self):
        pass

    def free(self, handle):
        self.arrays.pop(handle.ctypes.data, None)


def _bundle(tmp_path, n=2, size=16, input_name="image") -> Bundle:
    manifest = Manifest.create(input_name=input_name, input_shape=[n, 3, size, size], mean=[], std=[],
                               output_names={"score": "score", "anomaly_map": "anomaly_map"}, threshold={},
                               files={"model.onnx": {"sha256": "0" * 64, "bytes": 0}}, model={}, parity={})
    return Bundle(tmp_path, manifest)


FP16 = RuntimeOptions(precision="fp16")


def test_tensorrt_backend_binds_tensors_by_name_and_runs(tmp_path):
    from haloae.runtime.backends.tensorrt_backend import TensorRTBackend

    engine = tmp_path / "e.engine"
    engine.write_bytes(b"engine")
    b = TensorRTBackend(_bundle(tmp_path), FP16, trt=_FakeTrt, memory=_HostMemory(), engine_path=engine)
    x = np.random.default_rng(0).random((2, 3, 16, 16), dtype=np.float32)
    score, amap = b.run(x)
    assert b.context.calls == [1234], "execute_async_v3 runs on the backend's stream"
    assert score.dtype == np.float32 and amap.dtype == np.float32 and amap.shape == (2, 1, 16, 16)
    np.testing.assert_allclose(amap, x.mean(axis=1, keepdims=True), rtol=1e-6)
    np.testing.assert_allclose(score, amap.reshape(2, -1).max(1), rtol=1e-3)  # fp16 output tensor
    score2, _ = b.run(x * 0.5)
    assert score2[0] < score[0], "outputs are copies, not views of the reused host buffers"
    with pytest.raises(ValueError, match="input shape"):
        b.run(x[:1])
    b.close()


def test_tensorrt_backend_refuses_engine_with_other_tensors(tmp_path):
    from haloae.runtime.backends.tensorrt_backend import TensorRTBackend

    engine = tmp_path / "e.engine"
    engine.write_bytes(b"engine")
    with pytest.raises(BackendUnavailable, match="delete it to rebuild"):
        TensorRTBackend(_bundle(tmp_path, input_name="input"), FP16, trt=_FakeTrt, memory=_HostMemory(),
                        engine_path=engine)
    engine.write_bytes(b"garbage")
    with pytest.raises(BackendUnavailable, match="cannot deserialize"):
        TensorRTBackend(_bundle(tmp_path), FP16, trt=_FakeTrt, memory=_HostMemory(), engine_path=engine)
