"""The backend registry: ``auto`` takes the highest-priority backend that loads (and says why it
skipped the others), an unknown name lists the choices, and the edge config's choices come from
the registry."""

from __future__ import annotations

import numpy as np
import pytest

from haloae import runtime
from haloae.bundle import Bundle
from haloae.manifest import BundleError, Manifest
from haloae.runtime import Backend, BackendUnavailable, Registry, RuntimeOptions


def _bundle(tmp_path) -> Bundle:
    manifest = Manifest.create(input_name="image", input_shape=[1, 3, 4, 4], mean=[], std=[],
                               output_names={"score": "score", "anomaly_map": "anomaly_map"}, threshold={},
                               files={"model.onnx": {"sha256": "0" * 64, "bytes": 0}}, model={"id": "t"}, parity={})
    return Bundle(tmp_path, manifest)


class Constant(Backend):
    """Scores every image ``value``; registered under several names below."""

    value = 0.0

    def __init__(self, bundle: Bundle, options: RuntimeOptions):
        self.input_shape = tuple(bundle.manifest.input.shape)
        self.device, self.options = "cpu", options

    def run(self, batch):
        n, _, h, w = self.check_batch(batch).shape
        return np.full(n, self.value, np.float32), np.full((n, 1, h, w), self.value, np.float32)


def _registry() -> Registry:
    reg = Registry()

    @reg.register("slow", priority=5)
    class Slow(Constant):
        value = 0.1

    @reg.register("fast", priority=50)
    class Fast(Constant):
        value = 0.9

    @reg.register("missing", priority=90)
    class Missing(Constant):
        def __init__(self, bundle, options):
            raise BackendUnavailable("its library is not installed here")

    return reg


def test_auto_picks_the_highest_priority_backend_that_loads(tmp_path):
    reg = _registry()
    assert reg.names() == ("missing", "fast", "slow") and reg.choices()[0] == "auto"
    b = reg.load(_bundle(tmp_path), "auto", RuntimeOptions(threads=3))
    assert b.name == "fast" and b.priority == 50 and b.options.threads == 3
    assert b.skipped == ["missing: its library is not installed here"]
    assert float(b.run(np.zeros((1, 3, 4, 4), np.float32))[0][0]) == pytest.approx(0.9)
    assert reg.load(_bundle(tmp_path), "slow").name == "slow"


def test_a_named_backend_that_cannot_load_is_not_replaced(tmp_path):
    with pytest.raises(BackendUnavailable, match="not installed here"):
        _registry().load(_bundle(tmp_path), "missing")


def test_an_unknown_name_lists_the_choices(tmp_path):
    with pytest.raises(BackendUnavailable) as err:
        _registry().load(_bundle(tmp_path), "openvino")
    assert "unknown backend 'openvino'" in str(err.value)
    assert "auto, missing, fast, slow" in str(err.value)
    with pytest.raises(BackendUnavailable, match="use one of auto, tensorrt, onnxruntime, torch"):
        runtime.load_backend(_bundle(tmp_path), "openvino")


def test_a_bundle_error_stops_auto_at_once(tmp_path):
    reg = _registry()

    @reg.register("strict", priority=99)
    class Strict(Constant):
        def __init__(self, bundle, options):
            raise BundleError("the graph has no output 'score'")

    with pytest.raises(BundleError, match="no output 'score'"):
        reg.load(_bundle(tmp_path), "auto")


def test_a_name_is_registered_once():
    reg = _registry()
    with pytest.raises(ValueError, match="taken"):
        reg.register("fast", priority=1)(type("Other", (Constant,), {}))
    with pytest.raises(ValueError, match="taken"):
        reg.register("auto", priority=1)(type("Auto", (Constant,), {}))


def test_the_shipped_registry_and_the_edge_config_agree():
    from pydantic import ValidationError

    from haloae.edge.config import ModelConfig

    assert runtime.choices() == ("auto", "tensorrt", "onnxruntime", "torch")  # by priority
    for name in runtime.choices():
        assert ModelConfig(bundle="b", backend=name).backend == name
    with pytest.raises(ValidationError, match="'auto', 'tensorrt', 'onnxruntime' or 'torch'"):
        ModelConfig(bundle="b", backend="openvino")
