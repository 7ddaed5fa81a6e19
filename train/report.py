"""The ``haloae-eval`` report: metrics.json, report.md and PNG figures (matplotlib, Agg).

Figures: ``roc.png`` (image and pixel ROC, log false-positive axis, the operating point),
``pr.png`` (precision-recall), ``score_hist.png`` (good vs defective image scores with the
threshold line), ``worst_false_negatives.png`` / ``worst_false_positives.png`` (image | heat
map with a colour bar | predicted mask | ground truth). ``scores.csv`` lists every image's score.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from haloae.defect_mask import PEAK_FRACTION, defect_mask
from haloae.manifest import THRESHOLD_TARGET
from haloae.preprocess import resize_rgb

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


def _curves(labels: np.ndarray, scores: np.ndarray) -> dict[str, np.ndarray]:
    """ROC and precision-recall points of one binary problem (thinned for plotting)."""
    fpr, tpr, thr = metrics.roc_curve(labels, scores, max_points=4000)
    n_pos, n_neg = int(np.sum(labels)), int(np.size(labels) - np.sum(labels))
    tp, fp = tpr * n_pos, fpr * n_neg
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-12), 1.0)
    return {"fpr": fpr, "tpr": tpr, "thr": thr, "precision": precision, "n_neg": n_neg,
            "n_pos": n_pos}


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve (step-wise, as scikit-learn's average_precision)."""
    c = _curves(labels, scores)
    return float(np.sum(np.diff(c["tpr"]) * c["precision"][1:]))


def _operating_point(labels, scores, threshold):
    pred = scores >= threshold
    y = labels.astype(bool)
    tpr = float(np.sum(pred & y) / max(y.sum(), 1))
    fpr = float(np.sum(pred & ~y) / max((~y).sum(), 1))
    prec = float(np.sum(pred & y) / max(pred.sum(), 1))
    return fpr, tpr, prec


def _problems(scored: ScoredSet, max_pixels: int = 4_000_000):
    masks, maps = scored.pixel_subset()
    y, s = masks.reshape(-1), maps.reshape(-1)
    if y.size > max_pixels:
        idx = np.random.default_rng(0).choice(y.size, size=max_pixels, replace=False)
        y, s = y[idx], s[idx]
    cover = scored.mask_coverage()
    pix_title = f"pixel ({cover['images']} images with known masks)"
    return [(scored.labels, scored.scores, "image"), (y, s, pix_title)]


