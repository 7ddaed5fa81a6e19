"""Calibration of HaloAE outputs on held-out normal images.

The image threshold is a quantile of the raw image scores of normal images, the pixel
threshold a quantile of all their raw anomaly-map pixels (e.g. 0.99 and 0.999: about 1 % of
normal parts flagged, 0.1 % of normal pixels). `inference.HaloAEInference` divides by them so
both thresholds sit at 0.5 in the normalised outputs. `thresholds_from_scores` is the pure
part, so other methods (F1-optimal on a labelled split) can reuse the statistics.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Optional

import numpy as np
import torch

from .inference import raw_outputs

_LOG = logging.getLogger(__name__)

MIN_THRESHOLD = 1e-12  # thresholds must be > 0 (they divide the outputs)


def score_stats(scores: np.ndarray) -> dict[str, float]:
    """{n, mean, std, p50, p99, max} of raw image scores."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    if s.size == 0:
        raise ValueError("no scores to summarise: the calibration set is empty")
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
        raise ValueError("non-finite image scores: the model diverged (NaN/inf); retrain with "
                         "a lower lr")
    image_thr = max(float(np.quantile(scores, image_quantile)), MIN_THRESHOLD)
    if raw_pixels is None:
        pixel_thr = image_thr
    else:
        px = np.asarray(raw_pixels, dtype=np.float32).ravel()
        pixel_thr = max(float(np.quantile(px, pixel_quantile)), MIN_THRESHOLD)
    return {"image_threshold": image_thr, "pixel_threshold": pixel_thr, "method": "quantile",
            "quantile": float(image_quantile), "pixel_quantile": float(pixel_quantile),
            "normal_scores": stats}


def _images(batch: Any) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


def collect_raw(model: torch.nn.Module, loader: Iterable, device: Any) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Raw image scores [N] and map pixels [N, S, S] (float32) of every batch of ``loader``
    (batches: image tensors [B, 3, S, S] in [0, 1], or `data.ImageDataset` dicts)."""
    was_training = model.training
    model.eval()
    scores, maps = [], []
    try:
        with torch.inference_mode():
            for batch in loader:
                x = _images(batch).to(device=device, dtype=torch.float32)
                s, m = raw_outputs(model, x)
                scores.append(s.float().cpu().numpy())
                maps.append(m[:, 0].float().cpu().numpy())
    finally:
        model.train(was_training)
    if not scores:
        raise ValueError("calibration loader gave no images: hold out some normal images "
                         "(holdout_fraction > 0)")
    return np.concatenate(scores), np.concatenate(maps)


def calibrate(model: torch.nn.Module, loader: Iterable, image_quantile: float = 0.99,
              pixel_quantile: float = 0.999, device: Any = "cpu") -> dict[str, Any]:
    """Quantile thresholds from the normal images of ``loader`` (see module doc)."""
    scores, pixels = collect_raw(model, loader, device)
    cal = thresholds_from_scores(scores, pixels, image_quantile, pixel_quantile)
    _LOG.info("calibrated on %d normal images: image threshold %.4g, pixel threshold %.4g",
              len(scores), cal["image_threshold"], cal["pixel_threshold"])
    return cal
