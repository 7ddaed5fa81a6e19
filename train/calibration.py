"""Calibration of HaloAE outputs as a module with buffers (after anomalib's ``PostProcessor``).

Everything that is fitted on HELD-OUT normal images lives here as registered buffers, so it is
saved in the checkpoint's state dict and traced into the exported graph:

- ``pos_mean``, ``pos_std`` [1, M, gh, gw]: position-wise normalisation of the smoothed grid
  error map, ``(e - mean) / std`` (``map.position_norm``); applied BEFORE the image score is
  taken, so a place that is always rough on normal parts (a tile corner) does not set the
  score. M > 1 with ``map.fine_weight`` / ``map.coarse_weight`` (the full, the fine and the
  coarse cells' distance, each normalised with its own statistics), else 1;
- ``score_mean_weight`` (``map.score: max_mean``): w in ``score = max(map) + w * mean(map)``,
  ``map.mean_weight`` times the ratio of the spreads (std) of held-out normal maps' maxima and
  means, so that on normal parts both terms vary alike (0 for the other score forms; a checkpoint
  saved before the buffer existed loads with 0);
- ``image_threshold``, ``pixel_threshold``: quantiles of held-out normal image scores / map
  pixels in raw units; `normalize` divides by them so both thresholds sit at 0.5 in the
  outputs (linear, monotone, never clipped). Those are the buffer names in the checkpoint's
  state dict; everywhere else (the calibration record, `thresholds()`, the bundle manifest)
  the same two values are called ``raw_image`` and ``raw_pixel``.

`train/calibrate.py` computes the values; this module only holds and applies them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from haloae.errors import UserError
from haloae.manifest import THRESHOLD_TARGET  # both thresholds sit here in the normalised outputs

POS_STD_FLOOR = 0.1  # pos_std >= this fraction of its mean: no position divides by ~0


class CalibrationError(UserError, ValueError):
    """A calibration value is missing, non-finite or not > 0."""


class Calibration(nn.Module):
    """Buffers fitted on held-out normal images (see module doc)."""

    def __init__(self, grid_hw: tuple[int, int], maps: int = 1) -> None:
        super().__init__()
        self.register_buffer("pos_mean", torch.zeros(1, maps, *grid_hw))
        self.register_buffer("pos_std", torch.ones(1, maps, *grid_hw))
        self.register_buffer("image_threshold", torch.ones(()))
        self.register_buffer("pixel_threshold", torch.ones(()))
        self.register_buffer("score_mean_weight", torch.zeros(()))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("position_fitted", torch.zeros((), dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "score_mean_weight"  # absent from checkpoints saved before max_mean existed
        if key not in state_dict:
            state_dict[key] = torch.zeros(())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def set_score_weight(self, weight: float) -> None:
        """w of the ``max_mean`` image score (see module doc)."""
        if not math.isfinite(weight) or weight < 0:
            raise CalibrationError(f"score mean weight {weight}: it must be finite and >= 0; the held-out "
                                   "normal maps' means did not vary (check the data)")
        self.score_mean_weight.fill_(float(weight))

    @torch.no_grad()
    def set_position_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-position mean / std [M, gh, gw] of smoothed held-out normal grid maps ([gh, gw]:
        the same for every map); each map's std is floored at `POS_STD_FLOOR` of its own mean."""
        gh, gw = self.pos_std.shape[-2:]
        std = std.float().reshape(1, -1, gh, gw).expand_as(self.pos_std)
        std = torch.maximum(std, POS_STD_FLOOR * std.mean(dim=(2, 3), keepdim=True) + 1e-12)
        self.pos_mean.copy_(mean.float().reshape(1, -1, gh, gw).expand_as(self.pos_mean))
        self.pos_std.copy_(std)
        self.position_fitted.fill_(True)

    @torch.no_grad()
    def set_thresholds(self, image: float, pixel: float) -> None:
        for name, v in (("image", image), ("pixel", pixel)):
            if not math.isfinite(v) or v <= 0:
                raise CalibrationError(
                    f"{name} threshold {v}: thresholds must be finite and > 0; the held-out "
                    "normal images gave no usable scores (check the data and the run's loss)")
        self.image_threshold.fill_(float(image))
        self.pixel_threshold.fill_(float(pixel))
        self.fitted.fill_(True)

    def position_normalize(self, err: torch.Tensor) -> torch.Tensor:
        """[N, M, gh, gw] grid maps -> position-normalised maps (identity until fitted)."""
        return (err - self.pos_mean) / self.pos_std

    def normalize(self, score: torch.Tensor, amap: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw ``(score [N], map [N, 1, H, W])`` -> outputs with both thresholds at 0.5."""
        return (score * (THRESHOLD_TARGET / self.image_threshold),
                amap * (THRESHOLD_TARGET / self.pixel_threshold))

    def thresholds(self) -> dict[str, float]:
        """``{"raw_image", "raw_pixel"}``: the raw thresholds, named as in the manifest."""
        return {"raw_image": float(self.image_threshold), "raw_pixel": float(self.pixel_threshold)}
