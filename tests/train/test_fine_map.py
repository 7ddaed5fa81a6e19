"""``map.fine_weight``: the published map fuses the full position-wise Gaussian distance with the
distance over the finer layers' channels alone (a prefix of the triangular projection, so it
costs no extra weights), each position-normalised; the image score stays on the full distance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from haloae import bundle as B
from haloae.export import parity
from haloae.export.cli import export_bundle
from fused_maps import fused_outputs
from haloae.train.anomaly_map import published_map
from haloae.train import calibrate as C
from haloae.train.calibrate import calibrate, thresholds_from_scores
from haloae.train.checkpoint import load_checkpoint, save_checkpoint
from haloae.train.config import ConfigError, load_model_config
from haloae.train.fit_stats import fit_for_timing
from haloae.train.inference import HaloAEInference
from haloae.train.position_gaussian import PositionGaussian, block_bounds
from haloae.train.torch_model import create_model
from haloae.train.train_loop import _without_score


def _cfg(fine_weight: float = 0.5, score: str = "max_mean"):
    cfg = load_model_config("tiny")
    cfg.map.gaussian_rank = 0  # fine needs every direction
    cfg.map.score, cfg.map.fine_weight = score, fine_weight
    return cfg


def _model(fine_weight: float = 0.5, score: str = "max_mean"):
    torch.manual_seed(0)
    model = create_model(_cfg(fine_weight, score), pretrained=False).eval()
    return model, fit_for_timing(model, n=40)


@pytest.fixture(scope="module")
def fitted():
    return _model()


def test_block_bounds_end_a_block_at_the_fine_prefix_and_cover_every_column():
    for dims, fine in ((176, 64), (64, 24), (16, 8), (10, 2), (176, 0)):
        b = block_bounds(dims, fine)
        assert b[0][0] == 0 and b[-1][1] == dims and all(a[1] == c[0] for a, c in zip(b, b[1:]))
        assert all(e > s for s, e in b) and len(b) <= 4
        if fine:
            assert fine in [e for _, e in b]


def test_the_fine_distance_is_the_marginal_gaussian_of_the_prefix_channels():
    """A prefix of the upper-triangular factor whitens the prefix channels' own covariance:
    channel 1 equals a Gaussian fitted on those channels alone (same eps)."""
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(12, 12, generator=gen)
    train = torch.einsum("ncxy,dc->ndxy", torch.randn(60, 12, 4, 4, generator=gen), mix)
    test = torch.einsum("ncxy,dc->ndxy", torch.randn(5, 12, 4, 4, generator=gen), mix) * 1.5
    both = PositionGaussian(12, (4, 4), fine=5)
    both.fit([train])
    alone, full = PositionGaussian(5, (4, 4)), PositionGaussian(12, (4, 4))
    alone.fit([train[:, :5]])
    full.fit([train])
    out = both(test)
    assert out.shape == (5, 2, 4, 4)
    torch.testing.assert_close(out[:, :1], full(test), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:, 1:], alone(test[:, :5]), rtol=1e-4, atol=1e-5)


def test_fine_weight_needs_the_full_gaussian_and_two_layers():
    cfg = load_model_config("tiny").to_dict()
    cfg["map"]["fine_weight"] = 0.5  # tiny keeps 24 directions
    with pytest.raises(ConfigError, match="fine_weight"):
        type(load_model_config("tiny")).from_dict(cfg)
    cfg["map"]["gaussian_rank"] = 0
    cfg["backbone"]["layers"] = [4]
    with pytest.raises(ConfigError, match="2 backbone.layers"):
        type(load_model_config("tiny")).from_dict(cfg)


def test_published_map_fuses_and_the_score_stays_on_the_full_distance(fitted, tmp_path):
    model, cal = fitted
    x, z, up, amap, score_map = fused_outputs(model, 2)
    torch.testing.assert_close(amap, published_map(up, model.cfg.map), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(amap, (up[:, :1] + 0.5 * up[:, 1:]) / 1.5, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(amap, score_map)  # the published map is not the score map
    # the two-map statistics ride in the checkpoint
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "f.pt", model, cal, {"epochs": 0}))
    with torch.no_grad():
        torch.testing.assert_close(HaloAEInference(loaded)(x), HaloAEInference(model)(x))


def test_the_pixel_floor_is_the_published_maps_maxima_threshold():
    """The least pixel threshold is what the PUBLISHED map's cross-fitted maxima would get as
    an image threshold (not the score map's): a region stays as rare on normal parts."""
    model, _ = _model(score="max")
    held = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    cal = calibrate(model, [held], image_quantile=0.9, pixel_quantile=0.5, seed=0)
    maps = C._grid_maps(model, [held], "cpu")  # the same cross-fitting as calibrate
    order = torch.randperm(8, generator=torch.Generator().manual_seed(7))
    scores, maxima = np.empty(8), np.empty(8)
    for fold, rest in C.cross_folds(order, 5):
        C._set_position_stats(model, maps[rest])
        s, _, _, mx = C._finish_maps(model, maps[fold], "cpu", False)
        scores[fold.numpy()], maxima[fold.numpy()] = s, mx
    floor = thresholds_from_scores(maxima, None, 0.9, 0.5)["raw_image"]
    assert cal["raw_image"] == pytest.approx(thresholds_from_scores(scores, None, 0.9, 0.5)["raw_image"])
    assert floor != pytest.approx(cal["raw_image"])  # the two maps differ
    assert cal["raw_pixel"] == pytest.approx(max(cal["pixel_quantile_threshold"], floor))
    # with fine_weight 0 the floor is the image threshold again (score: max)
    plain, _ = _model(fine_weight=0.0, score="max")
    plain_cal = calibrate(plain, [held], image_quantile=0.9, pixel_quantile=0.5)
    assert tuple(plain.calibration.pos_mean.shape) == (1, 1, 16, 16)
    assert plain_cal["raw_pixel"] == pytest.approx(max(plain_cal["pixel_quantile_threshold"], plain_cal["raw_image"]))


def test_fine_bundle_matches_torch(fitted, tmp_path, caplog):
    model, cal = fitted
    ckpt = save_checkpoint(tmp_path / "fine.pt", model, cal, {"epochs": 0, "seed": 0})
    with caplog.at_level("WARNING", logger="haloae.export.fp16"):
        manifest = export_bundle(ckpt, tmp_path / "bundle", fp16=True, batch=1, samples=2, threads=2).to_dict()
    assert "feature-error Sub" not in caplog.text  # the fp16 graph keeps the two-map tail fp32
    assert manifest["parity"]["fp32"]["max_abs_score"] <= 1e-4
    x, _ = parity.sample_images(3, 128, seed=5)
    ref = parity.torch_runner(HaloAEInference(model), 1)(x)
    got = parity.run_bundle(B.Bundle.open(tmp_path / "bundle"), "fp32", x, threads=1)
    assert np.max(np.abs(ref[0] - got[0])) <= 1e-4 and np.max(np.abs(ref[1] - got[1])) <= 1e-3


def test_a_resumed_run_may_change_fine_weight():
    cfg = load_model_config("edge").to_dict()
    assert _without_score({**cfg, "map": {**cfg["map"], "fine_weight": 0.0}}) == _without_score(cfg)
