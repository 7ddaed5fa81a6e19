"""Anomaly-detection metrics: AUROC, AUPRO@0.3, F1-max, per-class AUROC (numpy + OpenCV only).

Definitions follow the MVTec AD benchmark (Bergmann et al., IJCV 2021):

- AUROC is the Mann-Whitney statistic with average ranks for ties (identical to
  scikit-learn's ``roc_auc_score``, which the tests compare against).
- AUPRO: for every threshold, FPR is the fraction of normal pixels (ground truth 0, over all
  images) above it and PRO the mean, over every connected component of the ground truth
  (8-connectivity, each image separately), of the fraction of that component above it. The PRO
  curve is integrated over FPR in [0, max_fpr] and divided by max_fpr.
- F1-max: the best F1 over all thresholds of the image scores.

Ground-truth masks are expected already resized (nearest) to the map size and binarised
(``haloae.train.data.read_mask`` thresholds at 127). Defect images with an empty mask still count
for the image metrics; their pixels count as normal pixels for the pixel metrics.
"""

from __future__ import annotations

import logging

import cv2
import numpy as np

log = logging.getLogger(__name__)

MAX_PIXELS = 40_000_000  # pixel AUROC above this many pixels runs on a deterministic subsample


def _check_binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels).reshape(-1).astype(bool)
    s = np.asarray(scores).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(f"labels ({y.size}) and scores ({s.size}) differ in length")
    return y, s


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (NaN when only one class is present)."""
    y, s = _check_binary(labels, scores)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # P(score_pos > score_neg) + P(equal) / 2 by binary search of the sorted smaller group in
    # the sorted larger one (sorted queries keep the search cache-friendly on 10^7 pixels)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    if n_pos <= n_neg:
        left = np.searchsorted(neg, pos, side="left")  # negatives below each positive
        right = np.searchsorted(neg, pos, side="right")
        above = float(np.sum(left, dtype=np.int64))
    else:
        left = np.searchsorted(pos, neg, side="left")
        right = np.searchsorted(pos, neg, side="right")  # positives above: n_pos - right
        above = float(np.sum(n_pos - right, dtype=np.int64))
    ties = float(np.sum(right - left, dtype=np.int64))
    return (above + 0.5 * ties) / (n_pos * n_neg)


def roc_curve(
    labels: np.ndarray, scores: np.ndarray, max_points: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)`` for decreasing thresholds, starting at (0, 0).

    ``max_points`` thins the curve (for plots of millions of pixels); the end points are kept.
    """
    y, s = _check_binary(labels, scores)
    order = np.argsort(-s, kind="mergesort")
    s_desc, y_desc = s[order], y[order]
    last_of_group = np.append(np.flatnonzero(np.diff(s_desc)), s.size - 1)
    tps = np.cumsum(y_desc)[last_of_group].astype(np.float64)
    fps = (last_of_group + 1) - tps
    tpr = np.concatenate([[0.0], tps / max(tps[-1], 1)])
    fpr = np.concatenate([[0.0], fps / max(fps[-1], 1)])
    thr = np.concatenate([[np.inf], s_desc[last_of_group]])
    if max_points is not None and fpr.size > max_points:
        keep = np.unique(np.linspace(0, fpr.size - 1, max_points).round().astype(np.int64))
        fpr, tpr, thr = fpr[keep], tpr[keep], thr[keep]
    return fpr, tpr, thr


