"""The ``haloae-eval`` report: metrics.json, report.md and PNG figures (matplotlib, Agg).

Figures: ``roc.png`` (image and pixel ROC), ``score_hist.png`` (good vs defective image
scores with the threshold line), ``worst_false_negatives.png`` / ``worst_false_positives.png``
(image | heat map | predicted mask | ground truth). ``scores.csv`` lists every image's score.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from . import metrics
from .data import read_image
from .evaluate import ScoredSet

log = logging.getLogger(__name__)

FORMULA = ("score = 0.5 * score_raw / raw_image, anomaly_map = 0.5 * map_raw / raw_pixel "
           "(raw = the anomaly map before the threshold normalisation; the calibrated thresholds map to 0.5)")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _clean(value: Any) -> Any:
    """NaN/inf -> None (strict JSON), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def plot_roc(scored: ScoredSet, path: Path, max_pixels: int = 4_000_000) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    y, s = scored.masks.reshape(-1), scored.maps.reshape(-1)
    if y.size > max_pixels:
        idx = np.random.default_rng(0).choice(y.size, size=max_pixels, replace=False)
        y, s = y[idx], s[idx]
    for ax, (labels, scores, title) in zip(axes, [(scored.labels, scored.scores, "image"),
                                                  (y, s, "pixel")]):
        if labels.min() == labels.max():
            ax.set_title(f"{title} ROC: one class only")
            continue
        fpr, tpr, _ = metrics.roc_curve(labels, scores, max_points=2000)
        ax.plot(fpr, tpr, lw=2, label=f"AUROC {metrics.auroc(labels, scores):.3f}")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title=f"{title} ROC", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histogram(scored: ScoredSet, threshold: float, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lo = min(float(scored.scores.min()), threshold)
    hi = max(float(np.quantile(scored.scores, 0.995)), threshold)
    pad = 0.05 * max(hi - lo, 1e-6)
    bins = np.linspace(lo - pad, hi + pad, 50)
    clipped = np.clip(scored.scores, bins[0], bins[-1])
    good, bad = clipped[scored.labels == 0], clipped[scored.labels == 1]
    ax.hist(good, bins=bins, alpha=0.6, label=f"good ({good.size})", color="tab:green")
    ax.hist(bad, bins=bins, alpha=0.6, label=f"defective ({bad.size})", color="tab:red")
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="image score (normalised; last bin holds everything above)", ylabel="images",
           title="image scores: good vs defective")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _worst(scored: ScoredSet, threshold: float, k: int) -> dict[str, tuple[list[int], str]]:
    defects = np.flatnonzero(scored.labels == 1)
    goods = np.flatnonzero(scored.labels == 0)
    fn = defects[np.argsort(scored.scores[defects], kind="stable")][:k]
    fp = goods[np.argsort(-scored.scores[goods], kind="stable")][:k]
    n_fn = int(np.sum(scored.scores[defects] < threshold))
    n_fp = int(np.sum(scored.scores[goods] >= threshold))
    return {
        "worst_false_negatives": (fn.tolist(), f"lowest-scoring defective images ({n_fn} false "
                                               f"negatives at threshold {threshold:.3g})"),
        "worst_false_positives": (fp.tolist(), f"highest-scoring good images ({n_fp} false "
                                               f"positives at threshold {threshold:.3g})"),
    }


