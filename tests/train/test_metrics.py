"""Metrics against scikit-learn (AUROC, ROC, F1) and hand-computed / brute-force AUPRO."""

import cv2
import numpy as np
import pytest
from sklearn.metrics import precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from haloae.train import metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 500)
    s = np.round(rng.normal(size=500) + y, 1)  # rounding makes many ties
    assert metrics.auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    few = y * (rng.random(500) < 0.2)  # few positives, then few negatives: both search paths
    assert metrics.auroc(few, s) == pytest.approx(roc_auc_score(few, s), abs=1e-12)
    assert metrics.auroc(1 - few, s) == pytest.approx(roc_auc_score(1 - few, s), abs=1e-12)


def test_auroc_single_class_is_nan():
    assert np.isnan(metrics.auroc(np.zeros(5), np.arange(5.0)))


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = np.round(rng.normal(size=200) + y, 1)
    fpr, tpr, _ = metrics.roc_curve(y, s)
    sk_fpr, sk_tpr, _ = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    thin_fpr, _, _ = metrics.roc_curve(y, s, max_points=10)
    assert thin_fpr.size <= 10 and thin_fpr[0] == 0.0 and thin_fpr[-1] == 1.0


def test_f1_max_matches_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 300)
    s = rng.normal(size=300) + 1.5 * y
    precision, recall, thresholds = precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best, thr = metrics.f1_max(y, s)
    assert best == pytest.approx(f1.max(), abs=1e-12)
    predicted = s >= thr
    tp = np.sum(predicted & (y == 1))
    assert 2 * tp / (predicted.sum() + y.sum()) == pytest.approx(best)


def test_pixel_auroc_subsample_is_deterministic_and_close():
    rng = np.random.default_rng(5)
    masks = rng.random((4, 64, 64)) > 0.9
    maps = rng.random((4, 64, 64)) + masks
    full = metrics.pixel_auroc(masks, maps)
    assert full == pytest.approx(roc_auc_score(masks.reshape(-1), maps.reshape(-1)))
    a = metrics.pixel_auroc(masks, maps, max_pixels=5000)
    assert a == metrics.pixel_auroc(masks, maps, max_pixels=5000)
    assert abs(a - full) < 0.03


def test_aupro_hand_computed_toy_case():
    # Two regions: R1 = {(0,0),(0,1)} scored 0.9 / 0.5, R2 = {(1,3)} scored 0.7 (not touching R1).
    # Five normal pixels scored 0.8, 0.3, 0.2, 0.1, 0.05.
    mask = np.array([[1, 1, 0, 0], [0, 0, 0, 1]], dtype=np.uint8)
    amap = np.array([[0.9, 0.5, 0.8, 0.3], [0.2, 0.1, 0.05, 0.7]], dtype=np.float32)
    # Curve: (0, .25) at t=.9; (.2, .25) at t=.8; (.2, .75) at .7; (.2, 1) at .5; (.4, 1) at .3.
    # Area to FPR .3: .2 * .25 + .1 * 1 = .15; divided by .3 -> .5
    assert metrics.aupro(mask[None], amap[None], max_fpr=0.3) == pytest.approx(0.5)
    # With both defect pixels scored highest, PRO is 1 from FPR 0: AUPRO = 1
    perfect = np.where(mask == 1, 2.0, amap).astype(np.float32)
    assert metrics.aupro(mask[None], perfect[None]) == pytest.approx(1.0)


def test_aupro_uses_8_connectivity():
    # (0,0), (0,1), (1,2) is one region with 8-connectivity (two with 4-connectivity).
    # Scoring only (1,2) high gives PRO 1/3 (4-connectivity would give (0 + 1) / 2).
    mask = np.zeros((1, 3, 3), np.uint8)
    mask[0, 0, 0] = mask[0, 0, 1] = mask[0, 1, 2] = 1
    amap = np.zeros((1, 3, 3), np.float32)
    amap[0, 1, 2] = 1.0
    # Curve (0, 1/3) then (1, 1) when all normals (score 0) enter. At FPR .3: 1/3 + .3 * 2/3 = .5333
    # area / .3 = (1/3 + .5333) / 2 = 13/30
    assert metrics.aupro(mask, amap) == pytest.approx(13 / 30)


def _aupro_brute_force(masks, maps, max_fpr=0.3):
    regions = []
    for m, a in zip(masks, maps):
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        regions += [a[lab == i] for i in range(1, n)]
    ok = maps[masks == 0]
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        xs.append(float(np.mean(ok >= t)))
        ys.append(float(np.mean([np.mean(r >= t) for r in regions])))
    xs, ys = np.array(xs), np.array(ys)
    j = int(np.argmax(xs > max_fpr))  # first point past max_fpr
    y_at = ys[j - 1] + (max_fpr - xs[j - 1]) / (xs[j] - xs[j - 1]) * (ys[j] - ys[j - 1])
    x_all = np.append(xs[:j], max_fpr)
    y_all = np.append(ys[:j], y_at)
    return float(np.trapezoid(y_all, x_all) / max_fpr)


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 24, 24), np.uint8)
    for i in range(3):
        for _ in range(2):
            y, x = rng.integers(2, 20, 2)
            cv2.circle(masks[i], (int(x), int(y)), int(rng.integers(1, 4)), 1, -1)
    maps = np.round(rng.random((3, 24, 24)) + 0.6 * masks, 2).astype(np.float32)
    assert metrics.aupro(masks, maps) == pytest.approx(_aupro_brute_force(masks, maps), abs=1e-9)


def test_per_class_auroc_is_class_against_all_good():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.15, 0.25])
    classes = ["good"] * 3 + ["crack", "crack", "hole", "hole"]
    out = metrics.per_class_auroc(labels, scores, classes)
    assert out["crack"] == pytest.approx(1.0)
    assert out["hole"] == pytest.approx(roc_auc_score([0, 0, 0, 1, 1], [0.1, 0.2, 0.3, 0.15, 0.25]))
