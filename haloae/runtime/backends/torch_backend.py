"""torch backend (priority 10, debugging): the training checkpoint through ``HaloAEInference``.

The only runtime module allowed to import torch and ``haloae.train``, and only when the backend
is built (the daemon never loads torch otherwise). It outputs the same normalised ``(score, anomaly_map)`` as the bundle's graph, so
comparing it with ONNX Runtime on the same frames tells an export problem from a model problem.
"""

from __future__ import annotations

import logging

import numpy as np

from haloae.bundle import Bundle

from ..base import Backend, BackendUnavailable, RuntimeOptions
from ..registry import register

log = logging.getLogger(__name__)


@register("torch", priority=10)
class TorchBackend(Backend):
    """Runs the checkpoint with torch on CUDA when available (device auto), else CPU."""

    def __init__(self, bundle: Bundle, options: RuntimeOptions = RuntimeOptions()):
        checkpoint, threads = options.checkpoint, options.threads
        if checkpoint is None:
            raise BackendUnavailable("the torch backend needs model.checkpoint (the training final.pt)")
        try:
            import torch
            from haloae.train.checkpoint import CheckpointError, load_checkpoint
            from haloae.train.inference import HaloAEInference
        except ImportError as exc:
            raise BackendUnavailable(f"torch / haloae training code is not installed ({exc}): "
                                     "pip install 'haloae[train]'") from None
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        self.device = "cuda" if options.device == "auto" and torch.cuda.is_available() else \
            ("cpu" if options.device == "auto" else options.device)
        try:
            model, ckpt = load_checkpoint(checkpoint, device=self.device)
            self.module = HaloAEInference(model, source=str(checkpoint)).to(self.device).eval()
        except (CheckpointError, ValueError) as exc:
            raise BackendUnavailable(f"torch backend: {exc}") from None
        self.input_shape = tuple(bundle.manifest.input.shape)
        h, w = self.module.cfg.hw
        if tuple(self.input_shape[2:]) != (h, w):
            raise BackendUnavailable(f"checkpoint {checkpoint} takes {w}x{h} inputs but the bundle "
                                     f"{list(self.input_shape)}: use the checkpoint the bundle was exported from")
        log.info("torch %s: %s on %s", torch.__version__, checkpoint, self.device)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = self.torch.from_numpy(self.check_batch(batch)).to(self.device)
        with self.torch.inference_mode():
            score, amap = self.module(x)
        return (score.float().cpu().numpy().astype(np.float32, copy=False),
                amap.float().cpu().numpy().astype(np.float32, copy=False))

    def close(self) -> None:
        self.module = None
