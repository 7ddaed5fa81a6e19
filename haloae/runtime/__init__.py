"""The runtime layer: backends that run a bundle, found in a registry, and ``load_backend``.

    from haloae.bundle import Bundle
    from haloae.runtime import load_backend

    backend = load_backend(Bundle.open("bundles/mtd"), "auto", threads=2)
    score, anomaly_map = backend.run(haloae.preprocess.to_batch(images, backend.input_shape))

The edge daemon, ``haloae-eval --bundle``, export parity, the README picture and the benchmarks
all run bundles through :func:`load_backend`, so they measure what the line runs. Backends
(``backends/``: TensorRT 30, ONNX Runtime 20, torch 10) register themselves; ``auto`` tries them
by priority. No inference library is imported until a backend is built. docs/architecture.md.
"""

from .base import Backend, BackendUnavailable, RuntimeOptions
from .registry import AUTO, REGISTRY, Registry, choices, load_backend, register

__all__ = ["AUTO", "REGISTRY", "Backend", "BackendUnavailable", "Registry", "RuntimeOptions", "choices",
           "load_backend", "register"]
