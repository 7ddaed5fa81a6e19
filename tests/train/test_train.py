"""Training: the tiny model learns for real; resume; loss schedule; SSIM; Cut&Paste; CLI errors."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from torch.utils.data import DataLoader

from haloae.train import cli
from haloae.train.checkpoint import load_checkpoint
from haloae.train.config import ConfigError
from haloae.train.cutpaste import augment_batch
from haloae.train.data import ImageDataset, find_mvtec_samples
from haloae.train.inference import HaloAEInference
from haloae.train.loss import loss_weights, ssim
from haloae.train.synth import generate
from haloae.train.train_config import TrainCfg, default_curves, load_train_config
from haloae.train.train_loop import LOG_FIELDS, train

REPO = Path(__file__).resolve().parents[2]


def test_tiny_training_separates_synthetic_defects(trained_tiny):
    """haloae-synth + haloae-train (tiny): image AUROC >= 0.9 on the synthetic test split."""
    ckpt_path, data = trained_tiny
    raw = torch.load(ckpt_path, weights_only=True)
    cal = raw["calibration"]
    assert cal["raw_image"] > 0 and cal["raw_pixel"] > 0
    assert raw["train"]["epochs"] == load_train_config(REPO / "configs/train/tiny.yaml").epochs
    model, _ = load_checkpoint(ckpt_path)
    infer = HaloAEInference(model, cal)
    samples = find_mvtec_samples(data, "test")
    scores, labels, pix, gt = [], [], [], []
    with torch.inference_mode():
        for batch in DataLoader(ImageDataset(samples, model.cfg.input_size), batch_size=16):
            s, m = infer(batch["image"])
            scores += s.tolist()
            labels += batch["label"].tolist()
            pix.append(m[:, :, ::4, ::4].flatten().numpy())
            gt.append(batch["mask"][:, :, ::4, ::4].flatten().numpy())
    image_auroc = roc_auc_score(labels, scores)
    pixel_auroc = roc_auc_score(np.concatenate(gt) > 0.5, np.concatenate(pix))
    assert image_auroc >= 0.9, f"image AUROC {image_auroc:.3f}"
    assert pixel_auroc >= 0.9, f"pixel AUROC {pixel_auroc:.3f}"
    good = np.array(scores)[np.array(labels) == 0]
    assert (good < 0.5).mean() >= 0.6, "calibrated threshold (0.5) flags most good parts"

    rows = list(csv.DictReader(open(ckpt_path.parent / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, len(rows) + 1))
    assert set(LOG_FIELDS) <= set(rows[0])
    for r in rows:
        assert all(math.isfinite(float(r[k])) for k in ("loss", "ce", "feat_mse", "img_mse"))
    assert float(rows[-1]["feat_mse"]) < float(rows[0]["feat_mse"])


def test_loss_schedule_endpoints_and_monotonic():
    curves = default_curves()
    ps = np.linspace(0, 1, 201)
    w = {k: np.array([loss_weights(p, curves)[k] for p in ps]) for k in ("ce", "feat", "img")}
    np.testing.assert_allclose(w["ce"] + w["feat"] + w["img"], 1.0, atol=1e-12)
    assert w["ce"][0] > 0.9 and w["img"][0] < 0.01  # classifier first
    assert w["img"][-1] > 0.5 and w["ce"][-1] < 0.15  # image reconstruction last
    assert np.all(np.diff(w["ce"]) <= 1e-12) and np.all(np.diff(w["img"]) >= -1e-12)
    assert w["feat"].argmax() not in (0, len(ps) - 1)  # features peak mid-run
    # a head the model lacks drops out, the rest renormalise
    no_img = loss_weights(0.9, curves, enabled=("ce", "feat"))
    assert no_img["img"] == 0 and no_img["ce"] + no_img["feat"] == pytest.approx(1.0)
    # the config's curves are the defaults unless changed
    cfg_curves = TrainCfg().loss.curves()
    assert loss_weights(0.37, cfg_curves) == loss_weights(0.37, curves)


def test_loss_curve_given_in_part_keeps_its_other_defaults():
    cfg = TrainCfg.from_dict({"loss": {"ce": {"steep": 5.0}}})
    assert cfg.loss.ce.steep == 5.0
    assert (cfg.loss.ce.start, cfg.loss.ce.end, cfg.loss.ce.mid) == (1.0, 0.4, 0.16)  # a1's defaults
    assert cfg.loss.feat == default_curves()["feat"]


def test_train_config_types_checked_when_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # named configs come from the package, not from ./configs
    assert load_train_config("tiny") == load_train_config(REPO / "configs/train/tiny.yaml")
    assert load_train_config("mtd-edge").model == "edge"
    bad = tmp_path / "bad.yaml"
    for text, message in [("lr: '0.01'\n", r"lr: Input should be a valid number, got '0.01'"),
                          ("lr: 1e-3\n", r"lr: .*YAML reads 1e5 as text"),
                          ("epochs: 0\n", r"epochs: Input should be greater than or equal to 1"),
                          ("augment: {p_cutpaste: 0.8, p_scar: 0.4}\n", r"sum <= 1"),
                          ("model: no-such-model\n", r"model config 'no-such-model' not found"),
                          ("model_overrides: {map: {sigma: '4'}}\n", r"model_overrides: map.sigma: Input"),
                          ("epochs: 3\nepochs: 4\n", r"the key 'epochs' appears twice")]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_train_config(bad)
    with pytest.raises(ConfigError, match=r"train config 'tiniest' not found: .*'tiny'"):
        load_train_config("tiniest")
    cfg = TrainCfg()
    with pytest.raises(ConfigError, match="batch_size: Input should be greater than or equal to 2"):
        cfg.batch_size = 1


def test_ssim_on_images_and_many_channel_features():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 64, 64, generator=g)
    assert ssim(img, img).item() == pytest.approx(1.0, abs=1e-5)
    noisy = (img + 0.1 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    noisier = (img + 0.3 * torch.randn(img.shape, generator=g)).clamp(0, 1)
    assert 0 < ssim(noisier, img) < ssim(noisy, img) < 1
    assert ssim(noisy, img).item() == pytest.approx(ssim(img, noisy).item(), abs=1e-6)
    feats = torch.randn(2, 300, 8, 8, generator=g) * 3  # small map: the window shrinks
    assert ssim(feats, feats).item() == pytest.approx(1.0, abs=1e-5)
    assert ssim(feats, torch.randn(feats.shape, generator=g) * 3, data_range=6.0) < 0.2


def test_cutpaste_labels_masks_and_determinism():
    img = torch.rand(64, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    out, labels, masks = augment_batch(img, torch.Generator().manual_seed(5), 0.4, 0.3)
    out2, labels2, masks2 = augment_batch(img, torch.Generator().manual_seed(5), 0.4, 0.3)
    assert torch.equal(out, out2) and torch.equal(labels, labels2) and torch.equal(masks, masks2)
    assert set(labels.tolist()) == {0, 1, 2} and out.min() >= 0 and out.max() <= 1
    changed = (out != img).any(dim=1, keepdim=True)  # B, 1, H, W
    assert not changed[labels == 0].any() and not masks[labels == 0].any()
    assert not (changed & (masks == 0)).any()  # nothing changes outside the mask
    area = masks.mean(dim=(1, 2, 3))
    assert (area[labels == 1] > 0.015).all() and (area[labels == 1] < 0.2).all()
    assert (area[labels == 2] > 0).all() and (area[labels == 2] < 0.02).all()  # thin scars
    assert 0.25 < (labels == 1).float().mean() < 0.55


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small") / "data"
    generate(root, seed=3, size=128, train=10, test_good=0, test_per_kind=0, progress=False)
    return root


def _small_cfg(**kw) -> TrainCfg:
    cfg = load_train_config(REPO / "configs/train/tiny.yaml")
    cfg.epochs, cfg.batch_size, cfg.warmup_steps, cfg.threads = 2, 4, 1, 0
    cfg.holdout_fraction = 0.4  # 4 of 10: position statistics and thresholds get 2 each
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_resume_continues_to_the_same_result(tmp_path, small_data):
    whole = train(_small_cfg(), small_data, tmp_path / "whole", "cpu", progress=False)
    part = train(_small_cfg(), small_data, tmp_path / "part", "cpu", stop_after=1, progress=False)
    assert part.final is None and not (tmp_path / "part/final.pt").exists()
    assert torch.load(tmp_path / "part/last.pt", weights_only=True)["epoch"] == 1
    resumed = train(_small_cfg(), small_data, tmp_path / "part", "cpu", resume=True,
                    progress=False)
    assert resumed.final == tmp_path / "part/final.pt"
    a = torch.load(whole.final, weights_only=True)
    b = torch.load(resumed.final, weights_only=True)
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["calibration"]["raw_image"] == b["calibration"]["raw_image"]
    rows = list(csv.DictReader(open(tmp_path / "part/log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert [r["loss"] for r in rows] == [r["loss"] for r in csv.DictReader(open(tmp_path / "whole/log.csv"))]
    assert len(b["train"]["history"]) == 2


def test_gaussian_fit_all_fits_on_every_good_image_and_calibrates_out_of_fold(tmp_path, small_data):
    """gaussian_fit: all - the Gaussian sees the 6 training and the 4 held-out images; every
    image is then scored out of fold: the 4 held-out maps set the position statistics and the
    threshold floor, all 10 the pooled quantile. The default fits on the 6."""
    run = train(_small_cfg(epochs=1, gaussian_fit="all"), small_data, tmp_path / "all", "cpu",
                progress=False)
    ck = torch.load(run.final, weights_only=True)
    cal = ck["calibration"]
    assert ck["train"]["gaussian"]["images"] == 10
    assert cal["gaussian_fit"] == "all" and cal["images"] == 4
    assert cal["position_norm"]["images"] == 4 and cal["threshold_images"] == 10
    base = torch.load(train(_small_cfg(epochs=1), small_data, tmp_path / "default", "cpu",
                            progress=False).final, weights_only=True)
    assert base["train"]["gaussian"]["images"] == 6 and base["calibration"]["images"] == 4
    assert base["calibration"]["gaussian_fit"] == "training"
    assert not torch.equal(ck["state_dict"]["gaussian.mean"], base["state_dict"]["gaussian.mean"])


def test_cli_one_line_errors(tmp_path, small_data, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "tiny", "loss": {"ce": {"stepp": 3}}}))
    assert cli.main(["--config", str(bad), "--data", str(small_data), "--out",
                     str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "loss.ce.stepp" in err and err.count("\n") == 1
    bad.write_text("epochs: ten\n")
    assert cli.main(["--config", str(bad), "--data", str(small_data), "--out",
                     str(tmp_path / "r")]) == 2
    assert "epochs" in capsys.readouterr().err
    good = str(REPO / "configs/train/tiny.yaml")
    assert cli.main(["--config", good, "--data", str(tmp_path / "nope"), "--out",
                     str(tmp_path / "r")]) == 2
    assert "nope" in capsys.readouterr().err
    assert cli.main(["--config", good, "--data", str(small_data), "--out",
                     str(tmp_path / "r"), "--resume"]) == 2
    assert "last.pt" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r/last.pt").write_bytes(b"x")
    assert cli.main(["--config", good, "--data", str(small_data), "--out",
                     str(tmp_path / "r")]) == 2
    assert "--resume" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="augment.cutpaste: unknown key .*valid keys here: p_cutpaste"):
        bad.write_text("augment:\n  cutpaste: 0.5\n")
        load_train_config(bad)