def f1_max(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """Best F1 over all thresholds ``score >= t`` and that threshold ``t``."""
    y, s = _check_binary(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan"), float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_desc = s[order]
    last_of_group = np.append(np.flatnonzero(np.diff(s_desc)), s.size - 1)
    tp = np.cumsum(y[order])[last_of_group].astype(np.float64)
    predicted = last_of_group + 1.0
    f1 = 2.0 * tp / (predicted + n_pos)  # 2PR/(P+R) = 2TP / (predicted positives + positives)
    best = int(np.argmax(f1))
    return float(f1[best]), float(s_desc[last_of_group[best]])


def pixel_auroc(masks: np.ndarray, maps: np.ndarray, max_pixels: int = MAX_PIXELS) -> float:
    """AUROC over all pixels of all images (a fixed-seed subsample above ``max_pixels``)."""
    y = np.asarray(masks).reshape(-1)
    s = np.asarray(maps).reshape(-1)
    if y.size > max_pixels:
        idx = np.random.default_rng(0).choice(y.size, size=max_pixels, replace=False)
        log.info("pixel AUROC on a fixed-seed subsample of %d of %d pixels", max_pixels, y.size)
        y, s = y[idx], s[idx]
    return auroc(y, s)


def _region_weights(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Per-pixel weight 1/|region| inside ground-truth regions (0 outside), and region count."""
    weights = np.zeros(masks.shape, dtype=np.float64)
    n_regions = 0
    for i, mask in enumerate(masks):
        n_labels, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        if n_labels <= 1:
            continue
        sizes = np.bincount(labels.reshape(-1), minlength=n_labels).astype(np.float64)
        per_label = np.zeros(n_labels)
        per_label[1:] = 1.0 / sizes[1:]
        weights[i] = per_label[labels]
        n_regions += n_labels - 1
    return weights, n_regions


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the curve (x ascending) from x[0] to x_max, interpolating at x_max."""
    inside = x <= x_max
    xs, ys = x[inside], y[inside]
    if xs[-1] < x_max and inside.sum() < x.size:
        j = int(np.argmax(~inside))  # first point past x_max
        t = (x_max - x[j - 1]) / (x[j] - x[j - 1])
        xs = np.append(xs, x_max)
        ys = np.append(ys, y[j - 1] + t * (y[j] - y[j - 1]))
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def aupro(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``max_fpr``, divided by ``max_fpr``.

    ``masks`` and ``maps``: [N, H, W]. NaN when no image has a defect region.
    """
    gt = np.asarray(masks).astype(bool)
    scores = np.asarray(maps, dtype=np.float32)
    if gt.shape != scores.shape or gt.ndim != 3:
        raise ValueError(f"masks {gt.shape} and maps {scores.shape} must both be [N, H, W]")
    weights, n_regions = _region_weights(gt)
    ok = ~gt
    n_ok = int(ok.sum())
    if n_regions == 0 or n_ok == 0:
        return float("nan")
    # Only pixels scoring at least the first normal-pixel score past max_fpr shape the curve
    # on [0, max_fpr] (plus the point past it): drop the rest before sorting.
    ok_scores = scores[ok]
    k = min(n_ok - 1, int(np.ceil(max_fpr * n_ok)))
    cutoff = np.partition(ok_scores, n_ok - 1 - k)[n_ok - 1 - k]
    keep = scores >= cutoff
    s, w, o = scores[keep], weights[keep], ok[keep]
    order = np.argsort(-s, kind="mergesort")
    s_desc = s[order]
    fpr = np.cumsum(o[order]) / n_ok
    pro = np.cumsum(w[order]) / n_regions
    last_of_group = np.append(np.flatnonzero(np.diff(s_desc)), s_desc.size - 1)
    fpr = np.concatenate([[0.0], np.clip(fpr[last_of_group], 0.0, 1.0)])
    pro = np.concatenate([[0.0], np.clip(pro[last_of_group], 0.0, 1.0)])
    return _area_up_to(fpr, pro, max_fpr) / max_fpr


def per_class_auroc(labels: np.ndarray, scores: np.ndarray, classes: list[str]) -> dict[str, float]:
    """Image AUROC of each defect class against all good images (label 0)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores)
    cls = np.asarray(classes)
    out: dict[str, float] = {}
    for name in sorted(set(cls[y].tolist())):
        sel = (~y) | (cls == name)
        out[name] = auroc(y[sel], s[sel])
    return out
