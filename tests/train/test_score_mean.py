"""The ``max_mean`` image score: the map's maximum plus w times its mean, w fitted on held-out
normal maps at calibration, saved in the checkpoint, exported in the graph, and used by the
ignore-zone rescoring of the edge."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from haloae import bundle as B
from haloae.export import parity
from haloae.export.cli import export_bundle
from haloae.train.anomaly_map import image_score
from haloae.train.calibrate import calibrate
from haloae.train.checkpoint import load_checkpoint, save_checkpoint
from haloae.train.config import load_model_config
from haloae.train.fit_stats import fit_for_timing
from haloae.train.inference import HaloAEInference, raw_outputs
from haloae.train.torch_model import create_model
from haloae.train.train_loop import _without_score
from haloae.zones import IgnoreZones, Reduction, ZonesError, ZoneSet, reduction_from_model_config


def _model(mean_weight: float = 1.0):
    torch.manual_seed(0)
    cfg = load_model_config("tiny")
    cfg.map.score, cfg.map.mean_weight = "max_mean", mean_weight
    model = create_model(cfg, pretrained=False).eval()
    return model, fit_for_timing(model)


@pytest.fixture(scope="module")
def fitted():
    return _model()


def test_max_mean_score_is_the_max_plus_w_times_the_mean():
    cfg = load_model_config("tiny").map
    cfg.score = "max_mean"
    amap = torch.rand(3, 1, 8, 8)
    amap[1, 0, 2, 3] = 5.0
    got = image_score(amap, cfg, torch.tensor(2.5))
    flat = amap.flatten(1)
    torch.testing.assert_close(got, flat.max(1).values + 2.5 * flat.mean(1))
    with pytest.raises(ValueError, match="mean weight"):
        image_score(amap, cfg)


def test_calibration_fits_the_weight_and_the_score_uses_it(fitted, tmp_path):
    model, cal = fitted
    w = float(model.calibration.score_mean_weight)
    assert w > 0 and cal["score_mean_weight"] == pytest.approx(w)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        score, amap = raw_outputs(model, x)
    flat = amap.flatten(1)
    torch.testing.assert_close(score, flat.max(1).values + w * flat.mean(1))
    # the weight is a buffer: it rides in the checkpoint and the loaded model scores the same
    loaded, ckpt = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model, cal, {"epochs": 0}))
    assert float(ckpt["state_dict"]["calibration.score_mean_weight"]) == pytest.approx(w)
    with torch.no_grad():
        torch.testing.assert_close(HaloAEInference(loaded)(x), HaloAEInference(model)(x))


def test_weight_scales_with_mean_weight_and_the_pixel_floor_is_the_maxima_threshold():
    """Same weights and held-out images: mean_weight 2 doubles w, and the pixel threshold's
    floor is what the maxima alone (score: max) calibrate as the image threshold."""
    one, _ = _model(1.0)
    two, _ = _model(2.0)
    held = torch.rand(8, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    cal1 = calibrate(one, [held], image_quantile=0.9, pixel_quantile=0.5)
    cal2 = calibrate(two, [held], image_quantile=0.9, pixel_quantile=0.5)
    assert cal2["score_mean_weight"] == pytest.approx(2 * cal1["score_mean_weight"], rel=1e-6)
    assert cal1["raw_image"] != pytest.approx(cal2["raw_image"])  # the mean term moves the score
    plain, _ = _model(1.0)
    plain.cfg.map.score = "max"
    cal_max = calibrate(plain, [held], image_quantile=0.9, pixel_quantile=0.5)
    assert float(plain.calibration.score_mean_weight) == 0.0
    for cal in (cal1, cal2):
        assert cal["raw_pixel"] == pytest.approx(max(cal["pixel_quantile_threshold"], cal_max["raw_image"]))


def test_a_checkpoint_saved_before_the_weight_existed_loads_with_zero(fitted):
    model, _ = fitted
    sd = {k: v for k, v in model.state_dict().items() if k != "calibration.score_mean_weight"}
    other = create_model(model.cfg, pretrained=False)
    other.load_state_dict(sd, strict=True)
    assert float(other.calibration.score_mean_weight) == 0.0


def test_max_mean_bundle_matches_torch_and_carries_the_weight(fitted, tmp_path):
    model, cal = fitted
    ckpt = save_checkpoint(tmp_path / "mm.pt", model, cal, {"epochs": 0, "seed": 0})
    manifest = export_bundle(ckpt, tmp_path / "bundle", fp16=True, batch=1, samples=2, threads=2).to_dict()
    w = float(model.calibration.score_mean_weight)
    assert manifest["threshold"]["score_mean_weight"] == pytest.approx(w)
    assert manifest["parity"]["fp32"]["max_abs_score"] <= 1e-4
    x, _ = parity.sample_images(3, 128, seed=5)
    ref = parity.torch_runner(HaloAEInference(model), 1)(x)
    bundle = B.Bundle.open(tmp_path / "bundle")
    got = parity.run_bundle(bundle, "fp32", x, threads=1)
    assert np.max(np.abs(ref[0] - got[0])) <= 1e-4 and np.max(np.abs(ref[1] - got[1])) <= 1e-3
    # the edge's rescoring reduction, from the bundle's manifest, gives the graph's score back
    m = bundle.manifest
    red = reduction_from_model_config(m.model_config, m.threshold.calibration)
    assert red == Reduction("max_mean", 1, pytest.approx(w))
    ratio = m.threshold.raw_pixel / m.threshold.raw_image
    for score, amap in zip(got[0].reshape(-1), got[1][:, 0]):
        assert red(amap) * ratio == pytest.approx(float(score), rel=1e-4, abs=1e-5)


def test_ignore_zones_rescore_max_mean_over_the_kept_pixels():
    red = Reduction("max_mean", 1, 3.0)
    amap = np.full((16, 16), 0.1, np.float32)
    amap[0:4, 0:4] = 2.0  # a hot fixture in the corner
    zs = ZoneSet(IgnoreZones(size=[16, 16], polygons=[[[0, 0], [4, 0], [4, 4], [0, 4]]]))
    score = 0.8 * red(amap)  # the graph: a constant times the reduction of its map
    got, masked = zs.apply(score, amap, (16, 16), red)
    kept = amap[zs.keep(16, 16, 16, 16)]
    assert kept.max() == pytest.approx(0.1) and 16 * 16 - 36 <= kept.size < 16 * 16 - 15  # the fixture is out
    assert got == pytest.approx(0.8 * (kept.max() + 3.0 * kept.mean()))
    assert masked[:4, :4].max() == 0.0


def test_max_mean_without_its_weight_is_refused_for_zones():
    cfg = {"map": {"score": "max_mean"}}
    assert reduction_from_model_config(cfg, {"score_mean_weight": 1.5}) == Reduction("max_mean", 1, 1.5)
    for cal in (None, {}, {"score_mean_weight": -1.0}, {"score_mean_weight": "x"}):
        with pytest.raises(ZonesError, match="score_mean_weight"):
            reduction_from_model_config(cfg, cal)


def test_a_resumed_run_may_change_only_the_score_keys():
    cfg = load_model_config("edge").to_dict()
    other = {**cfg, "map": {**cfg["map"], "score": "max", "mean_weight": 2.0, "topk": 7}}
    assert _without_score(other) == _without_score(cfg)
    changed = {**cfg, "map": {**cfg["map"], "sigma": 2.0}}
    assert _without_score(changed) != _without_score(cfg)
