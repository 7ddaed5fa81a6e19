"""The backend interface: what every way of running a bundle provides (core: numpy only).

A backend runs the bundle's graph on a float32 NCHW RGB batch in [0, 1] of the bundle's static
shape (``haloae.preprocess.to_batch``) and returns the normalised ``(score [N], anomaly_map
[N, 1, H, W])`` (calibrated thresholds at 0.5; docs/bundle.md). Importing this module, or any
backend module, imports no inference library: each backend imports its own in ``__init__``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from haloae.errors import UserError


class BackendUnavailable(UserError, RuntimeError):
    """The backend's library, GPU or files are missing here; ``auto`` tries the next one."""


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run a bundle; each backend uses the fields that concern it."""

    precision: str = "fp32"  # "fp32" | "fp16": model file / engine precision
    threads: int = 0  # CPU intra-op threads (0 = the library's default: all physical cores)
    device: str = "auto"  # "auto" (GPU when there is one) | "cpu" | "cuda"
    checkpoint: Path | None = None  # torch backend: the training final.pt the bundle came from
    engine_dir: Path | None = None  # tensorrt backend: engine cache (None: $HALOAE_ENGINE_CACHE)


class Backend:
    """The interface. A subclass registers itself (``haloae.runtime.registry.register``), is
    built as ``cls(bundle, options)``, sets the attributes and implements ``run``."""

    name: str = "?"  # the registry name: "tensorrt" | "onnxruntime" | "torch" | ...
    priority: int = 0  # ``auto`` tries the higher first (set by ``register``)
    device: str = "?"  # where it runs, for logs and the status topic ("CPUExecutionProvider", "cuda:0")
    input_shape: tuple[int, int, int, int] = (1, 3, 0, 0)  # static N, 3, H, W of the bundle
    skipped: list[str] = []  # why ``auto`` skipped the backends before this one

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``batch`` float32 [N, 3, H, W] -> ``(score float32 [N], map float32 [N, 1, H, W])``."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the backend's memory (GPU buffers, sessions)."""

    @property
    def description(self) -> str:
        return f"{self.name} ({self.device})"

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        """The batch as a C-contiguous float32 array of exactly ``input_shape``."""
        if tuple(batch.shape) != tuple(self.input_shape):
            raise ValueError(f"{self.name}: batch shape {list(batch.shape)} != the bundle's "
                             f"input shape {list(self.input_shape)}")
        return np.ascontiguousarray(batch, dtype=np.float32)

    def run_padded(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Any number of images [K, 3, H, W] in static batches (the last one padded by repeating
        its last image; the padding's outputs dropped) -> ``(score [K], map [K, 1, H, W])``."""
        n = self.input_shape[0]
        scores, maps = [], []
        for start in range(0, len(x), n):
            chunk = x[start:start + n]
            k = len(chunk)
            if k < n:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], n - k, axis=0)])  # n, 3, H, W
            s, m = self.run(chunk)
            scores.append(np.asarray(s)[:k])
            maps.append(np.asarray(m)[:k])
        return np.concatenate(scores), np.concatenate(maps)
