"""Inference backends of the edge daemon: one interface, three engines, imported lazily.

Every backend runs the bundle's graph on a float32 NCHW RGB batch in [0, 1] of the bundle's
static shape and returns the normalised ``(score [N], anomaly_map [N, 1, H, W])`` (thresholds at
0.5; docs/architecture.md). ``select.load_backend`` picks one (``auto``: TensorRT, then ONNX
Runtime, then torch). Importing this package imports no inference library.
"""

from __future__ import annotations

import numpy as np

from haloae.errors import UserError


class BackendUnavailable(UserError, RuntimeError):
    """The backend's library, GPU or files are missing here; ``auto`` tries the next one."""


class Backend:
    """The interface. Subclasses set the attributes in ``__init__`` and implement ``run``."""

    name: str = "?"  # "tensorrt" | "onnxruntime" | "torch"
    device: str = "?"  # where it runs, for logs and the status topic ("CPUExecutionProvider", "cuda:0")
    input_shape: tuple[int, int, int, int] = (1, 3, 0, 0)  # static N, 3, H, W of the bundle

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
