"""Anomaly map and image score of HaloAE (Mathian et al., arXiv 2208.03486), in steps.

Training, calibration, evaluation and export all use these functions (composed in
``inference.py``):

1. `error_map`: the error at every grid position from features F and reconstruction F_hat
   [N, C, gh, gw] -> [N, M, gh, gw] (M = 1, +1 with ``map.fine_weight``, +1 with
   ``map.coarse_weight``): the paper's channel mean of (F - F_hat)^2 (``mse``,
   computed as the sum of ((F - F_hat) / sqrt(C))^2: no fp16 overflow), or the distance of
   the residual under the position-wise Gaussian of normal residuals (``gaussian``,
   `position_gaussian.py`);
2. `smooth`: Gaussian smoothing at grid resolution with the equivalent sigma
   (``sigma_grid = sigma_px * gh / H``) as two fixed 1-D convolutions (constant weights) with
   zero padding renormalised by the kernel mass inside the map (borders are not darkened):
   Pad-free Conv + Mul, static, TensorRT friendly;
3. (calibration: position-wise normalisation, `calibration.Calibration.position_normalize`)
4. `upsample`: bilinear to the input size (align_corners=False, no antialias) -> [N, 1, H, W];
5. `image_score`: max of the map, the mean of its top-k pixels, or the max plus w times the map
   mean (``max_mean``: a small defect raises the max, a diffuse one - uneven texture, a shading
   fault - the whole map a little; w is fitted at calibration, docs/benchmarks.md row 43) -> [N];
6. `published_map`: the map the model outputs. With ``map.fine_weight`` f the Gaussian gives a
   second distance, over the finer layers' channels alone (M = 2), and the output map is
   ``(z + f z_fine) / (1 + f)``: the coarsest layer's large receptive field raises the whole map
   of a defective part (the "glow"), the finer layers' distance localises (docs/benchmarks.md
   row 45). With ``map.coarse_weight`` g the distance of the residual averaged over coarse
   cells joins it, ``(z + f z_fine + g z_coarse) / (1 + f + g)``: a large, diffuse defect
   raises its cell's mean residual more than any one position (row 46). The image score
   (step 5) is taken from z alone, which detects best.

The map is normalised (step 3) BEFORE the image score is taken (step 5).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

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
    """Separable Gaussian blur of [N, M, gh, gw] (each map alone) with border renormalisation
    (all constants)."""
    if sigma <= 0:
        return amap
    n, m, gh, gw = amap.shape
    if m > 1:
        return gaussian_blur_grid(amap.reshape(n * m, 1, gh, gw), sigma).reshape(n, m, gh, gw)
    taps = gaussian_taps(float(sigma))
    r = len(taps) // 2
    kw = dict(device=amap.device, dtype=amap.dtype)
    k = torch.tensor(taps, **kw)
    gain_h = torch.tensor(_border_gain(gh, taps), **kw)
    gain_w = torch.tensor(_border_gain(gw, taps), **kw)
    amap = F.conv2d(amap, k.reshape(1, 1, -1, 1), padding=(r, 0)) * gain_h.reshape(1, 1, gh, 1)
    amap = F.conv2d(amap, k.reshape(1, 1, 1, -1), padding=(0, r)) * gain_w.reshape(1, 1, 1, gw)
    return amap


def error_map(features: torch.Tensor, recon: torch.Tensor, map_cfg: MapCfg,
              gaussian: Optional[nn.Module] = None) -> torch.Tensor:
    """Features F and reconstruction F_hat [N, C, gh, gw] -> raw error [N, 1, gh, gw] (>= 0)."""
    if features.shape != recon.shape or features.dim() != 4:
        raise ValueError(f"features {list(features.shape)} and recon {list(recon.shape)} must "
                         "both be [N, C, gh, gw]")
    if map_cfg.error == "gaussian":
        if gaussian is None:
            raise ValueError("map.error=gaussian needs the model's fitted PositionGaussian")
        return gaussian(features - recon)
    # Scale before squaring, then sum: the mean without fp16 overflow (a sum of C squared
    # errors passes 65504 easily). Sum and topk(1) rather than ReduceMean / ReduceMax: their
    # opset-18 form (axes as an input) makes torch's dynamo exporter fail to down-convert to 17.
    diff = (features - recon) * (features.shape[1] ** -0.5)
    return diff.pow(2).sum(dim=1, keepdim=True)  # N, 1, gh, gw: channel mean of squared error


def smooth(err: torch.Tensor, map_cfg: MapCfg, out_hw: tuple[int, int]) -> torch.Tensor:
    """Gaussian smoothing of a grid map with ``map.sigma`` given in input pixels."""
    return gaussian_blur_grid(err, map_cfg.sigma * err.shape[-2] / out_hw[0])


def upsample(err: torch.Tensor, out_hw: tuple[int, int]) -> torch.Tensor:
    """[N, 1, gh, gw] -> [N, 1, H, W], bilinear, no antialias (TensorRT Resize)."""
    return F.interpolate(err, size=tuple(out_hw), mode="bilinear", align_corners=False)


def published_map(z: torch.Tensor, map_cfg: MapCfg) -> torch.Tensor:
    """Normalised maps [N, M, h, w] -> the map the model publishes [N, 1, h, w]: the
    full distance's (M = 1), or ``(z + f z_fine + g z_coarse) / (1 + f + g)`` with
    ``map.fine_weight`` f (channel 1: the fine distance) and ``map.coarse_weight`` g (the last
    channel: the coarse cells' distance). The image score is taken from channel 0 alone."""
    if z.shape[1] == 1:
        return z
    f, g = map_cfg.fine_weight, map_cfg.coarse_weight
    out = z[:, :1]
    if f > 0:
        out = out + f * z[:, 1:2]
    if g > 0:
        out = out + g * z[:, -1:]
    return out * (1.0 / (1.0 + f + g))


def image_score(amap: torch.Tensor, map_cfg: MapCfg, mean_weight: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
    """[N, 1, H, W] -> [N]: the map maximum, the mean of its top-k pixels, or (``max_mean``) the
    maximum plus ``mean_weight`` (the calibration's fitted w) times the map mean."""
    flat = amap.flatten(1)  # N, H*W
    if map_cfg.score == "max":
        return flat.topk(1, dim=1).values[:, 0]  # == amax
    if map_cfg.score == "topk":
        return flat.topk(map_cfg.topk, dim=1).values.mean(dim=1)
    if map_cfg.score == "max_mean":
        if mean_weight is None:
            raise ValueError("map.score=max_mean needs the calibration's fitted mean weight")
        mean = (flat * (1.0 / flat.shape[1])).sum(dim=1)  # scaled before the sum: fp16-safe
        return flat.topk(1, dim=1).values[:, 0] + mean_weight * mean
    raise ValueError(f"map.score={map_cfg.score!r}: use 'max', 'topk' or 'max_mean'")
