"""Anomaly map and image score of HaloAE (Mathian et al., arXiv 2208.03486).

`compute_anomaly` is the ONE function that training, evaluation and export use:

1. error = channel mean of (F - F_hat)^2 at the feature grid  -> [N, 1, g, g]
   (computed as the sum of ((F - F_hat) / sqrt(C))^2: no fp16 overflow)
2. Gaussian smoothing at grid resolution with the equivalent sigma
   (``sigma_grid = sigma_px * g / out_size``) as two fixed 1-D convolutions (constant weights)
   with zero padding renormalised by the kernel mass inside the map (so borders are not
   darkened): Pad-free Conv + Mul, static, TensorRT friendly.
3. bilinear upsample to ``out_size`` (align_corners=False, no antialias)  -> [N, 1, S, S]
4. score = max of the map, or the mean of its top-k pixels  -> [N]
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from .config import MapCfg


@lru_cache(maxsize=32)
def gaussian_taps(sigma: float) -> tuple[float, ...]:
    """Normalised 1-D Gaussian taps, radius ceil(4 sigma) (at least 1)."""
    r = max(1, math.ceil(4.0 * sigma))
    taps = [math.exp(-0.5 * (i / sigma) ** 2) for i in range(-r, r + 1)]
    s = sum(taps)
    return tuple(t / s for t in taps)


@lru_cache(maxsize=32)
def _border_gain(size: int, taps: tuple[float, ...]) -> tuple[float, ...]:
    """1 / (kernel mass inside the map) for each of ``size`` positions (zero padding)."""
    r = len(taps) // 2
    return tuple(1.0 / sum(t for j, t in enumerate(taps) if 0 <= i + j - r < size)
                 for i in range(size))


def gaussian_blur_grid(amap: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, 1, g, g] with border renormalisation (all constants)."""
    if sigma <= 0:
        return amap
    g = amap.shape[-1]
    taps = gaussian_taps(float(sigma))
    r = len(taps) // 2
    kw = dict(device=amap.device, dtype=amap.dtype)
    k = torch.tensor(taps, **kw)
    gain = torch.tensor(_border_gain(g, taps), **kw)
    amap = F.conv2d(amap, k.reshape(1, 1, -1, 1), padding=(r, 0)) * gain.reshape(1, 1, g, 1)
    amap = F.conv2d(amap, k.reshape(1, 1, 1, -1), padding=(0, r)) * gain.reshape(1, 1, 1, g)
    return amap


def compute_anomaly(features: torch.Tensor, recon: torch.Tensor, map_cfg: MapCfg,
                    out_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features F and reconstruction F_hat [N, C, g, g] -> (score [N], amap [N, 1, S, S]).

    Values are raw squared errors (>= 0, higher = more anomalous); ``inference.py`` normalises
    them by the calibrated thresholds.
    """
    if features.shape != recon.shape or features.dim() != 4:
        raise ValueError(f"features {list(features.shape)} and recon {list(recon.shape)} must "
                         "both be [N, C, g, g]")
    g = features.shape[-1]
    # Scale before squaring, then sum: the mean without fp16 overflow (a sum of C squared
    # errors passes 65504 easily). Sum and topk(1) rather than ReduceMean / ReduceMax: their
    # opset-18 form (axes as an input) makes torch's dynamo exporter fail to down-convert to 17.
    diff = (features - recon) * (features.shape[1] ** -0.5)
    err = diff.pow(2).sum(dim=1, keepdim=True)  # [N, 1, g, g] channel mean of squared error
    err = gaussian_blur_grid(err, map_cfg.sigma * g / out_size)
    amap = F.interpolate(err, size=(out_size, out_size), mode="bilinear", align_corners=False)
    flat = amap.flatten(1)  # [N, S*S]
    if map_cfg.score == "max":
        score = flat.topk(1, dim=1).values[:, 0]  # == amax
    elif map_cfg.score == "topk":
        score = flat.topk(map_cfg.topk, dim=1).values.mean(dim=1)
    else:
        raise ValueError(f"map.score={map_cfg.score!r}: use 'max' or 'topk'")
    return score, amap
