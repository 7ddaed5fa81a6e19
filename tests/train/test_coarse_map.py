"""``map.coarse_weight``: the published map also fuses the distance of the residual averaged over
coarse cells, under the cells' own Gaussian (a child of the position-wise one); the image score
stays on the full distance."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from haloae import bundle as B
from haloae.export import parity
from haloae.export.cli import export_bundle
from fused_maps import fused_outputs
from haloae.train.anomaly_map import published_map
from haloae.train.checkpoint import load_checkpoint, save_checkpoint
from haloae.train.config import ConfigError, load_model_config
from haloae.train.fit_stats import fit_for_timing
from haloae.train.inference import HaloAEInference
from haloae.train.position_gaussian import PositionGaussian
from haloae.train.torch_model import create_model
from haloae.train.train_loop import _without_score
from haloae.zones import reduction_from_model_config


def _model(fine_weight: float = 0.5, coarse_weight: float = 0.5, cells: int = 2):
    cfg = load_model_config("tiny")
    cfg.map.gaussian_rank = 0
    cfg.map.score, cfg.map.fine_weight = "max_mean", fine_weight
    cfg.map.coarse_weight, cfg.map.coarse_cells = coarse_weight, cells
    torch.manual_seed(0)
    model = create_model(cfg, pretrained=False).eval()
    return model, fit_for_timing(model, n=40)


@pytest.fixture(scope="module")
def fitted():
    return _model()


def test_the_coarse_channel_is_a_gaussian_of_the_cells_mean_residuals_upsampled():
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(10, 10, generator=gen)
    train = torch.einsum("ncxy,dc->ndxy", torch.randn(80, 10, 8, 8, generator=gen), mix)
    test = torch.einsum("ncxy,dc->ndxy", torch.randn(4, 10, 8, 8, generator=gen), mix) * 1.5
    both = PositionGaussian(10, (8, 8), fine=4, coarse=2)
    info = both.fit([train[:40], train[40:]])  # batches: the cells' Gaussian sees every image
    assert info["coarse"]["images"] == 80
    cells, full = PositionGaussian(10, (2, 2)), PositionGaussian(10, (8, 8), fine=4)
    cells.fit([F.avg_pool2d(train, 4)])
    full.fit([train])
    out = both(test)
    assert out.shape == (4, 3, 8, 8)
    torch.testing.assert_close(out[:, :2], full(test))
    ref = F.interpolate(cells(F.avg_pool2d(test, 4)), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, 2:], ref, rtol=1e-4, atol=1e-5)
    # one cell: the whole image's mean residual, the same value everywhere
    one = PositionGaussian(10, (8, 8), coarse=1)
    one.fit([train])
    e = one(test)[:, 1]
    assert e.shape == (4, 8, 8) and torch.allclose(e, e[:, :1, :1].expand_as(e))


def test_coarse_cells_must_divide_the_grid_and_need_the_gaussian():
    cfg = load_model_config("tiny").to_dict()  # a 16 x 16 grid
    cfg["map"]["coarse_weight"], cfg["map"]["coarse_cells"] = 0.5, 3
    with pytest.raises(ConfigError, match="coarse_cells=3 does not divide the grid 16x16"):
        type(load_model_config("tiny")).from_dict(cfg)
    cfg["map"]["coarse_cells"], cfg["map"]["error"] = 4, "mse"
    with pytest.raises(ConfigError, match="coarse_weight=0.5 needs map.error=gaussian"):
        type(load_model_config("tiny")).from_dict(cfg)
    with pytest.raises(ValueError, match="must divide the grid"):
        PositionGaussian(10, (8, 6), coarse=4)


def test_published_map_fuses_three_distances_and_the_score_stays_on_z(fitted, tmp_path):
    model, cal = fitted
    x, z, up, amap, score_map = fused_outputs(model, 3)
    torch.testing.assert_close(amap, (up[:, :1] + 0.5 * up[:, 1:2] + 0.5 * up[:, 2:]) / 2.0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(score_map, up[:, :1], rtol=1e-5, atol=1e-5)
    # coarse without fine: the last channel is the coarse one
    two = published_map(z[:, [0, 2]], SimpleNamespace(fine_weight=0.0, coarse_weight=0.5))
    torch.testing.assert_close(two, (z[:, :1] + 0.5 * z[:, 2:]) / 1.5)
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "c.pt", model, cal, {"epochs": 0}))
    assert bool(loaded.gaussian.coarse.fitted)
    with torch.no_grad():
        torch.testing.assert_close(HaloAEInference(loaded)(x), HaloAEInference(model)(x))


def test_coarse_bundle_matches_torch(fitted, tmp_path, caplog):
    model, cal = fitted
    ckpt = save_checkpoint(tmp_path / "coarse.pt", model, cal, {"epochs": 0, "seed": 0})
    with caplog.at_level("WARNING", logger="haloae.export.fp16"):
        manifest = export_bundle(ckpt, tmp_path / "bundle", fp16=True, batch=1, samples=2, threads=2).to_dict()
    assert "feature-error Sub" not in caplog.text
    assert manifest["parity"]["fp32"]["max_abs_score"] <= 1e-4
    x, _ = parity.sample_images(3, 128, seed=5)
    ref = parity.torch_runner(HaloAEInference(model), 1)(x)
    got = parity.run_bundle(B.Bundle.open(tmp_path / "bundle"), "fp32", x, threads=1)
    assert np.max(np.abs(ref[0] - got[0])) <= 1e-4 and np.max(np.abs(ref[1] - got[1])) <= 1e-3
    # zones on such a bundle rescore by the published map's ratio, and say so
    m = B.Bundle.open(tmp_path / "bundle").manifest
    red = reduction_from_model_config(m.model_config, m.threshold.calibration)
    assert red.kind == "max_mean" and not red.exact


def test_a_resumed_run_may_change_the_coarse_term():
    cfg = load_model_config("edge").to_dict()
    changed = {**cfg, "map": {**cfg["map"], "coarse_weight": 0.0, "coarse_cells": 4}}
    assert _without_score(changed) == _without_score(cfg)
