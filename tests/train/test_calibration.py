"""The calibration module, the position-wise Gaussian, feature standardisation and the
held-out calibration rule: buffers that travel with the weights, maths against a naive
reference, normalisation before the score, and honest warnings."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from haloae.train.calibrate import calibrate, min_normals, thresholds_from_scores
from haloae.train.checkpoint import load_checkpoint, save_checkpoint
from haloae.train.config import load_model_config
from haloae.train.fit_stats import fit_gaussian, fit_standardization, out_of_fold_maps
from haloae.train.inference import HaloAEInference, grid_error, raw_outputs
from haloae.train.anomaly_map import image_score, upsample
from haloae.train.position_gaussian import PositionGaussian
from haloae.train.torch_model import create_model


@pytest.fixture(scope="module")
def tiny(fit_untrained):
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny"))
    cal = fit_untrained(model)
    return model, cal


def test_calibration_buffers_ride_in_the_checkpoint(tiny, tmp_path):
    model, cal = tiny
    path = save_checkpoint(tmp_path / "m.pt", model, cal, {"epochs": 0})
    loaded, ckpt = load_checkpoint(path)
    sd = ckpt["state_dict"]
    for key in ("calibration.pos_mean", "calibration.pos_std", "calibration.image_threshold",
                "calibration.pixel_threshold", "gaussian.mean", "gaussian.proj",
                "backbone.feat_mean", "backbone.feat_std"):
        assert key in sd, key
        torch.testing.assert_close(loaded.state_dict()[key], model.state_dict()[key])
    assert float(loaded.calibration.image_threshold) == pytest.approx(cal["raw_image"])
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        a, b = HaloAEInference(model)(x), HaloAEInference(loaded)(x)
    torch.testing.assert_close(a, b)
    assert torch.isfinite(a[0]).all() and not torch.allclose(a[1], torch.zeros_like(a[1]))


def test_unfitted_model_is_refused():
    model = create_model(load_model_config("tiny"), pretrained=False)
    with pytest.raises(ValueError, match="never fitted|no calibrated thresholds"):
        HaloAEInference(model)


def test_position_normalisation_comes_before_the_score(tiny):
    model, _ = tiny
    x = torch.rand(3, 3, 128, 128)
    with torch.no_grad():
        g = grid_error(model, x)  # [3, 1, 16, 16] smoothed, before normalisation
        mean, std = torch.zeros(16, 16), torch.ones(16, 16)
        hot = divmod(int(g[0, 0].argmax()), 16)  # the place that sets image 0's raw score
        mean[hot], std[hot] = float(g[0, 0].max()), 100.0  # ... is always rough on normals
        saved = model.calibration.pos_mean.clone(), model.calibration.pos_std.clone()
        try:
            model.calibration.set_position_stats(mean, std)
            score, amap = raw_outputs(model, x)
            want = image_score(upsample((g - model.calibration.pos_mean)
                                        / model.calibration.pos_std, (128, 128)), model.cfg.map)
        finally:
            model.calibration.set_position_stats(*saved)
    torch.testing.assert_close(score, want)
    assert divmod(int(amap[0, 0].argmax()), 128) != (hot[0] * 8 + 4, hot[1] * 8 + 4)
    assert score[0] < g[0].max()  # the rough place no longer sets the score


def _naive_minor_distance(res: np.ndarray, test: np.ndarray, rank: int, eps: float):
    """Reference: per position, eigenvectors of the covariance, RMS whitened distance in the
    ``rank`` least-variance directions."""
    n, c, h, w = res.shape
    out = np.zeros((test.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            x = res[:, :, i, j].astype(np.float64)
            mu = x.mean(0)
            cov = np.cov(x, rowvar=False) + eps * np.eye(c)
            ev, vec = np.linalg.eigh(cov)
            z = (test[:, :, i, j] - mu) @ vec[:, :rank] / np.sqrt(ev[:rank])
            out[:, i, j] = np.sqrt((z ** 2).mean(1))
    return out


@pytest.mark.parametrize("rank", [3, 0])
def test_position_gaussian_matches_naive_reference(rank):
    gen = torch.Generator().manual_seed(1)
    res = torch.randn(40, 6, 4, 5, generator=gen)
    res[:, 0] *= 3.0
    res[:, 1] = res[:, 0] * 0.5 + 0.1 * res[:, 1]  # correlated channels
    test = torch.randn(7, 6, 4, 5, generator=gen) * 2
    g = PositionGaussian(6, (4, 5), rank=rank, eps=0.01)
    info = g.fit([res[:25], res[25:]])  # chunked fit == one pass
    assert info["images"] == 40 and info["rank"] == (rank or 6)
    want = _naive_minor_distance(res.numpy(), test.numpy(), rank or 6, 0.01)
    np.testing.assert_allclose(g(test)[:, 0].numpy(), want, rtol=1e-4, atol=1e-5)


def test_position_gaussian_shared_cells_pool_the_covariance_and_keep_the_mean():
    """share=2: each 2x2 cell whitens with the mean of its positions' covariances, around each
    position's own mean; the map keeps the grid's row-major layout."""
    gen = torch.Generator().manual_seed(2)
    res = torch.randn(30, 5, 4, 6, generator=gen) * torch.linspace(0.5, 2, 6)  # spread varies by column
    res = res + torch.arange(24.0).reshape(1, 1, 4, 6)  # a different mean at every position
    test = torch.randn(3, 5, 4, 6, generator=gen) * 2
    g = PositionGaussian(5, (4, 6), eps=0.01, share=2)
    assert g.fit([res])["share"] == 2 and tuple(g.proj.shape) == (6, 5, 5)
    r, t = res.double().numpy(), test.double().numpy()
    want = np.zeros((3, 4, 6))
    for ci in range(2):
        for cj in range(3):
            cells = [(i, j) for i in (2 * ci, 2 * ci + 1) for j in (2 * cj, 2 * cj + 1)]
            cov = np.mean([np.cov(r[:, :, i, j], rowvar=False) for i, j in cells], axis=0)
            prec = np.linalg.inv(cov + 0.01 * np.eye(5))
            for i, j in cells:
                x = t[:, :, i, j] - r[:, :, i, j].mean(0)
                want[:, i, j] = np.sqrt(np.einsum("nd,de,ne->n", x, prec, x) / 5)
    np.testing.assert_allclose(g(test)[:, 0].numpy(), want, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="share=4 must divide the grid 4x6"):
        PositionGaussian(5, (4, 6), share=4)


def _fitted_full_gaussian(share: int = 1) -> tuple[PositionGaussian, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    res = torch.randn(60, 10, 4, 4, generator=gen) * torch.linspace(0.3, 3, 10)[None, :, None, None]
    res[:, 1] += 0.8 * res[:, 0]  # correlated channels: the factor must not be diagonal
    g = PositionGaussian(10, (4, 4), eps=0.01, share=share)
    g.fit([res])
    return g, torch.randn(3, 10, 4, 4, generator=gen) * 2


@pytest.mark.parametrize("share", [1, 2])
def test_full_rank_projection_is_triangular_and_read_in_prefix_blocks(share):
    """rank 0: the stored factor is upper-triangular, the forward reads 4 column blocks over
    growing channel prefixes (at d = 10: 3x3 + 6x3 + 9x3 + 10x1 = 64 of the 100 weights per
    position), and the distance is the dense product with that factor."""
    from haloae.train.position_gaussian import TRIANGLE_BLOCKS, is_upper

    g, test = _fitted_full_gaussian(share)
    assert is_upper(g.proj) and not torch.allclose(g.proj, torch.diagonal(g.proj, dim1=1, dim2=2).diag_embed())
    assert g.blocks == [3, 6, 9, 10] and TRIANGLE_BLOCKS == 4
    read = sum(getattr(g, f"proj_block{i}").numel() for i in range(len(g.blocks)))
    assert read == 0.64 * g.proj.numel()  # the zeros below the diagonal are never read
    assert not [k for k in g.state_dict() if k.startswith("proj_block")]  # not saved twice
    with torch.no_grad():
        blocked = g(test)
        dense = torch.matmul(g._cells(g._positions(test) - g.mean).reshape(-1, share * share * 3, 10),
                             g.proj).pow(2).sum(2).sqrt()
    dense = dense.reshape(4 // share, 4 // share, share, share, 3).permute(4, 0, 2, 1, 3).reshape(3, 1, 4, 4)
    torch.testing.assert_close(blocked, dense * 16.0, rtol=1e-5, atol=1e-6)


def test_a_dense_full_rank_projection_from_an_older_checkpoint_is_converted_on_load():
    """Checkpoints before the triangular factor hold the dense eigenvector whitening ``W``:
    loading one (alone or inside a parent module) stores ``U`` with ``U U^T = W W^T`` and the
    map is unchanged."""
    g, test = _fitted_full_gaussian()
    q, _ = torch.linalg.qr(torch.randn(16, 10, 10, generator=torch.Generator().manual_seed(4)))
    old = {k: v.clone() for k, v in g.state_dict().items()}
    old["proj"] = g.proj @ q.transpose(1, 2)  # another factor of the same precision: dense
    with torch.no_grad():
        want = g(test)
    parent = torch.nn.Module()
    parent.gaussian = PositionGaussian(10, (4, 4), eps=0.01)
    parent.load_state_dict({f"gaussian.{k}": v for k, v in old.items()})
    from haloae.train.position_gaussian import is_upper

    assert is_upper(parent.gaussian.proj) and parent.gaussian.blocks == [3, 6, 9, 10]
    with torch.no_grad():
        torch.testing.assert_close(parent.gaussian(test), want, rtol=1e-4, atol=1e-5)


def test_full_rank_gaussian_exports_its_blocks_not_the_dense_matrix(tmp_path):
    """The exported graph matches torch and holds the prefix blocks (64 of the 100 weights
    per position) and the means, not the full projection."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    g, test = _fitted_full_gaussian()
    path = tmp_path / "g.onnx"
    torch.onnx.export(g.eval(), (test,), str(path), opset_version=17, dynamo=True, verbose=False)
    sizes = [numpy_helper.to_array(t).size for t in onnx.load(str(path)).graph.initializer]
    blocks = [getattr(g, f"proj_block{i}").numel() for i in range(4)]
    assert sorted(n for n in sizes if n >= 100) == sorted([g.mean.numel(), *blocks])  # no dense proj
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: test.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, g(test).numpy(), rtol=1e-5, atol=1e-5)


