"""Data loading: image reading, MVTec / folder layouts, errors that name the files."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from haloae.train.data import (DataError, ImageDataset, ImageReadError, find_folder_samples,
                               find_mvtec_samples, find_train_samples, load_images, read_image,
                               read_mask, split_holdout, to_model_input)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from conftest import CHILD_ENV, bin_path, run_cli  # noqa: E402


def _png(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def _mvtec(root: Path, n_good: int = 3, with_masks: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n_good):
        _png(root / "train/good" / f"{i:03d}.png", rng.integers(0, 255, (40, 50, 3), np.uint8))
    _png(root / "test/good/000.png", rng.integers(0, 255, (40, 50), np.uint8))
    for i in range(2):
        _png(root / "test/crack" / f"{i:03d}.png", rng.integers(0, 255, (40, 50), np.uint8))
        if with_masks:
            m = np.zeros((40, 50), np.uint8)
            m[10:20, 5:15] = 255
            _png(root / "ground_truth/crack" / f"{i:03d}_mask.png", m)
    return root


def test_read_image_converts_grey_16bit_and_alpha_to_rgb_uint8(tmp_path):
    grey = np.arange(200, dtype=np.uint8).reshape(10, 20)
    out = read_image(_png(tmp_path / "g.png", grey))
    assert out.shape == (10, 20, 3) and out.dtype == np.uint8
    assert (out[..., 0] == grey).all() and (out[..., 2] == grey).all()
    deep = (grey.astype(np.uint16) * 257)
    assert (read_image(_png(tmp_path / "d.png", deep))[..., 1] == grey).all()
    bgra = np.zeros((4, 4, 4), np.uint8)
    bgra[..., 0] = 200  # blue in OpenCV order
    rgb = read_image(_png(tmp_path / "a.png", bgra))
    assert rgb.shape == (4, 4, 3) and (rgb[..., 2] == 200).all() and (rgb[..., 0] == 0).all()


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00trunc"])
def test_corrupt_image_error_names_the_file(tmp_path, content):
    bad = tmp_path / "broken_part.png"
    bad.write_bytes(content)
    with pytest.raises(ImageReadError, match="broken_part.png"):
        read_image(bad)
    with pytest.raises(ImageReadError, match="broken_part.png"):
        ImageDataset(find_folder_samples(tmp_path), 32)[0]


def test_missing_image_error_names_the_file(tmp_path):
    with pytest.raises(ImageReadError, match="nowhere.png"):
        read_image(tmp_path / "nowhere.png")


def test_mask_is_binary_nearest_resized(tmp_path):
    m = np.zeros((40, 40), np.uint8)
    m[:20] = 255
    m[20:22] = 100  # anti-aliased edge below 127 -> 0
    out = read_mask(_png(tmp_path / "m.png", m), 20)
    assert out.dtype == np.float32 and set(np.unique(out)) == {0.0, 1.0}
    assert out[:10].all() and not out[11:].any()


def test_to_model_input_is_area_resize_scaled_chw():
    rgb = np.random.default_rng(1).integers(0, 256, (64, 48, 3), np.uint8)
    x = to_model_input(rgb, 32)
    ref = cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    np.testing.assert_allclose(x, ref.transpose(2, 0, 1), atol=1e-7)
    # the training loader applies the same preprocessing
    assert x.min() >= 0 and x.max() <= 1


def test_mvtec_layout_samples_and_dataset_items(tmp_path):
    root = _mvtec(tmp_path / "d")
    train = find_mvtec_samples(root, "train")
    assert [s.label for s in train] == [0, 0, 0]
    test = find_mvtec_samples(root, "test")
    crack = [s for s in test if s.defect_class == "crack"]
    assert len(test) == 3 and len(crack) == 2 and all(s.mask_path for s in crack)
    ds = ImageDataset(test, 32)
    item = ds[[s.defect_class for s in test].index("crack")]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["label"] == 1 and item["mask"].sum() > 0
    good = ds[[s.defect_class for s in test].index("good")]
    assert good["label"] == 0 and good["mask"].sum() == 0
    imgs = load_images(train, 32)
    assert imgs.dtype == torch.uint8 and imgs.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(imgs[0].numpy() / 255.0, ImageDataset(train, 32)[0]["image"].numpy(),
                               atol=1e-6)
    assert torch.equal(load_images(train, 32, workers=2), imgs)  # threads keep the order


def test_missing_mask_names_the_defect_image(tmp_path):
    root = _mvtec(tmp_path / "d", with_masks=False)
    with pytest.raises(DataError, match=r"crack.000\.png"):
        find_mvtec_samples(root, "test")


def test_empty_folders_are_named(tmp_path):
    (tmp_path / "d/train/good").mkdir(parents=True)
    with pytest.raises(DataError, match=r"train.good"):
        find_mvtec_samples(tmp_path / "d", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        find_folder_samples(tmp_path / "empty")
    with pytest.raises(DataError, match="empty"):
        find_train_samples(tmp_path / "empty")


def test_folder_samples_with_defect_folders_and_masks(tmp_path):
    rng = np.random.default_rng(2)
    for i in range(3):
        _png(tmp_path / "good" / f"g{i}.jpg", rng.integers(0, 255, (20, 20, 3), np.uint8))
    _png(tmp_path / "dent" / "d0.png", rng.integers(0, 255, (20, 20, 3), np.uint8))
    samples = find_folder_samples(tmp_path / "good", [tmp_path / "dent"])
    assert [(s.label, s.defect_class, s.mask_path) for s in samples][-1] == (1, "dent", None)
    with pytest.raises(DataError, match="d0.png"):  # masks given but this one is missing
        find_folder_samples(tmp_path / "good", [tmp_path / "dent"], tmp_path / "masks")
    _png(tmp_path / "masks/dent/d0_mask.png", np.full((20, 20), 255, np.uint8))
    samples = find_folder_samples(tmp_path / "good", [tmp_path / "dent"], tmp_path / "masks")
    assert samples[-1].mask_path == tmp_path / "masks/dent/d0_mask.png"
    assert find_train_samples(tmp_path / "good")[1] == "folder"


def test_split_holdout_is_deterministic_and_disjoint(tmp_path):
    root = _mvtec(tmp_path / "d", n_good=20)
    samples = find_mvtec_samples(root, "train")
    tr, ho = split_holdout(samples, 0.1, seed=3)
    assert len(ho) == 2 and len(tr) == 18
    assert not {s.path for s in tr} & {s.path for s in ho}
    assert split_holdout(list(reversed(samples)), 0.1, seed=3) == (tr, ho)
    assert split_holdout(samples, 0.1, seed=4)[1] != ho
    assert split_holdout(samples[:1], 0.5, seed=0) == (samples[:1], [])


def test_haloae_train_refuses_bad_data_with_one_line(tmp_path):
    """Corrupt image and empty folder: exit 2, the file named, no traceback."""
    good = tmp_path / "line"
    rng = np.random.default_rng(0)
    for i in range(3):
        _png(good / f"ok{i}.png", rng.integers(0, 255, (64, 64, 3), np.uint8))
    (good / "cam7_0042.png").write_bytes(b"garbage")
    cfg = str(REPO / "configs/train/tiny.yaml")
    proc = run_cli(bin_path("haloae-train"), "--config", cfg, "--data", str(good),
                   "--out", str(tmp_path / "run"), "--quiet", check=False, env=CHILD_ENV)
    assert proc.returncode == 2, proc.stderr
    assert "cam7_0042.png" in proc.stderr and "Traceback" not in proc.stderr
    (tmp_path / "nothing").mkdir()
    proc = run_cli(bin_path("haloae-train"), "--config", cfg, "--data", str(tmp_path / "nothing"),
                   "--out", str(tmp_path / "run2"), "--quiet", check=False)
    assert proc.returncode == 2 and "nothing" in proc.stderr and "Traceback" not in proc.stderr
