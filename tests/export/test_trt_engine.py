"""TensorRT engine cache up to the library boundary.

TensorRT and a GPU are hardware we do not have here: the builder call sequence runs against a
fake ``tensorrt`` module injected into ``sys.modules``, which records calls and returns bytes.
It checks OUR logic (flags per version, FP16 flag, workspace, timing cache on disk, sidecar,
cache reuse and invalidation), not TensorRT itself; the real build is covered by the
``tensorrt``-marked test, which runs where TensorRT is installed.
"""

import json
import sys
import types

import pytest

from haloae import bundle as B
from haloae.manifest import Manifest, read_manifest
from haloae.runtime import trt_engine as E


def _bundle(folder, payload=b"onnx bytes"):
    folder.mkdir(parents=True)
    (folder / B.MODEL_FP32).write_bytes(payload)
    manifest = Manifest.create(
        input_name="image", input_shape=[1, 3, 8, 8], mean=[0.5] * 3, std=[0.5] * 3,
        output_names={"score": "score", "anomaly_map": "anomaly_map"}, threshold={},
        files={B.MODEL_FP32: B.file_entry(folder / B.MODEL_FP32, "fp32")},
        model={"id": "toy"}, parity={})
    manifest.write(folder)
    return folder


def fake_tensorrt(version: str) -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    trt.calls = []

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+tactic"

    class Config:
        def __init__(self):
            self.flags, self.cache = [], None

        def set_memory_pool_limit(self, pool, size):
            trt.calls.append(("workspace", pool, size))

        def set_flag(self, flag):
            self.flags.append(flag)
            trt.calls.append(("flag", flag))

        def create_timing_cache(self, data):
            trt.calls.append(("timing_cache_in", bytes(data)))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache

        def get_timing_cache(self):
            return self.cache

    class Parser:
        def __init__(self, network, logger):
            self.errors = []

        def parse(self, data):
            trt.calls.append(("parse", bytes(data)))
            if b"bad" in data:
                self.errors = ["In node 3 (importCol2Im): UNSUPPORTED_NODE"]
            return not self.errors

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class Builder:
        def __init__(self, logger):
            trt.calls.append(("builder",))
            self.platform_has_fast_fp16 = True

        def create_network(self, flags):
            trt.calls.append(("network", flags))
            return object()

        def create_builder_config(self):
            return Config()

        def build_serialized_network(self, network, config):
            return b"ENGINE" + b"|".join(str(f).encode() for f in config.flags)

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            return object() if data.startswith(b"ENGINE") else None

    trt.Logger, trt.Builder, trt.OnnxParser, trt.Runtime = Logger, Builder, Parser, Runtime
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.BuilderFlag = types.SimpleNamespace(FP16="FP16")
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    monkeypatch.setattr(E, "gpu_name", lambda: "Fake Orin")


