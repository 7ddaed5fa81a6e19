"""Inference graph of HaloAE (Mathian et al., arXiv 2208.03486): what export traces and eval runs.

`HaloAEInference` = frozen backbone (Block A, with its feature standardisation) + HaloNet
auto-encoder (Block C) + anomaly map (``anomaly_map.py``: error, smoothing, position-wise
normalisation, upsampling, score) + calibration (``calibration.py``), without the training
heads (Blocks D, E). It takes RGB float [0, 1] NCHW at the model's input size and returns
calibrated, normalised outputs (docs/architecture.md):

    score_norm = 0.5 * score_raw / raw_image      [N]
    map_norm   = 0.5 * map_raw   / raw_pixel      [N, 1, H, W]

so both thresholds sit at 0.5 (linear, monotone, never clipped).
"""
from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from .anomaly_map import error_map, image_score, published_map, smooth, upsample
from .calibration import CalibrationError
from .position_gaussian import check_fitted
from .torch_model import HaloAE


def grid_error(model: HaloAE, x01: torch.Tensor) -> torch.Tensor:
    """Smoothed raw error at grid resolution [N, M, gh, gw], BEFORE position normalisation
    (what the position statistics of the calibration are computed from).

    ``model``: a `HaloAE` or a `HaloAEInference` (anything with ``cfg``, ``backbone``,
    ``autoencoder``, ``gaussian`` and ``calibration``)."""
    with torch.no_grad():
        feats = model.backbone(x01)  # frozen Block A
    recon = model.autoencoder(feats)
    err = error_map(feats, recon, model.cfg.map, model.gaussian)
    return smooth(err, model.cfg.map, model.cfg.hw)


def finish_maps(model: HaloAE, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed grid errors [N, M, gh, gw] -> ``(score_map, anomaly_map)``, both raw
    [N, 1, H, W]: position-wise normalisation (when configured), then the map the image score
    is taken from (the full distance) and the published one (`published_map`: the same map
    unless ``map.fine_weight`` / ``map.coarse_weight``), upsampled."""
    if model.cfg.map.position_norm:
        err = model.calibration.position_normalize(err)
    if err.shape[1] == 1:
        amap = upsample(err, model.cfg.hw)
        return amap, amap
    # bilinear upsampling is linear: combine at grid resolution, then upsample both maps at once
    up = upsample(torch.cat([err[:, :1], published_map(err, model.cfg.map)], dim=1), model.cfg.hw)
    return up[:, :1], up[:, 1:]


def finish_map(model: HaloAE, err: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed grid errors -> raw ``(score [N], anomaly_map [N, 1, H, W])`` (`finish_maps`, then
    the image score of the score map; ``max_mean``: with the calibration's mean weight)."""
    score_map, amap = finish_maps(model, err)
    return image_score(score_map, model.cfg.map, model.calibration.score_mean_weight), amap


def raw_outputs(model: HaloAE, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw (not threshold-normalised) ``(score [N], anomaly_map [N, 1, H, W])``.

    Runs in the model's current mode; wrap in ``torch.no_grad()`` and call ``model.eval()``
    first when calibrating.
    """
    return finish_map(model, grid_error(model, x01))


def check_calibrated(model: HaloAE, source: str = "model") -> None:
    """Raise `CalibrationError` unless every statistic the map needs has been fitted."""
    try:
        check_fitted(model.gaussian, source)
    except ValueError as exc:
        raise CalibrationError(str(exc)) from exc
    cal = model.calibration
    if not bool(cal.fitted):
        raise CalibrationError(f"{source} has no calibrated thresholds: use the final.pt of a "
                               "finished haloae-train run")
    if model.cfg.map.position_norm and not bool(cal.position_fitted):
        raise CalibrationError(f"{source}: map.position_norm is on but its statistics were "
                               "never fitted; use the final.pt of a finished haloae-train run")


def _number(calibration: Mapping, key: str) -> float:
    try:
        return float(calibration[key])
    except (KeyError, TypeError, ValueError) as exc:
        raise CalibrationError(f"calibration needs the raw threshold '{key}' as a number (got {calibration!r}); "
                               "calibrate the model first (train/calibrate.py)") from exc


class HaloAEInference(nn.Module):
    """RGB [0, 1] [N, 3, H, W] -> ``(score_norm [N], anomaly_map_norm [N, 1, H, W])``.

    Shares Blocks A and C, the Gaussian and the calibration with ``model`` (no copy) and puts
    them in eval mode: call ``model.train()`` again before more training steps.
    """

    def __init__(self, model: HaloAE, calibration: Optional[Mapping] = None,
                 source: Optional[str] = None) -> None:
        super().__init__()
        if calibration is not None:  # thresholds given by hand (tests, notebooks)
            model.calibration.set_thresholds(_number(calibration, "raw_image"),
                                             _number(calibration, "raw_pixel"))
        check_calibrated(model, source or f"HaloAE '{model.cfg.name}'")
        self.cfg = model.cfg
        self.backbone = model.backbone  # Block A (frozen, with its standardisation)
        self.autoencoder = model.autoencoder  # Block C
        self.gaussian = model.gaussian  # position-wise Gaussian (map.error: gaussian) or None
        self.calibration = model.calibration
        self.eval()

    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = self.cfg.hw
        if x01.dim() != 4 or x01.shape[1] != 3 or tuple(x01.shape[-2:]) != (h, w):
            raise ValueError(f"expected RGB float in [0, 1] shaped [N, 3, {h}, {w}], got "
                             f"{list(x01.shape)}")
        score, amap = raw_outputs(self, x01)
        return self.calibration.normalize(score, amap)