def test_position_gaussian_warns_when_images_are_fewer_than_channels(caplog):
    g = PositionGaussian(8, (2, 2))
    with caplog.at_level("WARNING", logger="haloae.train.position_gaussian"):
        g.fit([torch.randn(6, 8, 2, 2)])
    assert "6 training images for 8 feature channels" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="haloae.train.position_gaussian"):
        PositionGaussian(8, (2, 2)).fit([torch.randn(20, 8, 2, 2)])
    assert caplog.text == ""


def test_position_gaussian_channel_subset_is_fixed_and_sorted():
    a, b = PositionGaussian(20, (2, 2), dims=8), PositionGaussian(20, (2, 2), dims=8)
    assert torch.equal(a.index, b.index) and len(a.index) == 8
    assert torch.all(a.index[1:] > a.index[:-1])


def test_feature_standardisation_from_training_images():
    torch.manual_seed(0)
    model = create_model(load_model_config("tiny"))
    images = (torch.rand(5, 3, 128, 128) * 255).to(torch.uint8)
    with torch.no_grad():
        raw = model.extract(images.float() / 255)  # identity before fitting
    cache = fit_standardization(model, images, raw.clone(), torch.device("cpu"))
    with torch.no_grad():
        again = model.extract(images.float() / 255)
    torch.testing.assert_close(cache, again, atol=1e-5, rtol=1e-5)
    mean, std = again.mean(dim=(0, 2, 3)), again.std(dim=(0, 2, 3))
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 0.01
    torch.testing.assert_close(model.backbone.feat_mean.flatten(), raw.mean(dim=(0, 2, 3)),
                               atol=1e-5, rtol=1e-5)


