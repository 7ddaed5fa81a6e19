"""Inference graph of HaloAE (Mathian et al., arXiv 2208.03486): what export traces and eval runs.

`HaloAEInference` = frozen backbone (Block A) + HaloNet auto-encoder (Block C) + anomaly map,
without the training heads (Blocks D, E). It takes RGB float [0, 1] NCHW at the model's input
size and returns calibrated, normalised outputs (docs/architecture.md):

    score_norm = 0.5 * score_raw / image_threshold      [N]
    map_norm   = 0.5 * map_raw   / pixel_threshold      [N, 1, H, W]

so both thresholds sit at 0.5 (linear, monotone, never clipped).
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn

from .anomaly_map import compute_anomaly
from .torch_model import HaloAE


def raw_outputs(model: HaloAE, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (uncalibrated) ``(score [N], anomaly_map [N, 1, H, W])`` for calibration.

    Runs in the model's current mode; wrap in ``torch.no_grad()`` and call ``model.eval()``
    first when calibrating.
    """
    feats = model.extract(x01)
    recon = model.reconstruct(feats)
    return compute_anomaly(feats, recon, model.cfg.map, model.cfg.input_size)


def _threshold(calibration: Mapping, key: str) -> float:
    try:
        value = float(calibration[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"calibration needs a number '{key}' (got {calibration!r}); "
                         "calibrate the model first (train/calibrate.py)") from exc
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"calibration['{key}']={value}: thresholds must be finite and > 0")
    return value


class HaloAEInference(nn.Module):
    """RGB [0, 1] [N, 3, S, S] -> ``(score_norm [N], anomaly_map_norm [N, 1, S, S])``.

    Shares Blocks A and C with ``model`` (no copy) and puts them in eval mode: call
    ``model.train()`` again before more training steps.
    """

    def __init__(self, model: HaloAE, calibration: Mapping) -> None:
        super().__init__()
        self.cfg = model.cfg
        self.backbone = model.backbone  # Block A (frozen)
        self.autoencoder = model.autoencoder  # Block C
        self.image_threshold = _threshold(calibration, "image_threshold")
        self.pixel_threshold = _threshold(calibration, "pixel_threshold")
        self.eval()

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.cfg.input_size
        if x01.dim() != 4 or x01.shape[1] != 3 or tuple(x01.shape[-2:]) != (s, s):
            raise ValueError(f"expected RGB float in [0, 1] shaped [N, 3, {s}, {s}], got "
                             f"{list(x01.shape)}")
        feats = self.backbone(x01)
        recon = self.autoencoder(feats)
        score, amap = compute_anomaly(feats, recon, self.cfg.map, s)
        return score * (0.5 / self.image_threshold), amap * (0.5 / self.pixel_threshold)
