"""haloae-collect: frames of a real video file (written with OpenCV) through the daemon's capture,
ROI crop and preprocessing into OUT/train/good; dark, blurred and repeated frames skipped."""

from __future__ import annotations

import json

import cv2
import numpy as np
import yaml
from conftest import bin_path, run_cli

from haloae.preprocess import to_model_input as edge_input
from haloae.train.data import find_train_samples, read_image, to_model_input

ROI = [8, 8, 64, 48]  # x, y, w, h in the 96x80 frame
DARK, DUP, BLUR = {5, 6, 7}, {10, 11, 12}, {15}


def _frames(n: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for i in range(n):
        tex = rng.integers(40, 220, (20, 24, 3), np.uint8)
        img = cv2.resize(tex, (96, 80), interpolation=cv2.INTER_NEAREST)  # a textured "part", 4 px cells
        if i in DARK:
            img = (img // 30).astype(np.uint8)
        if i in DUP:
            img = out[9].copy()
        if i in BLUR:
            img = cv2.GaussianBlur(img, (0, 0), 4)
        out.append(img)
    return out


def _setup(tmp_path):
    video = tmp_path / "line.avi"
    vw = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (96, 80))
    for f in _frames():
        vw.write(f)
    vw.release()
    cfg = {"node": "c1", "state_dir": str(tmp_path / "state"),
           "cameras": [{"id": "cam0", "source": str(video), "roi": ROI, "loop": True},
                       {"id": "cam1", "source": "synthetic"}],
           "model": {"bundle": str(tmp_path / "no-bundle-yet")}}
    config = tmp_path / "edge.yaml"
    config.write_text(yaml.safe_dump(cfg))
    return video, config


def _decoded_crops(video) -> list[np.ndarray]:
    """The video decoded independently, cropped and converted like the daemon does it."""
    cap, crops = cv2.VideoCapture(str(video)), []
    x, y, w, h = ROI
    while True:
        ok, bgr = cap.read()
        if not ok:
            return crops
        crops.append(cv2.cvtColor(bgr[y:y + h, x:x + w], cv2.COLOR_BGR2RGB))


def test_collect_keeps_the_daemons_view_and_skips_dark_blurred_repeated(tmp_path):
    video, config = _setup(tmp_path)
    out = tmp_path / "data"
    proc = run_cli(bin_path("haloae-collect"), "--config", str(config), "--camera", "cam0", "--out", str(out),
                   "--count", "100")
    files = sorted((out / "train" / "good").glob("*.png"))
    kept_ids = [i for i in range(40) if i not in DARK | DUP | BLUR]
    assert len(files) == len(kept_ids) == 33, proc.stdout
    crops = _decoded_crops(video)
    for path, i in zip(files, kept_ids):
        saved = read_image(path)
        assert saved.shape == (48, 64, 3)
        np.testing.assert_array_equal(saved, crops[i])  # lossless, the daemon's crop
        # what training feeds the model == what the daemon feeds it for that frame
        np.testing.assert_array_equal(to_model_input(saved, 32), edge_input(crops[i], 32))
    assert "skipped: 3 dark, 1 blurred, 3 near-duplicate" in proc.stdout, proc.stdout
    assert "kept 33 of 40 frame(s)" in proc.stdout and "(64x48 after the roi)" in proc.stdout
    assert "the source ended" in proc.stdout and "haloae-train" in proc.stdout
    assert "collecting [" in proc.stderr and "33/100 kept" in proc.stderr
    rec = json.loads((out / "collect.json").read_text())["runs"][-1]
    assert rec["roi"] == ROI and rec["kept"] == 33 and rec["skipped"]["dark"] == 3
    samples, kind = find_train_samples(out)
    assert kind == "mvtec" and len(samples) == 33
    # a second run appends, never overwrites; --every 1 s of video (10 fps) keeps frames 0, 10, 20
    proc = run_cli(bin_path("haloae-collect"), "--config", str(config), "--camera", "cam0", "--out", str(out),
                   "--count", "3", "--every", "1", "--quiet")
    new = sorted(set((out / "train" / "good").glob("*.png")) - set(files))
    assert [p.name for p in new] == ["cam0_000034.png", "cam0_000035.png", "cam0_000036.png"]
    for path, i in zip(new, [0, 10, 20]):
        np.testing.assert_array_equal(read_image(path), crops[i])
    assert "(after 33 already there)" in proc.stdout and proc.stderr == ""


def test_collect_errors_are_one_line_exit_2(tmp_path):
    _, config = _setup(tmp_path)
    proc = run_cli(bin_path("haloae-collect"), "--config", str(config), "--camera", "cam9", "--out",
                   str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "cam9" in lines[0] and "cameras: cam0, cam1" in lines[0]
    (tmp_path / "line.avi").unlink()
    proc = run_cli(bin_path("haloae-collect"), "--config", str(config), "--camera", "cam0", "--out",
                   str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "no video file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    help_text = run_cli(bin_path("haloae-collect"), "--help").stdout
    assert "examples:" in help_text and "--every 2" in help_text
