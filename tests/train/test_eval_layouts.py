"""haloae-eval on plant data: good/ + bad/ and per-kind layouts, defect images without masks,
all unreadable files reported at once before any model work, and the training-layout hint."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import bin_path, run_cli

from haloae.train import eval_cli, evaluate, report
from haloae.train.data import DataError, check_readable, find_eval_samples, find_train_samples


def _png(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 255, (size, size, 3), np.uint8)
    assert cv2.imwrite(str(path), img)
    return path


def _mask(path: Path, size: int = 24) -> Path:
    m = np.zeros((size, size), np.uint8)
    m[4:12, 4:12] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), m)
    return path


def test_good_bad_layout_without_masks(tmp_path):
    for i in range(3):
        _png(tmp_path / "good" / f"g{i}.png", i)
        _png(tmp_path / "bad" / f"b{i}.jpg", 10 + i)
    samples = find_eval_samples(tmp_path)
    assert [(s.label, s.defect_class) for s in samples] == [(1, "bad")] * 3 + [(0, "good")] * 3
    assert all(s.mask_path is None for s in samples)


def test_per_kind_layout_with_some_masks(tmp_path):
    _png(tmp_path / "good" / "g0.png", 0)
    _png(tmp_path / "dent" / "d0.png", 1)
    _png(tmp_path / "dent" / "d1.png", 2)
    _png(tmp_path / "scratch" / "s0.png", 3)
    _mask(tmp_path / "ground_truth" / "dent" / "d0_mask.png")
    _mask(tmp_path / "masks" / "scratch" / "s0.png")
    by_name = {s.path.name: s for s in find_eval_samples(tmp_path)}
    assert set(by_name) == {"g0.png", "d0.png", "d1.png", "s0.png"}  # mask folders are no class
    assert by_name["d0.png"].mask_path.name == "d0_mask.png"
    assert by_name["d1.png"].mask_path is None
    assert by_name["s0.png"].mask_path == tmp_path / "masks" / "scratch" / "s0.png"
    assert {s.defect_class for s in by_name.values()} == {"good", "dent", "scratch"}


def test_mvtec_layout_with_maskless_defects(tmp_path):
    _png(tmp_path / "test" / "good" / "000.png", 0)
    _png(tmp_path / "test" / "crack" / "000.png", 1)
    samples = find_eval_samples(tmp_path)  # no ground_truth/ at all: image metrics only
    assert [(s.defect_class, s.mask_path) for s in samples] == [("crack", None), ("good", None)]


def test_folder_without_good_names_the_layouts(tmp_path):
    _png(tmp_path / "ok" / "a.png", 0)
    with pytest.raises(DataError, match=r"found ok/.*good/ \+ bad/"):
        find_eval_samples(tmp_path)


def test_unreadable_files_all_listed_one_line_each(tmp_path):
    _png(tmp_path / "good" / "g0.png", 0)
    (tmp_path / "good" / "g1.png").write_bytes(b"")
    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / "b0.jpg").write_bytes(b"\xff\xd8\xff garbage")
    _png(tmp_path / "bad" / "b1.png", 1)
    (tmp_path / "ground_truth" / "bad").mkdir(parents=True)
    (tmp_path / "ground_truth" / "bad" / "b1_mask.png").write_bytes(b"not a png")
    with pytest.raises(DataError) as err:
        check_readable(find_eval_samples(tmp_path), "test images")
    lines = str(err.value).splitlines()
    assert lines[0].startswith("3 of 4 test images cannot be read"), lines
    assert len(lines) == 4
    for name in ("g1.png", "b0.jpg", "b1_mask.png"):
        assert sum(name in ln for ln in lines[1:]) == 1, (name, lines)


def test_cli_reports_unreadable_files_before_loading_the_model(tmp_path, capsys):
    """The checkpoint is junk (loading it would fail): the data problems come first, all of them."""
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint" * 100)
    _png(tmp_path / "d" / "good" / "g0.png", 0)
    (tmp_path / "d" / "good" / "g1.png").write_bytes(b"junk")
    (tmp_path / "d" / "bad").mkdir()
    (tmp_path / "d" / "bad" / "b0.png").write_bytes(b"junk")
    code = eval_cli.main(["--checkpoint", str(tmp_path / "junk.pt"), "--data", str(tmp_path / "d"),
                          "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[0].startswith("haloae-eval: error: 2 of 3 test images cannot be read"), err
    assert len(lines) == 3 and "g1.png" in lines[1] + lines[2] and "b0.png" in lines[1] + lines[2]
    assert "junk.pt" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # nothing written


def test_cli_refuses_a_mask_peak_fraction_outside_0_1_before_any_work(tmp_path, capsys):
    _png(tmp_path / "d" / "good" / "g0.png", 0)
    code = eval_cli.main(["--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tmp_path / "d"),
                          "--out", str(tmp_path / "out"), "--mask-peak-fraction", "1.5"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    (line,) = [ln for ln in err.splitlines() if ln.strip()]
    assert line.startswith("haloae-eval: error: --mask-peak-fraction: mask peak fraction 1.5: use a value in [0, 1)")
    assert not (tmp_path / "out").exists()


def _scored_partial_masks(tmp_path, size=32):
    """6 good, 6 defect; only the first 3 defect images have masks; 3 have none."""
    rng = np.random.default_rng(0)
    n_good, n_bad = 6, 6
    n = n_good + n_bad
    labels = np.array([0] * n_good + [1] * n_bad)
    masks = np.zeros((n, size, size), np.uint8)
    masks[n_good:n_good + 3, 8:16, 8:16] = 1
    maps = (rng.random((n, size, size)) * 0.4 + 0.6 * masks).astype(np.float32)
    maps[n_good + 3:, 16:32, 0:32] += 1.5  # the mask-less images' real (unmasked) defects
    maps[n_good:n_good + 3, 6:18, 6:18] += 0.5  # predicted blob larger than the defect
    scores = maps.reshape(n, -1).max(axis=1)
    paths = []
    for i in range(n):
        paths.append(str(_png(tmp_path / f"img{i}.png", i, 40)))
    has_mask = np.array([True] * (n_good + 3) + [False] * 3)
    classes = ["good"] * n_good + ["dent"] * 3 + ["bad"] * 3
    return evaluate.ScoredSet(scores, maps, labels, masks, classes, paths, 1.0, 2.0, has_mask)


def test_pixel_metrics_only_over_images_with_masks(tmp_path):
    scored = _scored_partial_masks(tmp_path)
    thr = {"method": "holdout", "image": 0.5, "pixel": 0.5}
    values = evaluate.compute_metrics(scored, thr, peak_fraction=0.0)  # masks: the plain threshold
    # had the mask-less images counted with empty masks, their true defect pixels would be
    # "false positives" and pixel AUROC would fall well below 1
    assert values["pixel_auroc"] > 0.99
    full = evaluate.ScoredSet(*[getattr(scored, f) for f in (
        "scores", "maps", "labels", "masks", "classes", "paths", "ms_per_image",
        "ms_per_image_total")])
    assert evaluate.compute_metrics(full, thr)["pixel_auroc"] < 0.97
    assert values["n_defect"] == 6 and values["at_threshold"]["tp"] == 6  # image metrics: all
    cover = values["pixel_metrics_over"]
    assert cover == {"images": 9, "good": 6, "defect_with_mask": 3, "defect_without_mask": 3,
                     "classes_without_masks": {"bad": 3}}
    sizes = values["region_sizes"]
    assert sizes["images"] == 3 and sizes["area_ratio_median"] == pytest.approx(144 / 64)
    # the daemon's default rule cuts each blob at half its peak: tighter, the defect still found
    half = evaluate.compute_metrics(scored, thr)["region_sizes"]
    assert half["peak_fraction"] == 0.5 and 1.0 <= half["area_ratio_median"] < 144 / 64
    assert half["missed"] == sizes["missed"] == 0 and half["iou_median"] > sizes["iou_median"]
    out = tmp_path / "report"
    report.write_report(out, scored, values, thr, "bundle", {"model": "toy"}, tmp_path)
    md = (out / "report.md").read_text()
    assert "the 9 images with known masks (6 good, 3 defective with a mask)" in md
    assert "3 defective images have no mask (bad 3) and count for image metrics only" in md
    assert "predicted area / true area median 2.25" in md and "(every pixel above it;" in md
    for name in ("roc.png", "pr.png", "score_hist.png", "worst_false_negatives.png"):
        assert (out / name).stat().st_size > 5000, name


def test_no_masks_at_all_gives_na_pixel_metrics(tmp_path):
    scored = _scored_partial_masks(tmp_path)
    scored.has_mask[6:] = False
    scored.masks[:] = 0
    thr = evaluate.choose_thresholds(scored, "test-f1")
    assert thr["pixel"] == 0.5  # nothing to tune it on
    values = evaluate.compute_metrics(scored, thr)
    assert values["pixel_auroc"] is None and values["aupro"] is None
    assert values["region_sizes"] is None and values["image_auroc"] is not None
    report.write_report(tmp_path / "r", scored, values, thr, "bundle", {"model": "toy"}, tmp_path)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "No defect image has a mask: pixel metrics are n/a." in md


def test_cli_on_good_bad_layout_with_trained_model(trained_tiny, tmp_path):
    """The synthetic test set re-laid-out as a plant folder; masks kept for one kind only."""
    ckpt, data = trained_tiny
    plant = tmp_path / "plant"
    shutil.copytree(data / "test" / "good", plant / "good")
    kinds = sorted(d.name for d in (data / "test").iterdir() if d.name != "good")
    for k in kinds:
        shutil.copytree(data / "test" / k, plant / ("bad" if k == kinds[0] else k))
    shutil.copytree(data / "ground_truth" / kinds[1], plant / "ground_truth" / kinds[1])
    out = tmp_path / "report"
    proc = run_cli(bin_path("haloae-eval"), "--checkpoint", str(ckpt), "--data", str(plant),
                   "--out", str(out), "--no-progress", "--threads", "2")
    m = json.loads((out / "metrics.json").read_text())
    n_kind = len(list((plant / kinds[1]).iterdir()))
    assert m["pixel_metrics_over"]["defect_with_mask"] == n_kind
    assert m["pixel_metrics_over"]["defect_without_mask"] == m["n_defect"] - n_kind > 0
    assert set(m["per_class"]) == {"bad", *kinds[1:]}
    assert m["image_auroc"] >= 0.85 and m["pixel_auroc"] is not None
    assert "image AUROC" in proc.stdout


def test_training_hint_for_good_subfolder(tmp_path):
    _png(tmp_path / "line" / "good" / "a.png", 0)
    _png(tmp_path / "line" / "bad" / "b.png", 1)
    with pytest.raises(DataError) as err:
        find_train_samples(tmp_path / "line")
    msg = str(err.value)
    assert f"--data {tmp_path / 'line' / 'good'}" in msg and "train/good" in msg
    assert "\n" not in msg
    _png(tmp_path / "flat" / "train" / "a.png", 0)
    with pytest.raises(DataError, match=r"directly in .*train: move them to .*train.good"):
        find_train_samples(tmp_path / "flat")


def test_training_reports_every_unreadable_image_at_once(tmp_path):
    for i in range(3):
        _png(tmp_path / "train" / "good" / f"ok{i}.png", i)
    (tmp_path / "train" / "good" / "cam7_0042.png").write_bytes(b"garbage")
    (tmp_path / "train" / "good" / "cam7_0043.png").write_bytes(b"")
    with pytest.raises(DataError) as err:
        find_train_samples(tmp_path)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("2 of 5 training images cannot be read") and len(lines) == 3
    assert "cam7_0042.png" in lines[1] and "cam7_0043.png" in lines[2]
    assert len(find_train_samples(tmp_path, check=False)[0]) == 5
