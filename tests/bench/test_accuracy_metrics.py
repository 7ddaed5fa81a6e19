"""bench/accuracy.py's per-method metrics: the per-class AUPRO and the background figure that
explain a pooled AUPRO (the normal pixels of defective images count as false positives)."""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from accuracy import _metrics  # noqa: E402


def _scored(n_good=8, n_each=4, size=32):
    rng = np.random.default_rng(0)
    classes = ["good"] * n_good + ["spot"] * n_each + ["band"] * n_each
    masks = np.zeros((len(classes), size, size), np.uint8)
    for i, c in enumerate(classes):
        if c == "spot":
            y, x = rng.integers(4, size - 8, 2)
            masks[i, y:y + 4, x:x + 4] = 1
        elif c == "band":
            masks[i, 8:24, :] = 1
    labels = np.array([c != "good" for c in classes], int)
    return SimpleNamespace(labels=labels, classes=classes, masks=masks), rng


def test_a_map_that_marks_only_the_defects_has_no_raised_background():
    scored, rng = _scored()
    maps = rng.random(scored.masks.shape) * 0.1 + scored.masks  # defects stand out, no background
    m = _metrics(scored, maps.reshape(len(maps), -1).max(1), maps, 0.05)
    assert set(m["aupro_per_class"]) == {"spot", "band"}
    assert min(m["aupro_per_class"].values()) > 0.95 and m["aupro"] > 0.95
    assert m["defective_normal_pixels_above_good_q95"] < 0.1


def test_a_raised_background_on_defective_images_costs_pooled_aupro():
    scored, rng = _scored()
    base = rng.random(scored.masks.shape) * 0.1
    maps = base + scored.masks
    band = np.array(scored.classes) == "band"
    maps[band] += 0.95 * (scored.masks[band] == 0)  # band images glow everywhere, nearly as high
    m = _metrics(scored, maps.reshape(len(maps), -1).max(1), maps, 0.05)
    assert m["defective_normal_pixels_above_good_q95"] > 0.3
    # per class the spots still stand out from the good images; pooled, the glowing normal
    # area of the band images is a false positive at every threshold that finds the spots
    assert m["aupro_per_class"]["spot"] > 0.95
    assert m["aupro"] < m["aupro_per_class"]["spot"] - 0.05