def test_min_normals_rule():
    assert min_normals(0.95) == 60 and min_normals(0.99) == 300 and min_normals(0.5) == 50
    cal = thresholds_from_scores(np.arange(70.0), None, image_quantile=0.95)
    assert cal["reliable"] and cal["threshold_images"] == 70
    assert cal["promised_false_positive_rate"] == pytest.approx(0.05)
    cal = thresholds_from_scores(np.arange(20.0), None, image_quantile=0.99)
    assert not cal["reliable"] and cal["images_needed"] == 300


def test_unreliable_threshold_is_logged(tiny, caplog):
    model, _ = tiny
    x = torch.rand(3, 3, 128, 128)  # 4 held-out images with the repeat
    saved = {k: v.clone() for k, v in model.calibration.state_dict().items()}
    try:
        with caplog.at_level(logging.WARNING, logger="haloae.train.calibrate"):
            cal = calibrate(model, [x, x[:1]], image_quantile=0.99)
    finally:
        model.calibration.load_state_dict(saved)
    assert not cal["reliable"]
    assert any("UNRELIABLE" in r.message and "300" in r.message for r in caplog.records)


def test_pooled_out_of_fold_scores_can_raise_the_threshold_but_never_lower_it():
    held = np.arange(1.0, 101.0)  # 1..100, quantile 0.9 = 90.1
    low = thresholds_from_scores(held, None, 0.9, out_of_fold_scores=np.zeros(400))
    assert low["raw_image"] == pytest.approx(np.quantile(held, 0.9))  # Block C overfits: held-out
    assert low["pooled_threshold"] < low["held_out_threshold"] == low["raw_image"]
    high = thresholds_from_scores(held, None, 0.9, out_of_fold_scores=np.full(400, 95.0))
    assert high["raw_image"] == pytest.approx(95.0) == high["pooled_threshold"]
    assert high["threshold_images"] == 500 and high["held_out_images"] == 100
    assert high["out_of_fold_images"] == 400 and high["out_of_fold_scores"]["p50"] == 95.0
    assert high["normal_scores"]["n"] == 100  # the drift baseline stays the held-out images'
    few = thresholds_from_scores(np.arange(20.0), None, 0.99, out_of_fold_scores=np.arange(280.0))
    assert few["reliable"] and not thresholds_from_scores(np.arange(20.0), None, 0.99)["reliable"]
    with pytest.raises(ValueError, match="diverged"):
        thresholds_from_scores(held, None, 0.9, out_of_fold_scores=np.array([np.inf]))


