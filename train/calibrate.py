"""Calibration of HaloAE outputs on normal images the model never fitted (fills
`calibration.Calibration`).

1. with ``map.position_norm``, every held-out image's smoothed grid error map sets the
   per-position mean / std (the shipped statistics); for the thresholds, each held-out image
   is scored with statistics of the OTHER held-out images (``folds`` seeded folds), so no
   threshold score is measured on the statistics it set, and every held-out image does both
   jobs;
2. the thresholds: the image threshold is a quantile of the raw image scores, the pixel
   threshold a quantile of all held-out map pixels (e.g. 0.95 and 0.999: about 5 % of normal
   parts flagged, 0.1 % of normal pixels), but never below the image threshold: with the image
   score the map's maximum, a region then always means a part judged defective. With
   ``map.score: max_mean`` the weight w of the map mean is fitted first, from the same
   cross-fitted held-out maps (the spread of their maxima over that of their means), and the
   pixel floor is the threshold the maxima alone would get: a region is then as rare on normal
   parts as before, and a part flagged by a diffuse rise of its whole map may carry none. With
   ``map.fine_weight`` or ``map.coarse_weight`` the published map is not the score map (`inference.finish_maps`): the
   floor is then the threshold the PUBLISHED map's maxima would get, so a region stays as rare;
3. ``out_of_fold`` (``map.error: gaussian``, `fit_stats.out_of_fold_maps`): the training
   images' maps, each under a Gaussian fitted without it, scored with the shipped position
   statistics. The image threshold is then the larger of the held-out quantile and the
   quantile of held-out and out-of-fold scores pooled: the pool gives the tail quantile many
   more images (on MTD 569 instead of 142), the held-out quantile keeps it honest where Block C
   overfits its training images (their scores then fall, and the pool could only lower it).

A quantile threshold promises a false-positive rate of ``1 - quantile`` only when enough
normal images lie above it: `min_normals` (at least 50, and 3 above the threshold). With fewer
the calibration is marked unreliable, and the training log and the report say how many images
are needed (docs/training.md). `thresholds_from_scores` is the pure part, so other methods
(F1-optimal on a labelled split) can reuse the statistics.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch

from .calibration import CalibrationError
from .anomaly_map import image_score
from .inference import finish_maps, grid_error

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
                           image_quantile: float = 0.99, pixel_quantile: float = 0.999,
                           out_of_fold_scores: Optional[np.ndarray] = None,
                           pixel_floor: Optional[float] = None) -> dict[str, Any]:
    """Calibration dict (docs/architecture.md) from raw scores / map pixels of HELD-OUT normal
    images, and optionally the raw scores of more normal images scored out of fold (module
    doc, step 3: the image threshold is then max(held-out quantile, pooled quantile)).

    ``raw_pixels`` may be any shape (flattened) or None (pixel threshold = image threshold).
    ``pixel_floor``: the least pixel threshold (default: the image threshold; module doc, step 2).
    """
    for name, q in (("image_quantile", image_quantile), ("pixel_quantile", pixel_quantile)):
        if not 0.0 < q <= 1.0:
            raise ValueError(f"{name}={q}: use a quantile in (0, 1]")
    scores = np.asarray(raw_image_scores, dtype=np.float64).ravel()
    stats = score_stats(scores)
    oof = np.asarray(out_of_fold_scores if out_of_fold_scores is not None else [],
                     dtype=np.float64).ravel()
    if not (np.all(np.isfinite(scores)) and np.all(np.isfinite(oof))):
        raise CalibrationError("non-finite image scores: the model diverged (NaN/inf); retrain with "
                         "a lower lr")
    held_thr = float(np.quantile(scores, image_quantile))
    pooled: dict[str, Any] = {}
    image_thr = held_thr
    if oof.size:
        pooled_thr = float(np.quantile(np.concatenate([scores, oof]), image_quantile))
        image_thr = max(held_thr, pooled_thr)
        pooled = {"held_out_threshold": held_thr, "pooled_threshold": pooled_thr,
                  "out_of_fold_images": int(oof.size), "out_of_fold_scores": score_stats(oof)}
    image_thr = max(image_thr, MIN_THRESHOLD)
    if raw_pixels is None:
        pixel_thr = image_thr
    else:
        px = np.asarray(raw_pixels, dtype=np.float32).ravel()
        pixel_thr = max(float(np.quantile(px, pixel_quantile)), MIN_THRESHOLD)
    pixel_quantile_thr = pixel_thr
    # A defect region is a set of pixels above the pixel threshold; with the image score the map's
    # maximum, a pixel threshold below the image threshold would report regions on parts judged
    # ok (and grow every region into normal texture). The floor keeps "region => defect".
    pixel_thr = max(pixel_thr, image_thr if pixel_floor is None else pixel_floor)
    need = min_normals(image_quantile)
    n = int(scores.size + oof.size)
    return {"raw_image": image_thr, "raw_pixel": pixel_thr,
            "pixel_quantile_threshold": pixel_quantile_thr, "method": "quantile",
            "quantile": float(image_quantile), "pixel_quantile": float(pixel_quantile),
            "promised_false_positive_rate": float(1.0 - image_quantile),
            "threshold_images": n, "held_out_images": int(scores.size), **pooled,
            "images_needed": need, "reliable": bool(n >= need), "normal_scores": stats}


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def _grid_maps(model: torch.nn.Module, loader: Iterable, device: Any) -> torch.Tensor:
    """Smoothed grid error maps [N, M, gh, gw] (before position normalisation), eval mode."""
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


def _finish_maps(model: torch.nn.Module, maps: torch.Tensor, device: Any, pixels: bool = True
                 ) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray, np.ndarray]:
    """Raw image scores [N], (with ``pixels``) the published map's pixels [N, H, W], the score
    map's means [N] and the published map's maxima [N] of grid maps, under the model's current
    position statistics (score map = published map unless ``map.fine_weight`` / ``coarse_weight``)."""
    scores, out, means, maxima = [], [], [], []
    with torch.inference_mode():
        for lo in range(0, maps.shape[0], 16):
            score_map, m = finish_maps(model, maps[lo:lo + 16].to(device))
            s = image_score(score_map, model.cfg.map, model.calibration.score_mean_weight)
            scores.append(s.float().cpu().numpy())
            means.append(score_map.flatten(1).mean(1, dtype=torch.float64).cpu().numpy())
            maxima.append(m.flatten(1).amax(1).float().cpu().numpy())
            if pixels:
                out.append(m[:, 0].float().cpu().numpy())
    return (np.concatenate(scores), (np.concatenate(out) if pixels else None), np.concatenate(means),
            np.concatenate(maxima))


def cross_folds(order: torch.Tensor, k: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(fold, rest)`` index tensors of the ``k`` folds of a (shuffled) ``order``: fold j is
    every k-th entry from j, rest the other folds."""
    for j in range(k):
        yield order[j::k], torch.cat([order[i::k] for i in range(k) if i != j])


