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
   (position statistics, thresholds) comes from images the Gaussian never saw, in
   `calibrate.py`.
3. `out_of_fold_maps` (``map.error: gaussian``): the training images' maps, each under a
   Gaussian fitted WITHOUT it (K folds; the fold's place taken by as many held-out images, so
   every fold's Gaussian sees as many images as the shipped one): more normal scores for the
   image threshold than the held-out images alone give (docs/training.md, Calibration).
"""
from __future__ import annotations

import copy
import logging
from itertools import chain
from typing import Iterator, Optional

import torch

from haloae.preprocess import scale_tensor

from .anomaly_map import error_map, smooth
from .calibrate import calibrate, cross_folds
from .torch_model import HaloAE

_LOG = logging.getLogger(__name__)


def _feature_batches(model: HaloAE, images: torch.Tensor, cache: Optional[torch.Tensor],
                     device: torch.device, batch: int, desc: str, progress: bool,
                     index: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """Block A features [B, C, gh, gw] of the training images ``index`` (default: all), from
    the cache or computed."""
    index = torch.arange(images.shape[0]) if index is None else index
    starts = range(0, len(index), batch)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    for i in starts:
        sel = index[i: i + batch]
        if cache is not None:
            yield cache[sel.to(cache.device)]
        else:
            with torch.no_grad():
                yield model.extract(scale_tensor(images[sel].to(device)))


def _residuals(model: HaloAE, feats: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Block C reconstruction residuals ``F - F_hat`` of feature batches."""
    for f in feats:
        yield f - model.reconstruct(f)


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

    try:
        return model.gaussian.fit(_residuals(model, _feature_batches(
            model, images, cache, device, batch, "fitting the residual Gaussian", progress)))
    finally:
        model.train(was_training)


@torch.no_grad()
def out_of_fold_maps(model: HaloAE, images: torch.Tensor, cache: Optional[torch.Tensor],
                     held_out: Optional[torch.Tensor], device: torch.device, folds: int = 5,
                     seed: int = 0, batch: int = 16, progress: bool = False) -> Optional[torch.Tensor]:
    """Smoothed grid maps [N, 1, gh, gw] (before position normalisation) of the N training
    images, each under a position-wise Gaussian fitted without it: the images are split into
    ``folds`` seeded folds, and fold k is scored by a copy of the model's Gaussian fitted on
    the other folds plus as many of the ``held_out`` normal images (uint8 [M, 3, H, W]) as
    fold k holds, so every fold's Gaussian sees as many images as the shipped one.

    Block C saw these images in training; their maps are honest normal maps only as far as
    Block C does not overfit, which is why `calibrate.thresholds_from_scores` never lets them
    lower the held-out images' threshold. None without ``map.error: gaussian`` or held-out
    images (nothing to fill a fold's place with).

    ``held_out=None`` (``gaussian_fit: all``, where the shipped Gaussian saw every good image):
    ``images`` are all of them, and fold k is scored by a Gaussian on the other folds alone."""
    match_size = held_out is not None
    if model.gaussian is None or images.shape[0] < 2 or (match_size and held_out.shape[0] == 0):
        return None

    was_training = model.training
    model.eval()
    n, m = images.shape[0], held_out.shape[0] if match_size else 0
    gen = torch.Generator().manual_seed(seed + 11)
    order, h_order = torch.randperm(n, generator=gen), torch.randperm(m, generator=gen)
    k = min(folds, n)
    cfg = model.cfg.map

    def held_feats(sel: torch.Tensor) -> Iterator[torch.Tensor]:
        for i in range(0, len(sel), batch):
            yield model.extract(scale_tensor(held_out[sel[i: i + batch]].to(device)))

    out: Optional[torch.Tensor] = None
    sizes: list[int] = []
    try:
        for j, (fold, rest) in enumerate(cross_folds(order, k)):
            fill = h_order[:0]
            if match_size:
                start = (j * len(fold)) % m
                fill = h_order[(start + torch.arange(min(len(fold), m))) % m]
            gauss = copy.deepcopy(model.gaussian)
            info = gauss.fit(chain(_residuals(model, _feature_batches(
                model, images, cache, device, batch, f"out-of-fold Gaussian {j + 1}/{k}",
                progress, rest)), _residuals(model, held_feats(fill))))
            sizes.append(info["images"])
            for i, f in zip(range(0, len(fold), batch),
                            _feature_batches(model, images, cache, device, batch, "", False, fold)):
                e = smooth(error_map(f, model.reconstruct(f), cfg, gauss), cfg, model.cfg.hw)
                if out is None:
                    out = torch.empty((n, *e.shape[1:]), dtype=torch.float32)
                out[fold[i: i + batch]] = e.float().cpu()
    finally:
        model.train(was_training)
    _LOG.info("out-of-fold maps of %d %s images (%d folds, Gaussians on %d-%d images)",
              n, "training" if match_size else "good", k, min(sizes), max(sizes))
    return out


def fit_for_timing(model: HaloAE, n: int = 6, seed: int = 0) -> dict:
    """Fit every statistic of an UNTRAINED model on random images (standardisation, the
    residual Gaussian, position statistics, thresholds at the median), so its full inference
    graph can be built, exported and timed: latency does not depend on the values. Never use
    such a model to inspect anything. Returns the calibration dict a checkpoint stores."""
    gen = torch.Generator().manual_seed(seed)
    h, w = model.cfg.hw
    images = (torch.rand(n, 3, h, w, generator=gen) * 255).to(torch.uint8)
    cpu = torch.device("cpu")
    model.eval()
    fit_brightness(model, images)
    fit_standardization(model, images, None, cpu)
    fit_gaussian(model, images, None, cpu)
    held = torch.rand(4, 3, h, w, generator=gen)
    cal = calibrate(model, [held], image_quantile=0.5, pixel_quantile=0.5)
    cal["note"] = "fitted on random images, for timing only"
    return cal
