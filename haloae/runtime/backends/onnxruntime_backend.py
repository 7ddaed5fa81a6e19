"""ONNX Runtime backend (priority 20): the bundle's ``model.onnx`` (or ``model.fp16.onnx``).

``onnxruntime`` is imported when the backend is built, never at module import. With device
``auto`` the CUDA execution provider is used when this onnxruntime build has it
(``onnxruntime-gpu``, the Jetson wheel), else the CPU provider; ``cpu`` forces the CPU provider,
``cuda`` requires CUDA. ``threads`` intra-op threads (0 = ONNX Runtime's default); the graph is
optimised at level ALL when the session loads.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from haloae.bundle import Bundle
from haloae.manifest import MODEL_FP16, BundleError, Manifest

from ..base import Backend, BackendUnavailable, RuntimeOptions
from ..registry import register

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


def session_options(ort, threads: int):
    """The session options every ONNX Runtime run of ours uses (the daemon, eval, parity and the
    benchmarks' graphs): full graph optimisation, sequential, ``threads`` intra-op threads."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = threads  # 0 = ONNX Runtime's default (all physical cores)
    so.inter_op_num_threads = 1
    # No busy-waiting between ops: in the daemon the capture, publisher and network threads
    # share the cores, and spinning intra-op threads take them away (MTD bundle, 2 cores,
    # bench/pipeline.py: daemon 33.0 -> 42.2 frames/s, capture-to-publish p99 56 -> 36 ms).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3  # errors only: its warnings would flood the journal
    return so


def providers_for(device: str, available: list[str]) -> list[str]:
    """The execution providers for ``device`` (auto / cpu / cuda) among ``available``."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise BackendUnavailable(f"device {device}: this onnxruntime has no CUDA provider; install "
                                 "onnxruntime-gpu or use the cpu device")
    return [p for p in PREFERRED_PROVIDERS if p in available]


@register("onnxruntime", priority=20)
class OnnxRuntimeBackend(Backend):
    """Runs a bundle with ONNX Runtime."""

    def __init__(self, bundle: Bundle, options: RuntimeOptions = RuntimeOptions()):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime "
                                     "(onnxruntime-gpu, or NVIDIA's Jetson wheel, for CUDA)") from None
        manifest, precision, threads = bundle.manifest, options.precision, options.threads
        path = bundle.model_file(precision)
        if precision == "fp16" and path.name != MODEL_FP16:
            log.warning("the bundle has no %s: running the fp32 model", MODEL_FP16)
        providers = providers_for(options.device, ort.get_available_providers())
        so = session_options(ort, threads)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own Fail/InvalidGraph types
            raise BackendUnavailable(f"onnxruntime cannot load {path}: {exc}") from None
        self.device = self.session.get_providers()[0]
        if precision == "fp16" and self.device == "CPUExecutionProvider":
            log.warning("running the fp16 graph on the CPU provider: on a CPU it is usually slower than "
                        "fp32 (fp16 is for TensorRT and CUDA); a daemon on this machine should use "
                        "model.precision: fp32")
        self.input_name = manifest.input.name
        self.output_names = [manifest.score.name, manifest.anomaly_map.name]
        self.input_shape = tuple(manifest.input.shape)
        self._check_graph(path, manifest)
        self.path = path
        log.info("onnxruntime %s: %s on %s (threads %s)", ort.__version__, path.name, self.device,
                 threads or "default")

    def _check_graph(self, path: Path, manifest: Manifest) -> None:
        """The graph's input and outputs are what the manifest says (names, shapes, float32):
        a bundle whose manifest and model do not belong together is a bundle error."""
        graph = {i.name: ("input", list(i.shape), i.type) for i in self.session.get_inputs()}
        graph.update({o.name: ("output", list(o.shape), o.type) for o in self.session.get_outputs()})
        want = [("input", self.input_name, list(self.input_shape))]
        want += [("output", o.name, list(o.shape)) for o in (manifest.score, manifest.anomaly_map)]
        for kind, name, shape in want:
            got = graph.get(name)
            if got is None or got[0] != kind:
                raise BundleError(f"{path} has no graph {kind} named {name!r} (the manifest says so; the "
                                  f"graph has {sorted(graph)}): re-export the bundle")
            if got[1] != shape or got[2] != "tensor(float)":
                raise BundleError(f"{path}: graph {kind} {name!r} is {got[2]} {got[1]}, the manifest "
                                  f"says tensor(float) {shape}: re-export the bundle")

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        score, amap = self.session.run(self.output_names, {self.input_name: self.check_batch(batch)})
        return np.asarray(score, np.float32), np.asarray(amap, np.float32)

    def close(self) -> None:
        self.session = None