def _set_position_stats(model: torch.nn.Module, maps: torch.Tensor) -> None:
    model.calibration.set_position_stats(maps.mean(dim=0), maps.std(dim=0))


def score_mean_weight(maxima: np.ndarray, means: np.ndarray, factor: float) -> float:
    """w of the ``max_mean`` score: ``factor`` x std(maxima) / std(means) of held-out normal
    maps (0 when the means do not vary: the max alone)."""
    spread = float(np.std(means))
    if factor == 0 or not spread > 0:
        if factor:
            _LOG.warning("map.score=max_mean: the %d held-out normal maps have one mean; the image "
                         "score is their max alone", means.size)
        return 0.0
    return float(factor * np.std(maxima) / spread)


def calibrate(model: torch.nn.Module, loader: Iterable, image_quantile: float = 0.99,
              pixel_quantile: float = 0.999, device: Any = "cpu",
              out_of_fold: Optional[torch.Tensor] = None, folds: int = 5,
              seed: int = 0, maps: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Fit ``model.calibration`` on the held-out normal images of ``loader`` (batches: image
    tensors [B, 3, H, W] in [0, 1], or `data.ImageDataset` dicts); returns the calibration
    dict. ``out_of_fold``: grid maps of more normal images (`fit_stats.out_of_fold_maps`).
    ``maps``: grid maps of the held-out images to calibrate on instead of the loader's
    (``gaussian_fit: all``: their out-of-fold maps, since the shipped Gaussian saw them).
    Steps and why: module doc."""
    maps = _grid_maps(model, loader, device) if maps is None else maps
    n = maps.shape[0]
    info: dict[str, Any] = {}
    max_mean = model.cfg.map.score == "max_mean"
    model.calibration.set_score_weight(0.0)  # max_mean: the max alone until w is fitted below
    if model.cfg.map.position_norm:
        if n < 4:
            raise CalibrationError(f"map.position_norm needs at least 4 held-out normal images "
                                   f"(each scored with the statistics of the others), got {n}; "
                                   "raise holdout_fraction or add images")
        k = min(folds, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7))
        scores, pixels, means, maxima = np.empty(n), None, np.empty(n), np.empty(n)
        for fold, rest in cross_folds(order, k):
            _set_position_stats(model, maps[rest])
            s, px, mu, mx = _finish_maps(model, maps[fold], device)
            if pixels is None:
                pixels = np.empty((n, *px.shape[1:]), dtype=np.float32)
            f = fold.numpy()
            scores[f], pixels[f], means[f], maxima[f] = s, px, mu, mx
        _set_position_stats(model, maps)  # the shipped statistics: every held-out image
        info["position_norm"] = {"images": n, "folds": k}
        _LOG.info("position-wise map statistics from %d held-out normal images (threshold "
                  "scores cross-fitted over %d folds)", n, k)
    else:
        scores, pixels, means, maxima = _finish_maps(model, maps, device)
    oof = oof_means = oof_maxima = None
    if out_of_fold is not None:
        oof, _, oof_means, oof_maxima = _finish_maps(model, out_of_fold, device, False)
    pixel_floor = None
    if max_mean or model.cfg.map.fused:  # the least pixel threshold: what the published map's maxima alone would get
        pixel_floor = thresholds_from_scores(maxima, None, image_quantile, pixel_quantile,
                                             oof_maxima)["raw_image"]
    if max_mean:  # scores so far are the score maps' maxima (w = 0): add w x their means
        weight = score_mean_weight(scores, means, model.cfg.map.mean_weight)
        model.calibration.set_score_weight(weight)
        scores = scores + weight * means
        oof = None if oof is None else oof + weight * oof_means
        info["score_mean_weight"] = weight
        _LOG.info("image score = map max + %.4g x map mean (std of %d held-out normal maxima / of "
                  "their means, x %g)", weight, n, model.cfg.map.mean_weight)
    cal = thresholds_from_scores(scores, pixels, image_quantile, pixel_quantile, oof, pixel_floor)
    model.calibration.set_thresholds(cal["raw_image"], cal["raw_pixel"])
    cal.update(info)
    if oof is not None:
        _LOG.info("image threshold %.4g = max(held-out quantile %.4g, pooled with %d training "
                  "images scored out of fold %.4g)", cal["raw_image"], cal["held_out_threshold"],
                  oof.size, cal["pooled_threshold"])
    _LOG.info("calibrated on %d normal images: image threshold %.4g, pixel threshold %.4g",
              cal["threshold_images"], cal["raw_image"], cal["raw_pixel"])
    if not cal["reliable"]:
        _LOG.warning("the image threshold is UNRELIABLE: %d normal images set it, but a %.3g "
                     "quantile (a promised false-positive rate of %.1f %%) needs at least %d; "
                     "hold out more normal images (holdout_fraction) or lower image_quantile",
                     cal["threshold_images"], image_quantile, 100 * (1 - image_quantile),
                     cal["images_needed"])
    return cal