def use_trt(monkeypatch, version):
    trt = fake_tensorrt(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    return trt


def test_cache_key_depends_on_all_four_parts():
    base = E.cache_key("h", "8.6.1", "Orin", "fp16")
    assert base == E.cache_key("h", "8.6.1", "Orin", "fp16") and len(base) == 64
    for other in (("h2", "8.6.1", "Orin", "fp16"), ("h", "10.3.0", "Orin", "fp16"),
                  ("h", "8.6.1", "Xavier", "fp16"), ("h", "8.6.1", "Orin", "fp32")):
        assert E.cache_key(*other) != base


def test_metadata_roundtrip_and_corrupt_sidecar(tmp_path):
    meta = E.EngineMeta("8.6.1", "Orin", "fp16", "h", "model.onnx", "abc", "2024-01-01", "k")
    E.write_metadata(tmp_path / "k.json", meta)
    assert E.read_metadata(tmp_path / "k.json") == meta
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(E.EngineError, match="delete it to rebuild"):
        E.read_metadata(tmp_path / "bad.json")


def test_missing_tensorrt_says_where_to_build(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    bundle = _bundle(tmp_path / "b")
    with pytest.raises(E.TensorRTUnavailable) as err:
        E.get_or_build_engine(bundle, tmp_path / "cache", "fp16")
    msg = str(err.value)
    assert "TensorRT is not installed" in msg and "haloae-export --engine" in msg
    assert "first start" in msg and "ONNX files are in the bundle" in msg


def test_gpu_name_falls_back_to_a_string():
    assert isinstance(E.gpu_name(), str) and E.gpu_name()


@pytest.mark.parametrize("version, flags", [("8.5.2", 1), ("8.6.1", 1), ("10.3.0", 0)])
def test_build_sequence_and_sidecar(monkeypatch, tmp_path, fake_gpu, version, flags):
    trt = use_trt(monkeypatch, version)
    bundle, cache = _bundle(tmp_path / "b"), tmp_path / "cache"
    engine = E.get_or_build_engine(bundle, cache, "fp16", workspace_mb=256)
    assert ("network", flags) in trt.calls  # EXPLICIT_BATCH before 10.x only
    assert ("workspace", "WORKSPACE", 256 << 20) in trt.calls
    assert ("flag", "FP16") in trt.calls
    assert ("parse", b"onnx bytes") in trt.calls
    assert engine.read_bytes() == b"ENGINEFP16"
    meta = json.loads(engine.with_suffix(".json").read_text())
    assert meta["tensorrt_version"] == version and meta["gpu_name"] == "Fake Orin"
    assert meta["precision"] == "fp16" and meta["bundle_hash"] == B.bundle_hash(read_manifest(bundle))
    assert engine.stem == E.cache_key(meta["bundle_hash"], version, "Fake Orin", "fp16")
    timing = list(cache.glob("timing-*.cache"))
    assert len(timing) == 1 and timing[0].read_bytes() == b"+tactic"


def test_fp32_engine_has_no_fp16_flag(monkeypatch, tmp_path, fake_gpu):
    trt = use_trt(monkeypatch, "8.6.1")
    engine = E.get_or_build_engine(_bundle(tmp_path / "b"), tmp_path / "c", "fp32")
    assert ("flag", "FP16") not in trt.calls and engine.read_bytes() == b"ENGINE"


def test_cached_engine_is_reused_then_rebuilt_when_stale(monkeypatch, tmp_path, fake_gpu):
    trt = use_trt(monkeypatch, "8.6.1")
    bundle, cache = _bundle(tmp_path / "b"), tmp_path / "cache"
    first = E.get_or_build_engine(bundle, cache, "fp16")
    trt.calls.clear()
    assert E.get_or_build_engine(bundle, cache, "fp16") == first
    assert ("builder",) not in trt.calls  # reused, nothing built
    first.write_bytes(b"ENGINE truncated")  # sha256 no longer matches the sidecar
    assert E.get_or_build_engine(bundle, cache, "fp16") == first
    assert ("builder",) in trt.calls and first.read_bytes() == b"ENGINEFP16"
    assert ("timing_cache_in", b"+tactic") in trt.calls  # the on-disk timing cache was reused


def test_engine_tensorrt_cannot_deserialize_is_rebuilt(monkeypatch, tmp_path, fake_gpu):
    trt = use_trt(monkeypatch, "8.6.1")
    bundle, cache = _bundle(tmp_path / "b"), tmp_path / "cache"
    engine = E.get_or_build_engine(bundle, cache, "fp16")
    trt.Runtime.deserialize_cuda_engine = lambda self, data: None
    trt.calls.clear()
    E.get_or_build_engine(bundle, cache, "fp16")
    assert ("builder",) in trt.calls and engine.is_file()


def test_new_tensorrt_version_gets_a_new_engine(monkeypatch, tmp_path, fake_gpu):
    bundle, cache = _bundle(tmp_path / "b"), tmp_path / "cache"
    use_trt(monkeypatch, "8.6.1")
    a = E.get_or_build_engine(bundle, cache, "fp16")
    use_trt(monkeypatch, "10.3.0")
    b = E.get_or_build_engine(bundle, cache, "fp16")
    assert a != b and a.is_file() and b.is_file()


def test_parser_errors_are_reported(monkeypatch, tmp_path, fake_gpu):
    use_trt(monkeypatch, "8.6.1")
    bundle = _bundle(tmp_path / "b", payload=b"bad graph")
    with pytest.raises(E.EngineError, match="importCol2Im"):
        E.get_or_build_engine(bundle, tmp_path / "cache", "fp16")
    assert not list((tmp_path / "cache").glob("*.engine"))


def test_default_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HALOAE_ENGINE_CACHE", str(tmp_path / "x"))
    assert E.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("HALOAE_ENGINE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert E.default_cache_dir() == tmp_path / "xdg" / "haloae" / "engines"


@pytest.mark.tensorrt
def test_real_tensorrt_builds_and_reuses_an_engine(tmp_path):
    trt = pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    from onnx import TensorProto, helper

    nodes = [helper.make_node("ReduceMean", ["image"], ["anomaly_map"], axes=[1], keepdims=1),
             helper.make_node("ReduceMax", ["anomaly_map"], ["score"], axes=[1, 2, 3],
                              keepdims=0)]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, [1, 1, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    bundle = _bundle(tmp_path / "b", payload=model.SerializeToString())
    try:
        engine = E.get_or_build_engine(bundle, tmp_path / "cache", "fp16")
    except E.TensorRTUnavailable as exc:
        pytest.skip(f"no usable GPU for TensorRT: {exc}")
    meta = E.read_metadata(engine.with_suffix(".json"))
    assert meta.tensorrt_version == trt.__version__
    assert E.get_or_build_engine(bundle, tmp_path / "cache", "fp16") == engine