def plot_roc(scored: ScoredSet, path: Path, thresholds: dict[str, float] | None = None) -> None:
    """Image and pixel ROC with a LOG false-positive axis (the useful range of an inspector is
    FPR 0.1-5 %, which a linear axis squeezes into its left edge) and the operating point."""
    plt = _plt()
    thresholds = thresholds or {"image": THRESHOLD_TARGET, "pixel": THRESHOLD_TARGET}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (labels, scores, title), key in zip(axes, _problems(scored), ("image", "pixel")):
        if labels.size == 0 or labels.min() == labels.max():
            ax.set_title(f"{title} ROC: one class only")
            ax.axis("off")
            continue
        c = _curves(labels, scores)
        floor = 0.5 / max(c["n_neg"], 1)  # below one false positive: where the log axis starts
        ax.step(np.maximum(c["fpr"], floor), c["tpr"], where="post", lw=2,
                label=f"AUROC {metrics.auroc(labels, scores):.3f}")
        fpr, tpr, _ = _operating_point(labels, scores, thresholds[key])
        ax.plot([max(fpr, floor)], [tpr], "ko",
                label=f"threshold {thresholds[key]:.3g}: FPR {100 * fpr:.2g} %, TPR {tpr:.3f}")
        ax.set_xscale("log")
        ax.set(xlabel="false positive rate (log)", ylabel="true positive rate (recall)",
               title=f"{title} ROC", xlim=(floor, 1), ylim=(0, 1.01))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pr(scored: ScoredSet, path: Path, thresholds: dict[str, float] | None = None) -> None:
    """Precision-recall curves (image, pixel): what share of alarms are real at each recall."""
    plt = _plt()
    thresholds = thresholds or {"image": THRESHOLD_TARGET, "pixel": THRESHOLD_TARGET}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.5))
    for ax, (labels, scores, title), key in zip(axes, _problems(scored), ("image", "pixel")):
        if labels.size == 0 or labels.min() == labels.max():
            ax.set_title(f"{title} PR: one class only")
            ax.axis("off")
            continue
        c = _curves(labels, scores)
        ap = float(np.sum(np.diff(c["tpr"]) * c["precision"][1:]))
        ax.step(c["tpr"], c["precision"], where="post", lw=2, label=f"average precision {ap:.3f}")
        base = c["n_pos"] / (c["n_pos"] + c["n_neg"])
        ax.axhline(base, color="k", ls=":", lw=0.8, label=f"chance {base:.3g}")
        _, tpr, prec = _operating_point(labels, scores, thresholds[key])
        ax.plot([tpr], [prec], "ko", label=f"threshold {thresholds[key]:.3g}: recall {tpr:.3f}, "
                                            f"precision {prec:.3f}")
        ax.set(xlabel="recall", ylabel="precision", title=f"{title} precision-recall",
               xlim=(0, 1), ylim=(0, 1.01))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_histogram(scored: ScoredSet, threshold: float, path: Path) -> None:
    """Good vs defective image scores (densities, so a small defect set stays visible)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lo = min(float(scored.scores.min()), threshold)
    hi = max(float(np.quantile(scored.scores, 0.995)), threshold)
    pad = 0.05 * max(hi - lo, 1e-6)
    bins = np.linspace(lo - pad, hi + pad, 50)
    clipped = np.clip(scored.scores, bins[0], bins[-1])
    good, bad = clipped[scored.labels == 0], clipped[scored.labels == 1]
    n_fp, n_fn = int(np.sum(good >= threshold)), int(np.sum(bad < threshold))
    ax.hist(good, bins=bins, alpha=0.6, label=f"good ({good.size}; {n_fp} above)",
            color="tab:green", density=True)
    ax.hist(bad, bins=bins, alpha=0.6, label=f"defective ({bad.size}; {n_fn} below)",
            color="tab:red", density=True)
    ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.3g}")
    ax.set(xlabel="image score (normalised; last bin holds everything above)",
           ylabel="share of images (density)", title="image scores: good vs defective")
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
                  path: Path, peak_fraction: float = PEAK_FRACTION) -> None:
    """image | heat map with a colour bar (threshold marked) | predicted mask (the daemon's rule,
    `haloae.defect_mask`) | ground truth."""
    plt = _plt()
    n = max(len(rows), 1)
    fig, axes = plt.subplots(n, 4, figsize=(13, 3.1 * n), squeeze=False)
    h, w = scored.maps.shape[-2:]
    vmax = 2.0 * pixel_thr  # threshold = the middle colour
    for r, i in enumerate(rows):
        rgb = resize_rgb(read_image(scored.paths[i]), (h, w))
        pred = defect_mask(scored.maps[i], pixel_thr, peak_fraction)
        gt = ("ground truth" if scored.has_mask[i] or scored.labels[i] == 0
              else "ground truth: no mask")
        ax = axes[r]
        ax[0].imshow(rgb)
        ax[0].set_title(f"{Path(scored.paths[i]).name} ({scored.classes[i]})", fontsize=8)
        im = ax[1].imshow(scored.maps[i], cmap="jet", vmin=0, vmax=vmax)
        ax[1].set_title(f"anomaly map, score {scored.scores[i]:.3g}", fontsize=8)
        bar = fig.colorbar(im, ax=ax[1], fraction=0.046, pad=0.02)
        bar.ax.axhline(pixel_thr, color="w", lw=2)
        bar.set_ticks([0, pixel_thr, vmax])
        bar.ax.tick_params(labelsize=7)
        ax[2].imshow(pred, cmap="gray", vmin=0, vmax=1)
        cut = f", cut at {peak_fraction:g} x peak" if peak_fraction else ""
        ax[2].set_title(f"predicted mask (map >= {pixel_thr:.3g}{cut}): {int(pred.sum())} px",
                        fontsize=8)
        ax[3].imshow(scored.masks[i], cmap="gray", vmin=0, vmax=1)
        ax[3].set_title(f"{gt}: {int(scored.masks[i].sum())} px" if "no mask" not in gt else gt,
                        fontsize=8)
        for a in ax:
            a.axis("off")
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
        *_coverage_lines(m.get("pixel_metrics_over")),
        *_region_lines(m.get("region_sizes")),
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


def _coverage_lines(cover: dict[str, Any] | None) -> list[str]:
    """Which images the pixel metrics are over (defect images without masks are not)."""
    if not cover:
        return []
    line = (f"Image metrics: all images. Pixel metrics (pixel AUROC, AUPRO, pixel ROC/PR): the "
            f"{cover['images']} images with known masks ({cover['good']} good, "
            f"{cover['defect_with_mask']} defective with a mask).")
    if cover["defect_without_mask"]:
        kinds = ", ".join(f"{k} {v}" for k, v in cover["classes_without_masks"].items())
        line += (f" {cover['defect_without_mask']} defective images have no mask ({kinds}) and "
                 "count for image metrics only.")
    if not cover["defect_with_mask"]:
        line += " No defect image has a mask: pixel metrics are n/a."
    return [line, ""]


def _region_lines(sizes: dict[str, Any] | None) -> list[str]:
    """Region sizes at the pixel threshold against the masks: how far reported areas are off."""
    if not sizes:
        return []
    cut = sizes["peak_fraction"]
    rule = (f"each region cut at {cut:g} x its peak, the daemon's `publish.mask_peak_fraction`"
            if cut else "every pixel above it")
    return [f"Region sizes at the pixel threshold {sizes['pixel_threshold']:.3g} ({rule}; what the "
            f"daemon reports as `regions[].area`), over {sizes['images']} defect images with masks: "
            f"predicted area / true area median {sizes['area_ratio_median']:.2f} "
            f"(10-90 %: {sizes['area_ratio_p10']:.2f}-{sizes['area_ratio_p90']:.2f}), IoU "
            f"median {sizes['iou_median']:.2f}, {sizes['missed']} defects not touched by the "
            "predicted mask. A ratio above 1 means reported sizes overstate defects by that "
            "factor.", ""]


def _calibration_lines(cal: dict[str, Any], method: str) -> list[str]:
    """What the shipped threshold promises, and whether enough normals were held out."""
    if method != "holdout" or "promised_false_positive_rate" not in cal:
        return []
    p = 100 * cal["promised_false_positive_rate"]
    if cal.get("out_of_fold_images"):
        source = (f"{cal['threshold_images']} normal images ({cal['held_out_images']} held out, "
                  f"{cal['out_of_fold_images']} training images scored out of fold; never below "
                  "the held-out images' own quantile)")
    else:
        source = f"{cal['threshold_images']} held-out normal images"
    line = (f"The shipped threshold is the {cal['quantile']:.3g} quantile of {source}: it "
            f"promises a false-positive rate of about {p:.1f} %.")
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
                 data: Path, overlays: int = 4, peak_fraction: float = PEAK_FRACTION) -> dict[str, Any]:
    """Write metrics.json, report.md, scores.csv and the figures into ``out`` (masks cut at
    ``peak_fraction`` of their peak, as the daemon does); return the metrics dict."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plot_roc(scored, out / "roc.png", thresholds)
    plot_pr(scored, out / "pr.png", thresholds)
    plot_histogram(scored, thresholds["image"], out / "score_hist.png")
    figures = ["roc.png", "pr.png", "score_hist.png"]
    for name, (rows, title) in _worst(scored, thresholds["image"], overlays).items():
        plot_overlays(scored, rows, title, thresholds["pixel"], out / f"{name}.png", peak_fraction)
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
