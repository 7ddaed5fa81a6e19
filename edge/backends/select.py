"""Backend selection: ``auto`` = TensorRT, then ONNX Runtime, then torch; the first that loads.

Each skipped backend is logged with the reason (library missing, no GPU, no checkpoint, ...),
and the reasons stay on the chosen backend (``backend.skipped``) for the status topic. An
explicitly configured backend that cannot load raises :class:`BackendUnavailable`: the daemon
reports it on one line and exits with code 2.
"""

from __future__ import annotations

import logging
from pathlib import Path

from haloae.export.bundle import BundleError

from ..config import ModelConfig
from . import Backend, BackendUnavailable

log = logging.getLogger(__name__)

AUTO_ORDER = ("tensorrt", "onnxruntime", "torch")


def build_backend(name: str, model: ModelConfig, bundle_dir: Path, manifest: dict, engine_dir: Path) -> Backend:
    """Build one backend by name (its module, and its library, are imported only here)."""
    if name == "onnxruntime":
        from .onnxruntime_backend import OnnxRuntimeBackend
        return OnnxRuntimeBackend(bundle_dir, manifest, model.precision, model.threads)
    if name == "tensorrt":
        from .tensorrt_backend import TensorRTBackend
        return TensorRTBackend(bundle_dir, manifest, model.precision, engine_dir)
    if name == "torch":
        from .torch_backend import TorchBackend
        return TorchBackend(manifest, model.checkpoint, model.threads)
    raise ValueError(f"unknown backend {name!r}: use one of auto, {', '.join(AUTO_ORDER)}")


def load_backend(model: ModelConfig, bundle_dir: Path, manifest: dict, engine_dir: Path) -> Backend:
    """The configured backend, or for ``auto`` the first of :data:`AUTO_ORDER` that loads."""
    names = AUTO_ORDER if model.backend == "auto" else (model.backend,)
    skipped: list[str] = []
    for name in names:
        try:
            backend = build_backend(name, model, bundle_dir, manifest, engine_dir)
        except BundleError:  # the bundle itself is wrong: no other backend can fix that
            raise
        except BackendUnavailable as exc:
            skipped.append(f"{name}: {exc}")
            log.info("backend %s skipped: %s", name, exc)
            continue
        except Exception as exc:  # noqa: BLE001 - e.g. a failed engine build: fall back, say why
            if model.backend != "auto":
                raise BackendUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc
            skipped.append(f"{name}: {type(exc).__name__}: {exc}")
            log.warning("backend %s failed to load, trying the next: %s", name, exc)
            continue
        backend.skipped = skipped
        log.info("inference backend: %s%s", backend.description,
                 f" (skipped {'; '.join(skipped)})" if skipped else "")
        return backend
    raise BackendUnavailable("no inference backend can run the bundle: " + "; ".join(skipped))
