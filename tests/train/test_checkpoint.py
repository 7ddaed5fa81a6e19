"""Checkpoints: weights-only loadable, round trip, clear errors; calibration maths."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from haloae.train.calibrate import calibrate, thresholds_from_scores
from haloae.train.checkpoint import (CheckpointError, load_checkpoint, read_checkpoint,
                                     save_checkpoint)
from haloae.train.config import load_model_config
from haloae.train.calibration import POS_STD_FLOOR
from haloae.train.inference import finish_map, grid_error, raw_outputs
from haloae.train.torch_model import create_model


@pytest.fixture(scope="module")
def tiny_model(fit_untrained):
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny"))
    with torch.no_grad():  # make it differ from a fresh init
        for p in model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    fit_untrained(model)
    return model.eval()


def test_save_load_round_trip_weights_only(tmp_path, tiny_model):
    opt = torch.optim.AdamW(tiny_model.trainable_parameters(), lr=1e-3)
    x = torch.rand(2, 3, 128, 128)
    tiny_model.train()
    tiny_model.reconstruct(tiny_model.extract(x)).pow(2).mean().backward()
    opt.step()
    tiny_model.eval()
    cal = thresholds_from_scores(np.array([1.0, 2.0, 3.0]), np.arange(10.0))
    info = {"epochs": 3, "seed": np.int64(5), "history": [{"loss": np.float32(0.5)}],
            "versions": {"torch": torch.__version__}, "data": {"root": "/x"}}
    path = save_checkpoint(tmp_path / "c.pt", tiny_model, cal, info, opt, epoch=3,
                           resume={"scaler": {}})
    raw = torch.load(path, weights_only=True)  # the contract: no arbitrary pickle
    assert raw["format"] == "haloae-checkpoint" and raw["epoch"] == 3
    assert raw["train"]["seed"] == 5 and raw["calibration"]["method"] == "quantile"
    assert "state" in raw["optimizer"]
    model, ckpt = load_checkpoint(path)
    assert not model.training and ckpt["config"] == tiny_model.cfg.to_dict()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    with torch.no_grad():
        a, b = raw_outputs(tiny_model, x), raw_outputs(model, x)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temp file


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt"):
        read_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a HaloAE checkpoint"):
        read_checkpoint(tmp_path / "other.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"format": "haloae-checkpoint", "x": Evil()}))
    with pytest.raises(CheckpointError, match="evil.pt"):
        read_checkpoint(tmp_path / "evil.pt")


def test_mismatched_weights_are_reported(tmp_path, tiny_model):
    path = save_checkpoint(tmp_path / "c.pt", tiny_model, None, {})
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"].pop(next(iter(ckpt["state_dict"])))
    torch.save(ckpt, tmp_path / "cut.pt")
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(tmp_path / "cut.pt")


def test_thresholds_are_quantiles_of_normal_scores():
    scores = np.arange(1, 101, dtype=np.float64)  # 1..100
    pixels = np.linspace(0, 1, 1001)
    cal = thresholds_from_scores(scores, pixels, image_quantile=0.9, pixel_quantile=0.5)
    assert cal["raw_image"] == pytest.approx(np.quantile(scores, 0.9))
    assert cal["pixel_quantile_threshold"] == pytest.approx(0.5)
    assert cal["raw_pixel"] == cal["raw_image"]  # floor: a region means a defect
    high = thresholds_from_scores(scores / 1000, pixels, image_quantile=0.9, pixel_quantile=0.9)
    assert high["raw_pixel"] == pytest.approx(0.9) and high["raw_pixel"] > high["raw_image"]
    assert cal["normal_scores"]["n"] == 100 and cal["normal_scores"]["max"] == 100
    assert cal["normal_scores"]["p50"] == pytest.approx(50.5)
    zero = thresholds_from_scores(np.zeros(3), np.zeros(9))
    assert zero["raw_image"] > 0 and zero["raw_pixel"] > 0  # they divide outputs
    with pytest.raises(ValueError, match="image_quantile"):
        thresholds_from_scores(scores, pixels, image_quantile=1.5)
    with pytest.raises(ValueError, match="diverged"):
        thresholds_from_scores(np.array([1.0, np.nan]), None)


def test_calibrate_matches_raw_outputs(tiny_model):
    """Every held-out image sets the shipped position statistics, and each one's threshold
    score comes from the statistics of the others (here 5 folds of 1 image)."""
    x = torch.rand(5, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    saved = {k: v.clone() for k, v in tiny_model.calibration.state_dict().items()}
    try:
        cal = calibrate(tiny_model, [x[:3], {"image": x[3:]}], image_quantile=1.0,
                        pixel_quantile=1.0, folds=5)
        shipped = {k: v.clone() for k, v in tiny_model.calibration.state_dict().items()}
        with torch.no_grad():
            grid = grid_error(tiny_model, x)
            scores, pixels = [], []
            for i in range(5):
                others = grid[[j for j in range(5) if j != i]]
                tiny_model.calibration.set_position_stats(others.mean(0)[0], others.std(0)[0])
                s, m = finish_map(tiny_model, grid[i:i + 1])
                scores.append(float(s[0]))
                pixels.append(float(m.max()))
    finally:
        tiny_model.calibration.load_state_dict(saved)
    assert cal["raw_image"] == pytest.approx(max(scores), rel=1e-5)
    assert cal["raw_pixel"] == pytest.approx(max(pixels), rel=1e-5)
    assert cal["normal_scores"]["n"] == 5 and cal["position_norm"] == {"images": 5, "folds": 5}
    torch.testing.assert_close(shipped["pos_mean"], grid.mean(0, keepdim=True))
    torch.testing.assert_close(shipped["pos_std"], grid.std(0, keepdim=True).clamp_min(
        POS_STD_FLOOR * float(grid.std(0).mean()) + 1e-12))