"""Statistics a HaloAE run fits besides its weights (train_loop.py calls these in order).

0. `fit_brightness` (before everything, ``backbone.brightness: gain``): the mean every image
   is scaled to = the training images' median mean brightness, so a dark object on black and a
   bright web both keep the exposure the trunk sees on the line, and only changes of lighting
   gain are undone.
1. `fit_standardization` (before training, ``backbone.standardize``): per-channel mean / std
   of the aggregated Block A features of the training images -> Block A's buffers, so Block C
   reconstructs standardised features and no channel group dominates the error by its scale.
2. `fit_gaussian` (after training, ``map.error: gaussian``): the position-wise Gaussian of
   the training images' reconstruction residuals (`position_gaussian.py`). It is part of the
   model, fitted on training images like Block C itself; everything that judges the model
   (position statistics, thresholds) comes from held-out images in `calibrate.py`.
3. `split_calibration`: which held-out images set the position statistics and which the
   thresholds, so a threshold is never measured on the images that normalised it.
"""
from __future__ import annotations

import logging
import random
from typing import Iterator, Optional, Sequence

import torch

from haloae.preprocess import scale_tensor

from .calibration import CalibrationError
from .torch_model import HaloAE

_LOG = logging.getLogger(__name__)


def _feature_batches(model: HaloAE, images: torch.Tensor, cache: Optional[torch.Tensor],
                     device: torch.device, batch: int, desc: str,
                     progress: bool) -> Iterator[torch.Tensor]:
    """Block A features of every training image, from the cache or computed [B, C, gh, gw]."""
    starts = range(0, images.shape[0], batch)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for i in starts:
        if cache is not None:
            yield cache[i: i + batch]
        else:
            with torch.no_grad():
                yield model.extract(scale_tensor(images[i: i + batch].to(device)))


@torch.no_grad()
def fit_brightness(model: HaloAE, images: torch.Tensor, batch: int = 64) -> Optional[float]:
    """Set Block A's brightness target from the training images (uint8 [N, 3, H, W]): the
    median of their mean brightness; returns it (None unless ``backbone.brightness: gain``).
    Call it before any feature is computed: every feature depends on it."""
    if model.cfg.backbone.brightness != "gain":
        return None
    means = torch.cat([scale_tensor(images[i: i + batch]).mean(dim=(1, 2, 3))
                       for i in range(0, images.shape[0], batch)])
    target = float(means.median())
    model.backbone.set_brightness_target(target)
    _LOG.info("brightness target %.3f: the median mean of %d training images (%.3f .. %.3f)",
              target, images.shape[0], float(means.min()), float(means.max()))
    return target


@torch.no_grad()
def fit_standardization(model: HaloAE, images: torch.Tensor, cache: Optional[torch.Tensor],
                        device: torch.device, batch: int = 16,
                        progress: bool = False) -> Optional[torch.Tensor]:
    """Set Block A's standardisation from the training images; returns the cache standardised
    in place (or None without a cache). No-op unless ``backbone.standardize``."""
    if not model.cfg.backbone.standardize:
        return cache
    n, s1, s2 = 0, None, None
    for f in _feature_batches(model, images, cache, device, batch, "feature statistics",
                              progress and cache is None):
        f = f.double()
        s1 = f.sum(dim=(0, 2, 3)) if s1 is None else s1 + f.sum(dim=(0, 2, 3))
        s2 = f.pow(2).sum(dim=(0, 2, 3)) if s2 is None else s2 + f.pow(2).sum(dim=(0, 2, 3))
        n += f.shape[0] * f.shape[2] * f.shape[3]
    mean = s1 / n
    std = (s2 / n - mean.pow(2)).clamp_min(0).sqrt()
    model.backbone.set_standardization(mean.float(), std.float())
    _LOG.info("feature standardisation from %d training images (channel std %.3g .. %.3g)",
              images.shape[0], float(std.min()), float(std.max()))
    if cache is not None:
        bb = model.backbone
        cache.sub_(bb.feat_mean.to(cache)).div_(bb.feat_std.to(cache))
    return cache


@torch.no_grad()
def fit_gaussian(model: HaloAE, images: torch.Tensor, cache: Optional[torch.Tensor],
                 device: torch.device, batch: int = 16, progress: bool = False) -> Optional[dict]:
    """Fit the position-wise Gaussian on the residuals of the training images (eval mode)."""
    if model.gaussian is None:
        return None
    was_training = model.training
    model.eval()

    def residuals() -> Iterator[torch.Tensor]:
        for f in _feature_batches(model, images, cache, device, batch, "fitting the residual "
                                  "Gaussian", progress):
            yield f - model.reconstruct(f)

    try:
        return model.gaussian.fit(residuals())
    finally:
        model.train(was_training)


def split_calibration(held_out: Sequence, position_norm: bool,
                      seed: int = 0) -> tuple[list, list]:
    """(images for the position statistics, images for the thresholds) from the held-out
    normal images: a seeded random half each with position_norm, else () and all."""
    held_out = list(held_out)
    random.Random(seed + 7).shuffle(held_out)
    if not position_norm:
        return [], held_out
    if len(held_out) < 4:
        raise CalibrationError(f"map.position_norm needs at least 4 held-out normal images (2 for the "
                         f"position statistics, 2 for the thresholds), got {len(held_out)}; "
                         "raise holdout_fraction or add images")
    half = len(held_out) // 2
    return held_out[:half], held_out[half:]


def fit_for_timing(model: HaloAE, n: int = 6, seed: int = 0) -> dict:
    """Fit every statistic of an UNTRAINED model on random images (standardisation, the
    residual Gaussian, position statistics, thresholds at the median), so its full inference
    graph can be built, exported and timed: latency does not depend on the values. Never use
    such a model to inspect anything. Returns the calibration dict a checkpoint stores."""
    from .calibrate import calibrate

    gen = torch.Generator().manual_seed(seed)
    h, w = model.cfg.hw
    images = (torch.rand(n, 3, h, w, generator=gen) * 255).to(torch.uint8)
    cpu = torch.device("cpu")
    model.eval()
    fit_brightness(model, images)
    fit_standardization(model, images, None, cpu)
    fit_gaussian(model, images, None, cpu)
    held = [torch.rand(2, 3, h, w, generator=gen) for _ in range(2)]
    cal = calibrate(model, [held[1]], image_quantile=0.5, pixel_quantile=0.5,
                    position_loader=[held[0]])
    cal["note"] = "fitted on random images, for timing only"
    return cal