def plot_overlays(scored: ScoredSet, rows: list[int], title: str, pixel_thr: float,
                  path: Path) -> None:
    plt = _plt()
    n = max(len(rows), 1)
    fig, axes = plt.subplots(n, 4, figsize=(12, 3.1 * n), squeeze=False)
    size = scored.maps.shape[-1]
    for r, i in enumerate(rows):
        rgb = cv2.resize(read_image(scored.paths[i]), (size, size), interpolation=cv2.INTER_AREA)
        heat = np.clip(scored.maps[i] / (2.0 * pixel_thr), 0, 1)  # threshold = middle colour
        panels = [(rgb, f"{Path(scored.paths[i]).name} ({scored.classes[i]})"),
                  (heat, f"heat map, score {scored.scores[i]:.3g}"),
                  ((scored.maps[i] >= pixel_thr).astype(np.float32),
                   f"predicted mask (map >= {pixel_thr:.3g})"),
                  (scored.masks[i].astype(np.float32), "ground truth")]
        for c, (img, label) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap=None if img.ndim == 3 else ("jet" if c == 1 else "gray"),
                      vmin=0, vmax=1 if img.ndim == 2 else None)
            ax.set_title(label, fontsize=8)
            ax.axis("off")
    if not rows:
        axes[0, 0].set_title("no images")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _markdown(m: dict[str, Any]) -> str:
    f = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    g = lambda v: "n/a" if v is None else f"{v:.4g}"  # noqa: E731
    thr, at = m["threshold"], m["at_threshold"]
    lines = [
        f"# HaloAE evaluation: {m['model'].get('model')} ({m['source']})", "",
        f"Data: `{m['data']}` ({m['n_images']} test images: {m['n_good']} good, "
        f"{m['n_defect']} defective). Created {m['created']}.", "",
        "| metric | value |", "|---|---|",
        f"| image AUROC | {f(m['image_auroc'])} |", f"| pixel AUROC | {f(m['pixel_auroc'])} |",
        f"| AUPRO@0.3 | {f(m['aupro'])} |", f"| image F1-max | {f(m['image_f1_max'])} |",
        f"| ms / image (model) | {m['ms_per_image']:.1f} |",
        f"| ms / image (with reading + preprocessing) | {m['ms_per_image_total']:.1f} |", "",
        "Image AUROC per defect class (that class vs all good images):", "",
        "| class | AUROC |", "|---|---|",
        *[f"| {k} | {f(v)} |" for k, v in m["per_class"].items()], "",
        f"## Threshold ({thr['method']})", "",
        f"Image threshold {thr['image']:.4g}, pixel threshold {thr['pixel']:.4g} in normalised "
        f"units: {FORMULA}. Raw thresholds: image {g(thr.get('raw_image'))}, pixel "
        f"{g(thr.get('raw_pixel'))}.", "",
        f"At the image threshold: {at['tp']} TP, {at['fp']} FP, {at['fn']} FN, {at['tn']} TN "
        f"(recall {at['recall']:.3f}, precision {at['precision']:.3f}, false-positive rate "
        f"{at['false_positive_rate']:.3f} on the good test images).", "",
        "| defect class | recall at the threshold |", "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in at.get("recall_per_class", {}).items()], "",
        *_calibration_lines(m["model"].get("calibration") or {}, thr["method"]),
        "## Figures", "",
        *[f"![{name}]({name})" for name in m["figures"]], "",
        f"Model: `{m['model'].get('file')}` on {m['model'].get('device')} "
        f"({m['model'].get('threads')} CPU threads).",
        "Compare `haloae-eval --checkpoint` with `--bundle` on the same data to see how far the "
        "deployed scores are from the training-side ones.", ""]
    return "\n".join(lines)


def _calibration_lines(cal: dict[str, Any], method: str) -> list[str]:
    """What the shipped threshold promises, and whether enough normals were held out."""
    if method != "holdout" or "promised_false_positive_rate" not in cal:
        return []
    p = 100 * cal["promised_false_positive_rate"]
    line = (f"The shipped threshold is the {cal['quantile']:.3g} quantile of "
            f"{cal['threshold_images']} held-out normal images: it promises a false-positive "
            f"rate of about {p:.1f} %.")
    if not cal.get("reliable", True):
        line += (f" **Unreliable**: that quantile needs at least {cal['images_needed']} "
                 "held-out normal images; hold out more (holdout_fraction) or lower "
                 "image_quantile (docs/training.md).")
    return [line, ""]


def write_scores_csv(scored: ScoredSet, path: Path) -> None:
    """One row per image: path, class, label, normalised score."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "class", "label", "score"])
        for p, c, y, s in zip(scored.paths, scored.classes, scored.labels, scored.scores):
            writer.writerow([p, c, int(y), f"{float(s):.8g}"])


def write_report(out: Path, scored: ScoredSet, metric_values: dict[str, Any],
                 thresholds: dict[str, Any], source: str, model_info: dict[str, Any],
                 data: Path, overlays: int = 4) -> dict[str, Any]:
    """Write metrics.json, report.md, scores.csv and the figures into ``out``; return the
    metrics dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_roc(scored, out / "roc.png")
    plot_histogram(scored, thresholds["image"], out / "score_hist.png")
    figures = ["roc.png", "score_hist.png"]
    for name, (rows, title) in _worst(scored, thresholds["image"], overlays).items():
        plot_overlays(scored, rows, title, thresholds["pixel"], out / f"{name}.png")
        figures.append(f"{name}.png")
    result = _clean({
        **metric_values, "source": source, "data": str(data),
        "threshold": {**thresholds, "raw_image": model_info.get("raw_image"),
                      "raw_pixel": model_info.get("raw_pixel"), "normalisation": FORMULA},
        "model": model_info, "figures": figures,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    })
    (out / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    write_scores_csv(scored, out / "scores.csv")
    (out / "report.md").write_text(_markdown(result))
    log.info("report written to %s", out)
    return result