def test_out_of_fold_maps_score_each_training_image_with_a_gaussian_that_never_saw_it(tiny):
    """An odd image among near-copies: inside the fit the Gaussian has learnt it, out of fold
    it stands out. The model's own Gaussian is left as it was."""
    model, _ = tiny
    gen = torch.Generator().manual_seed(5)
    base = torch.rand(1, 3, 128, 128, generator=gen)
    images = (base + 0.02 * torch.randn(12, 3, 128, 128, generator=gen)).clamp(0, 1)
    images[7] = torch.rand(3, 128, 128, generator=gen)
    images = (images * 255).round().to(torch.uint8)
    held = images[:6].clone()
    held[:] = ((base + 0.02 * torch.randn(6, 3, 128, 128, generator=gen)).clamp(0, 1)
               * 255).round().to(torch.uint8)
    cpu = torch.device("cpu")
    saved = {k: v.clone() for k, v in model.gaussian.state_dict().items()}
    try:
        fit_gaussian(model, images, None, cpu)
        fitted = {k: v.clone() for k, v in model.gaussian.state_dict().items()}
        with torch.no_grad():
            inside = grid_error(model, images.float() / 255)
        oof = out_of_fold_maps(model, images, None, held, cpu, folds=4, seed=0)
        for k, v in model.gaussian.state_dict().items():
            torch.testing.assert_close(v, fitted[k])
        again = out_of_fold_maps(model, images, None, held, cpu, folds=4, seed=0)
    finally:
        model.gaussian.load_state_dict(saved)
    assert oof.shape == inside.shape == (12, 1, 16, 16)
    torch.testing.assert_close(oof, again)
    peak_in, peak_oof = inside.amax(dim=(1, 2, 3)), oof.amax(dim=(1, 2, 3))
    assert peak_oof[7] > 3 * peak_in[7]
    others = torch.tensor([i != 7 for i in range(12)])
    assert peak_oof[7] > 3 * peak_oof[others].max()
    assert out_of_fold_maps(model, images, None, held[:0], cpu) is None  # nothing to fill with
    saved = {k: v.clone() for k, v in model.gaussian.state_dict().items()}
    try:  # gaussian_fit: all - no held-out images to fill with; fold Gaussians on the rest alone
        every = out_of_fold_maps(model, images, None, None, cpu, folds=4, seed=0)
    finally:
        model.gaussian.load_state_dict(saved)
    peak_all = every.amax(dim=(1, 2, 3))
    assert every.shape == (12, 1, 16, 16) and peak_all[7] > 3 * peak_all[others].max()
