"""Non-square model inputs (H x W): config checks, shapes end to end, TF-same padding per axis,
the preprocessing, and ONNX parity."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from haloae.train.backbones import SameConv2d, _same_pad
from haloae.train.config import ConfigError, ModelCfg, load_model_config
from haloae.train.data import read_mask, to_model_input
from haloae.train.inference import HaloAEInference
from haloae.train.torch_model import create_model


def _wide_cfg(share: int = 1, **halo) -> ModelCfg:
    d = load_model_config("tiny").to_dict()
    d["input_size"] = [64, 128]
    d["backbone"]["grid"] = [8, 16]
    d["image_decoder_widths"] = [16, 8, 8]
    d["map"]["gaussian_share"] = share
    d["halo"].update(halo)
    return ModelCfg.from_dict(d)


def test_config_checks_name_the_problem():
    assert _wide_cfg().hw == (64, 128) and _wide_cfg().level_sides() == [(8, 16), (4, 8), (2, 4)]
    with pytest.raises(ConfigError, match="block_size=3"):
        _wide_cfg(block_size=3, levels=1)
    with pytest.raises(ConfigError, match="halved"):
        _wide_cfg(levels=5)
    d = _wide_cfg().to_dict()
    d["backbone"]["grid"] = [8, 8]  # stride 8 on one axis, 16 on the other
    with pytest.raises(ConfigError, match="same integer multiple"):
        ModelCfg.from_dict(d)
    with pytest.raises(ConfigError, match="gaussian_share=3 does not divide the grid 8x16"):
        _wide_cfg(share=3)
    d["input_size"] = [64, "x"]
    with pytest.raises(ConfigError, match="input_size"):
        ModelCfg.from_dict(d)


@pytest.mark.parametrize("size,k,s", [((37, 64), 3, 2), ((64, 37), 5, 2), ((20, 31), 5, 1)])
def test_same_conv_pads_each_axis_like_tensorflow(size, k, s):
    torch.manual_seed(0)
    conv = SameConv2d(2, 3, k, s, size)
    x = torch.randn(1, 2, *size)
    (t, b), (le, r) = _same_pad(size[0], k, s), _same_pad(size[1], k, s)
    ref = F.conv2d(F.pad(x, (le, r, t, b)), conv.weight, stride=s)
    torch.testing.assert_close(conv(x), ref)
    assert tuple(ref.shape[-2:]) == conv.out_size


def test_preprocessing_takes_height_and_width():
    rgb = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    assert to_model_input(rgb, (64, 128)).shape == (3, 64, 128)
    assert to_model_input(rgb, 96).shape == (3, 96, 96)


def test_read_mask_takes_height_and_width(tmp_path):
    import cv2
    m = np.zeros((50, 100), np.uint8)
    m[:, 60:] = 255
    cv2.imwrite(str(tmp_path / "m.png"), m)
    out = read_mask(tmp_path / "m.png", (10, 20))
    assert out.shape == (10, 20) and out[:, 15].all() and not out[:, 5].any()


@pytest.mark.parametrize("share", [1, 2])  # 2: the Gaussian's 2x2 cells on a non-square grid
def test_wide_model_end_to_end_and_onnx_parity(tmp_path, fit_untrained, share):
    torch.manual_seed(0)
    model = create_model(_wide_cfg(share))
    fit_untrained(model)
    x = torch.rand(2, 3, 64, 128)
    out = model(x)
    assert out["features"].shape == (2, 64, 8, 16) and out["recon"].shape == (2, 64, 8, 16)
    assert out["image"].shape == (2, 3, 64, 128)
    module = HaloAEInference(model)
    with torch.no_grad():
        score, amap = module(x)
    assert score.shape == (2,) and amap.shape == (2, 1, 64, 128)
    with pytest.raises(ValueError, match=r"\[N, 3, 64, 128\]"):
        module(torch.rand(1, 3, 128, 64))
    from haloae.export.onnx_export import export_onnx
    import onnxruntime as ort
    export_onnx(module, (2, 3, 64, 128), tmp_path / "wide.onnx", 17)
    sess = ort.InferenceSession(str(tmp_path / "wide.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})
    np.testing.assert_allclose(got[0], score.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[1], amap.numpy(), rtol=1e-4, atol=1e-4)
