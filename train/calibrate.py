"""Calibration of HaloAE outputs on held-out normal images (fills `calibration.Calibration`).

Every statistic here comes from normal images the model never trained on:

1. with ``map.position_norm``, the first part of the held-out images sets the per-position
   mean / std of the smoothed grid error map (`fit_position_stats`);
2. the rest sets the thresholds: the image threshold is a quantile of their raw image scores,
   the pixel threshold a quantile of all their raw map pixels (e.g. 0.95 and 0.999: about
   5 % of normal parts flagged, 0.1 % of normal pixels), but never below the image threshold:
   with the image score the map's maximum, a region then always means a part judged defective.

A quantile threshold promises a false-positive rate of ``1 - quantile`` only when enough
normal images lie above it: `min_normals` (at least 50, and 3 above the threshold). With fewer
the calibration is marked unreliable, and the training log and the report say how many images
are needed (docs/training.md). `thresholds_from_scores` is the pure part, so other methods
(F1-optimal on a labelled split) can reuse the statistics.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Optional

import numpy as np
import torch

from .calibration import CalibrationError
from .inference import finish_map, grid_error

_LOG = logging.getLogger(__name__)

MIN_THRESHOLD = 1e-12  # thresholds must be > 0 (they divide the outputs)
MIN_HELD_OUT = 50  # normals below which no quantile threshold is trusted
MIN_ABOVE = 3  # normals that must lie above a quantile threshold for it to mean anything


def min_normals(quantile: float) -> int:
    """Held-out normal images needed before an image threshold at ``quantile`` is reliable."""
    if quantile >= 1.0:
        return MIN_HELD_OUT
    return max(MIN_HELD_OUT, math.ceil(MIN_ABOVE / (1.0 - quantile) - 1e-9))


def score_stats(scores: np.ndarray) -> dict[str, float]:
    """{n, mean, std, p50, p99, max} of raw image scores."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise CalibrationError("no scores to summarise: the calibration set is empty")
    return {"n": int(s.size), "mean": float(s.mean()), "std": float(s.std()),
            "p50": float(np.quantile(s, 0.5)), "p99": float(np.quantile(s, 0.99)),
            "max": float(s.max())}


def thresholds_from_scores(raw_image_scores: np.ndarray, raw_pixels: Optional[np.ndarray],
                           image_quantile: float = 0.99,
                           pixel_quantile: float = 0.999) -> dict[str, Any]:
    """Calibration dict (docs/architecture.md) from raw scores / map pixels of NORMAL images.

    ``raw_pixels`` may be any shape (flattened) or None (pixel threshold = image threshold).
    """
    for name, q in (("image_quantile", image_quantile), ("pixel_quantile", pixel_quantile)):
        if not 0.0 < q <= 1.0:
            raise ValueError(f"{name}={q}: use a quantile in (0, 1]")
    scores = np.asarray(raw_image_scores, dtype=np.float64).ravel()
    stats = score_stats(scores)
    if not np.all(np.isfinite(scores)):
        raise CalibrationError("non-finite image scores: the model diverged (NaN/inf); retrain with "
                         "a lower lr")
    image_thr = max(float(np.quantile(scores, image_quantile)), MIN_THRESHOLD)
    if raw_pixels is None:
        pixel_thr = image_thr
    else:
        px = np.asarray(raw_pixels, dtype=np.float32).ravel()
        pixel_thr = max(float(np.quantile(px, pixel_quantile)), MIN_THRESHOLD)
    pixel_quantile_thr = pixel_thr
    # A defect region is a set of pixels above the pixel threshold; with the image score the map's
    # maximum, a pixel threshold below the image threshold would report regions on parts judged
    # ok (and grow every region into normal texture). The floor keeps "region => defect".
    pixel_thr = max(pixel_thr, image_thr)
    need = min_normals(image_quantile)
    return {"raw_image": image_thr, "raw_pixel": pixel_thr,
            "pixel_quantile_threshold": pixel_quantile_thr, "method": "quantile",
            "quantile": float(image_quantile), "pixel_quantile": float(pixel_quantile),
            "promised_false_positive_rate": float(1.0 - image_quantile),
            "threshold_images": int(scores.size), "images_needed": need,
            "reliable": bool(scores.size >= need), "normal_scores": stats}


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def _grid_maps(model: torch.nn.Module, loader: Iterable, device: Any) -> torch.Tensor:
    """Smoothed grid error maps [N, 1, gh, gw] (before position normalisation), eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for batch in loader:
                x = _images(batch).to(device=device, dtype=torch.float32)
                out.append(grid_error(model, x).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        raise CalibrationError("calibration loader gave no images: hold out some normal images "
                         "(holdout_fraction > 0)")
    return torch.cat(out)


def fit_position_stats(model: torch.nn.Module, loader: Iterable, device: Any = "cpu"
                       ) -> dict[str, Any]:
    """Per-position mean / std of held-out normal grid maps into ``model.calibration``."""
    maps = _grid_maps(model, loader, device)
    if maps.shape[0] < 2:
        raise CalibrationError("map.position_norm needs at least 2 held-out normal images for its "
                         "statistics; hold out more (holdout_fraction)")
    mean, std = maps.mean(dim=0)[0], maps.std(dim=0)[0]
    model.calibration.set_position_stats(mean, std)
    _LOG.info("position-wise map statistics from %d held-out normal images", maps.shape[0])
    return {"images": int(maps.shape[0])}


def collect_raw(model: torch.nn.Module, loader: Iterable, device: Any) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Raw image scores [N] and map pixels [N, H, W] (float32) of every batch of ``loader``
    (batches: image tensors [B, 3, H, W] in [0, 1], or `data.ImageDataset` dicts)."""
    maps = _grid_maps(model, loader, device)
    scores, pixels = [], []
    with torch.inference_mode():
        for lo in range(0, maps.shape[0], 16):
            s, m = finish_map(model, maps[lo:lo + 16].to(device))
            scores.append(s.float().cpu().numpy())
            pixels.append(m[:, 0].float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(pixels)


def calibrate(model: torch.nn.Module, loader: Iterable, image_quantile: float = 0.99,
              pixel_quantile: float = 0.999, device: Any = "cpu",
              position_loader: Optional[Iterable] = None) -> dict[str, Any]:
    """Fit ``model.calibration`` on normal images; returns the calibration dict.

    ``position_loader`` (required with ``map.position_norm``): other held-out normal images for
    the position statistics, so the thresholds are measured on maps normalised with
    statistics of different images.
    """
    info: dict[str, Any] = {}
    if model.cfg.map.position_norm:
        if position_loader is None:
            raise ValueError("map.position_norm needs held-out images for its statistics "
                             "(position_loader)")
        info["position_norm"] = fit_position_stats(model, position_loader, device)
    scores, pixels = collect_raw(model, loader, device)
    cal = thresholds_from_scores(scores, pixels, image_quantile, pixel_quantile)
    model.calibration.set_thresholds(cal["raw_image"], cal["raw_pixel"])
    cal.update(info)
    _LOG.info("calibrated on %d normal images: image threshold %.4g, pixel threshold %.4g",
              len(scores), cal["raw_image"], cal["raw_pixel"])
    if not cal["reliable"]:
        _LOG.warning("the image threshold is UNRELIABLE: %d held-out normal images set it, but "
                     "a %.3g quantile (a promised false-positive rate of %.1f %%) needs at "
                     "least %d; hold out more normal images (holdout_fraction) or lower "
                     "image_quantile", len(scores), image_quantile, 100 * (1 - image_quantile),
                     cal["images_needed"])
    return cal
