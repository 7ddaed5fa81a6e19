"""haloae-eval: report contents, the trained tiny model's AUROC, bundle == checkpoint, errors."""

import csv
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import bin_path, run_cli

from haloae.train import eval_cli, evaluate, metrics, report


def _scored(tmp_path, n_good=6, n_bad=6, size=32):
    rng = np.random.default_rng(0)
    n = n_good + n_bad
    labels = np.array([0] * n_good + [1] * n_bad)
    masks = np.zeros((n, size, size), np.uint8)
    masks[n_good:, 8:16, 8:16] = 1
    maps = (rng.random((n, size, size)) * 0.4 + 0.6 * masks).astype(np.float32)
    scores = maps.reshape(n, -1).max(axis=1)
    paths = []
    for i in range(n):
        p = tmp_path / f"img{i}.png"
        cv2.imwrite(str(p), (rng.random((40, 40, 3)) * 255).astype(np.uint8))
        paths.append(str(p))
    classes = ["good"] * n_good + ["crack", "hole"] * (n_bad // 2)
    return evaluate.ScoredSet(scores, maps, labels, masks, classes, paths, 1.5, 2.0)


def test_report_contents(tmp_path):
    scored = _scored(tmp_path)
    thr = evaluate.choose_thresholds(scored, "test-f1")
    values = evaluate.compute_metrics(scored, thr)
    info = {"model": "toy", "raw_image": 0.02, "raw_pixel": 0.01}
    out = tmp_path / "report"
    result = report.write_report(out, scored, values, thr, "checkpoint", info, tmp_path)
    saved = json.loads((out / "metrics.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert saved == result
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "per_class", "n_images",
                "threshold", "ms_per_image", "source"):
        assert key in saved
    assert saved["image_auroc"] == pytest.approx(metrics.auroc(scored.labels, scored.scores))
    assert saved["aupro"] == pytest.approx(metrics.aupro(scored.masks, scored.maps))
    assert set(saved["per_class"]) == {"crack", "hole"} and saved["n_images"] == 12
    assert saved["threshold"]["method"] == "test-f1" and saved["threshold"]["raw_image"] == 0.02
    assert saved["image_f1_max"] == pytest.approx(1.0)
    assert saved["at_threshold"]["fn"] == 0 and saved["at_threshold"]["fp"] == 0
    for name in ("roc.png", "score_hist.png", "worst_false_negatives.png",
                 "worst_false_positives.png"):
        assert (out / name).stat().st_size > 5000, name
    md = (out / "report.md").read_text()
    assert "image AUROC" in md and "0.5 * score_raw / raw_image" in md and "| crack |" in md
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 12 and float(rows[-1]["score"]) == pytest.approx(scored.scores[-1])


def test_holdout_thresholds_are_the_normalised_half(tmp_path):
    thr = evaluate.choose_thresholds(_scored(tmp_path), "holdout")
    assert thr == {"method": "holdout", "image": 0.5, "pixel": 0.5}


def _eval(*args):
    return run_cli(bin_path("haloae-eval"), *map(str, args), "--no-progress", "--threads", "2")


def _scores(folder):
    with open(folder / "scores.csv") as fh:
        return {r["path"]: float(r["score"]) for r in csv.DictReader(fh)}


def test_trained_tiny_checkpoint_and_bundle(trained_tiny, tiny_bundle, tmp_path):
    ckpt, data = trained_tiny
    _eval("--checkpoint", ckpt, "--data", data, "--out", tmp_path / "ck")
    _eval("--bundle", tiny_bundle, "--data", data, "--out", tmp_path / "bu")
    ck = json.loads((tmp_path / "ck" / "metrics.json").read_text())
    bu = json.loads((tmp_path / "bu" / "metrics.json").read_text())
    assert ck["source"] == "checkpoint" and bu["source"] == "bundle"
    assert ck["image_auroc"] >= 0.9, ck
    assert abs(bu["image_auroc"] - ck["image_auroc"]) <= 0.01
    assert abs(bu["pixel_auroc"] - ck["pixel_auroc"]) <= 0.01
    a, b = _scores(tmp_path / "ck"), _scores(tmp_path / "bu")
    assert a.keys() == b.keys()
    assert max(abs(a[k] - b[k]) for k in a) <= 1e-4  # the same normalised scores, per image


def _eval_raw(*args):
    return subprocess.run([sys.executable, "-m", "haloae.train.eval_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def untrained_ckpt(tmp_path_factory, fit_untrained):
    from haloae.train.checkpoint import save_checkpoint
    from haloae.train.config import load_model_config
    from haloae.train.torch_model import create_model

    model = create_model(load_model_config("tiny"), pretrained=False)
    calibration = fit_untrained(model)  # a checkpoint that loads: the data is what is wrong
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    return save_checkpoint(path, model, calibration, {})


@pytest.mark.parametrize("case", ["missing-checkpoint", "junk-checkpoint", "empty-data",
                                  "bad-bundle"])
def test_errors_are_one_line_exit_2(tmp_path, untrained_ckpt, case, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    valid = tmp_path / "valid"  # readable data: the junk checkpoint is found after the data check
    for kind in ("good", "bad"):
        (valid / kind).mkdir(parents=True)
        cv2.imwrite(str(valid / kind / "0.png"), np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "junk.pt").write_bytes(untrained_ckpt.read_bytes()[:3000])  # interrupted copy
    args, expected = {
        "missing-checkpoint": (["--checkpoint", tmp_path / "nope.pt", "--data", empty],
                               "not found"),
        "junk-checkpoint": (["--checkpoint", tmp_path / "junk.pt", "--data", valid],
                            "not a readable HaloAE checkpoint"),
        "empty-data": (["--checkpoint", untrained_ckpt, "--data", empty], "no class folders"),
        "bad-bundle": (["--bundle", empty, "--data", empty], "manifest.json is missing"),
    }[case]
    code = eval_cli.main([*map(str, args), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and expected in lines[0], err


def test_cli_error_has_no_traceback(tmp_path):
    proc = _eval_raw("--checkpoint", tmp_path / "nope.pt", "--data", tmp_path, "--out",
                     tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith("haloae-eval: error:") and "nope.pt" in proc.stderr
