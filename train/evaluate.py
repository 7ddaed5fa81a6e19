"""Score a test set with a checkpoint (PyTorch) or a bundle and compute metrics.

Both paths use THE preprocessing (``haloae.preprocess``) and the same metric code; a bundle runs
through ``haloae.runtime.load_backend``, the very backend code the edge daemon runs, so
``haloae-eval --bundle`` measures what the line runs and shows how far deployed scores are from
training-side scores. Scores and maps are the normalised outputs (calibrated thresholds at 0.5):

    score = 0.5 * score_raw / raw_image,  map = 0.5 * map_raw / raw_pixel
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from haloae.defect_mask import PEAK_FRACTION, defect_mask
from haloae.zones import IgnoreZones, ZoneSet, reduction_from_model_config

from haloae.manifest import THRESHOLD_TARGET
from haloae.preprocess import to_model_input

from . import metrics
from .data import DataError, Sample, check_readable, find_eval_samples, read_image, read_mask

log = logging.getLogger(__name__)

CALIBRATIONS = ("holdout", "test-f1")


@dataclass
class Scorer:
    """A model behind one call: [B, 3, S, S] float32 in [0, 1] -> (scores [B], maps [B,1,S,S])."""

    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    size: tuple[int, int]  # model input (height, width)
    batch: int  # images per call (a bundle's static batch; the last batch is padded)
    source: str  # "checkpoint" | "bundle"
    info: dict[str, Any] = field(default_factory=dict)  # model id, raw thresholds, device...
    model_config: dict[str, Any] | None = None  # ModelCfg as a dict: how the score comes from the map


@dataclass
class ScoredSet:
    """Normalised outputs and ground truth of every test image."""

    scores: np.ndarray  # [N] float32
    maps: np.ndarray  # [N, S, S] float32
    labels: np.ndarray  # [N] int (0 good, 1 defect)
    masks: np.ndarray  # [N, S, S] uint8 {0, 1}
    classes: list[str]
    paths: list[str]
    ms_per_image: float  # model forward time per image (batched; padding included)
    ms_per_image_total: float  # reading + preprocessing + model
    has_mask: np.ndarray | None = None  # [N] bool: ground truth known per pixel (good images and
    # defect images with a mask); None = all. Pixel metrics use only these images.

    def __post_init__(self) -> None:
        if self.has_mask is None:
            self.has_mask = np.ones(len(self.scores), bool)

    def pixel_subset(self) -> tuple[np.ndarray, np.ndarray]:
        """(masks, maps) of the images whose masks are known: the pixel metrics' images."""
        return self.masks[self.has_mask], self.maps[self.has_mask]

    def mask_coverage(self) -> dict[str, Any]:
        """Which images the pixel metrics cover (the report states it)."""
        defect = self.labels == 1
        without = defect & ~self.has_mask
        classes = np.array(self.classes)
        return {"images": int(self.has_mask.sum()), "good": int(np.sum(~defect & self.has_mask)),
                "defect_with_mask": int(np.sum(defect & self.has_mask)),
                "defect_without_mask": int(without.sum()),
                "classes_without_masks": {c: int(np.sum(without & (classes == c)))
                                          for c in sorted(set(classes[without]))}}


def _threads(threads: int | None) -> int:
    return threads or os.cpu_count() or 1


def checkpoint_scorer(path: Path, device: str = "auto", threads: int | None = None,
                      batch: int = 8) -> Scorer:
    """PyTorch ``HaloAEInference`` of a ``haloae-train`` checkpoint."""
    import torch

    from .checkpoint import CheckpointError, load_checkpoint
    from .ddp import resolve_device
    from .inference import HaloAEInference

    torch.set_num_threads(_threads(threads))
    dev = resolve_device(device)
    model, ckpt = load_checkpoint(path, device=dev)
    if not ckpt.get("calibration"):
        raise CheckpointError(f"{path} has no calibration: evaluate the final.pt of a finished "
                              "haloae-train run")
    module = HaloAEInference(model, source=str(path)).to(dev)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            s, m = module(torch.from_numpy(x).to(dev))
        return s.float().cpu().numpy(), m.float().cpu().numpy()

    cal = ckpt.get("calibration") or {}
    info = {"model": model.cfg.name, "device": str(dev), "threads": _threads(threads),
            "file": str(path), **model.calibration.thresholds(),
            "calibration_method": cal.get("method"), "calibration": _reliability(cal),
            "score_mean_weight": float(model.calibration.score_mean_weight)}
    return Scorer(run, model.cfg.hw, batch, "checkpoint", info, model.cfg.to_dict())


def bundle_scorer(bundle_dir: Path, device: str = "auto", threads: int | None = None,
                  precision: str = "fp32", backend: str = "auto") -> Scorer:
    """The bundle through ``haloae.runtime.load_backend`` (``auto``: what the edge picks here)."""
    from haloae.bundle import Bundle
    from haloae.runtime import load_backend

    bundle = Bundle.open(bundle_dir)
    runner = load_backend(bundle, backend, precision=precision, threads=_threads(threads), device=device)
    m = bundle.manifest
    cal = m.threshold.calibration
    info = {"model": m.model.get("id"), "device": runner.description, "threads": _threads(threads),
            "file": str(getattr(runner, "path", bundle.model_file(precision))),
            "raw_image": m.threshold.raw_image, "raw_pixel": m.threshold.raw_pixel,
            "calibration_method": cal.get("method"), "calibration": _reliability(cal),
            "score_mean_weight": cal.get("score_mean_weight")}
    return Scorer(runner.run, m.input.hw, m.batch, "bundle", info, m.model_config)


def _reliability(cal: dict[str, Any]) -> dict[str, Any]:
    """What the report says about how far the shipped image threshold can be trusted."""
    keys = ("quantile", "promised_false_positive_rate", "threshold_images", "held_out_images",
            "out_of_fold_images", "images_needed", "reliable")
    return {k: cal[k] for k in keys if k in cal}


def _load(sample: Sample, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    image = read_image(sample.path)
    x = to_model_input(image, size)
    if sample.mask_path is not None:
        mask = read_mask(sample.mask_path, size).astype(np.uint8)
    else:
        mask = np.zeros(size, np.uint8)
    return x, mask, (image.shape[1], image.shape[0])


def find_checked_samples(data: Path) -> list[Sample]:
    """The labelled images of ``data`` (`data.find_eval_samples` layouts), every file decoded
    once: all unreadable ones are reported together, before any model is loaded."""
    samples = find_eval_samples(data)
    if not samples:
        raise DataError(f"no test images in {data}")
    check_readable(samples, "test images")
    return samples


def score_dataset(scorer: Scorer, data: Path | list[Sample], progress: bool = True,
                  zones: IgnoreZones | None = None) -> ScoredSet:
    """Score every labelled image of ``data`` (a folder in a `data.find_eval_samples` layout,
    or its samples) with ``scorer``; ``zones`` (in image pixels) are applied to each map and
    score as the edge daemon does (``haloae.zones``)."""
    zone_set = ZoneSet(zones, "--ignore-zones") if zones is not None else None
    reduction = reduction_from_model_config(scorer.model_config, scorer.info) if zones is not None else None
    samples = find_checked_samples(data) if isinstance(data, (str, Path)) else list(data)
    n, s, b = len(samples), scorer.size, scorer.batch
    scores = np.empty(n, np.float32)
    maps = np.empty((n, *s), np.float32)
    masks = np.empty((n, *s), np.uint8)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=f"scoring ({scorer.source})", unit="img")
    start = time.perf_counter()
    warm = np.stack([_load(samples[0], s)[0]] * b)
    scorer.run(warm)  # first call pays lazy initialisation: keep it out of ms_per_image
    model_time = 0.0
    for lo in range(0, n, b):
        chunk = samples[lo:lo + b]
        loaded = [_load(smp, s) for smp in chunk]
        x = np.stack([xi for xi, _, _ in loaded])
        if len(chunk) < b:  # static batch: pad with copies of the last image
            x = np.concatenate([x, np.repeat(x[-1:], b - len(chunk), axis=0)])
        t0 = time.perf_counter()
        sc, mp = scorer.run(x)
        model_time += time.perf_counter() - t0
        k = len(chunk)
        scores[lo:lo + k] = np.asarray(sc).reshape(-1)[:k]
        maps[lo:lo + k] = np.asarray(mp)[:k, 0]
        masks[lo:lo + k] = np.stack([m for _, m, _ in loaded])
        if zone_set is not None:
            for j, (_, _, frame_size) in enumerate(loaded):
                scores[lo + j], maps[lo + j] = zone_set.apply(scores[lo + j], maps[lo + j], frame_size, reduction)
        if bar is not None:
            bar.update(k)
    if bar is not None:
        bar.close()
    total = time.perf_counter() - start
    return ScoredSet(scores, maps, np.array([smp.label for smp in samples]), masks,
                     [smp.defect_class for smp in samples], [str(smp.path) for smp in samples],
                     1000.0 * model_time / n, 1000.0 * total / n,
                     np.array([smp.label == 0 or smp.mask_path is not None for smp in samples]))


def choose_thresholds(scored: ScoredSet, method: str = "holdout") -> dict[str, Any]:
    """Decision thresholds in normalised units.

    ``holdout``: the calibration stored with the model (quantiles of held-out normal images),
    i.e. 0.5 for both. ``test-f1``: the F1-optimal image and pixel thresholds on this labelled
    set (optimistic: tuned on the images it is then measured on).
    """
    if method == "holdout":
        return {"method": "holdout", "image": THRESHOLD_TARGET, "pixel": THRESHOLD_TARGET}
    if method != "test-f1":
        raise ValueError(f"--calibrate-on {method}: use one of {', '.join(CALIBRATIONS)}")
    _, image_thr = metrics.f1_max(scored.labels, scored.scores)
    pix_labels, pix_scores = _pixel_subsample(scored)
    pixel_thr = THRESHOLD_TARGET  # no mask: nothing to tune the pixel threshold on
    if pix_labels.size and pix_labels.min() != pix_labels.max():
        _, pixel_thr = metrics.f1_max(pix_labels, pix_scores)
    return {"method": "test-f1", "image": image_thr, "pixel": pixel_thr}


def _pixel_subsample(scored: ScoredSet, max_pixels: int = 4_000_000):
    masks, maps = scored.pixel_subset()
    y, s = masks.reshape(-1), maps.reshape(-1)
    if y.size > max_pixels:
        idx = np.random.default_rng(0).choice(y.size, size=max_pixels, replace=False)
        y, s = y[idx], s[idx]
    return y, s


def recall_per_class(scored: ScoredSet, threshold: float) -> dict[str, float]:
    """Fraction of each defect class's images scored at or above ``threshold``."""
    classes = np.array(scored.classes)
    out = {}
    for c in sorted(set(scored.classes) - {"good"}):
        sel = (classes == c) & (scored.labels == 1)
        if sel.any():
            out[c] = float(np.mean(scored.scores[sel] >= threshold))
    return out


def _pixel_metrics(scored: ScoredSet) -> dict[str, Any]:
    """Pixel AUROC and AUPRO over the images with known masks (None without any defect mask)."""
    masks, maps = scored.pixel_subset()
    cover = scored.mask_coverage()
    if cover["defect_with_mask"] == 0:
        return {"pixel_auroc": None, "aupro": None, "pixel_metrics_over": cover}
    return {"pixel_auroc": metrics.pixel_auroc(masks, maps),
            "aupro": metrics.aupro(masks, maps, max_fpr=0.3), "pixel_metrics_over": cover}


def region_sizes(scored: ScoredSet, pixel_threshold: float,
                 peak_fraction: float = PEAK_FRACTION) -> dict[str, Any] | None:
    """How large the predicted defect (the daemon's mask rule, `haloae.defect_mask`: map >=
    ``pixel_threshold``, each component cut at ``peak_fraction`` of its peak) is against the true
    mask, per defect image with a mask: the area ratio predicted / true and the IoU (None without
    masks). A ratio of 3 means the reported region sizes overstate that defect three-fold."""
    sel = np.flatnonzero((scored.labels == 1) & scored.has_mask)
    sel = sel[[bool(scored.masks[i].any()) for i in sel]] if sel.size else sel
    if sel.size == 0:
        return None
    pred = np.stack([defect_mask(scored.maps[i], pixel_threshold, peak_fraction) for i in sel])
    true = scored.masks[sel].astype(bool)
    area_p = pred.reshape(len(sel), -1).sum(axis=1).astype(np.float64)
    area_t = true.reshape(len(sel), -1).sum(axis=1).astype(np.float64)
    inter = (pred & true).reshape(len(sel), -1).sum(axis=1)
    union = (pred | true).reshape(len(sel), -1).sum(axis=1)
    ratio, iou = area_p / area_t, inter / np.maximum(union, 1)
    q = lambda v, p: float(np.quantile(v, p))  # noqa: E731
    return {"images": int(sel.size), "pixel_threshold": float(pixel_threshold),
            "peak_fraction": float(peak_fraction), "area_ratio_median": q(ratio, 0.5),
            "area_ratio_p10": q(ratio, 0.1),
            "area_ratio_p90": q(ratio, 0.9), "iou_median": q(iou, 0.5),
            "missed": int(np.sum(inter == 0))}


def compute_metrics(scored: ScoredSet, thresholds: dict[str, Any],
                    peak_fraction: float = PEAK_FRACTION) -> dict[str, Any]:
    """Threshold-free metrics plus the confusion counts at ``thresholds['image']`` and the region
    sizes of the daemon's masks (``peak_fraction``: its `publish.mask_peak_fraction`)."""
    f1, f1_thr = metrics.f1_max(scored.labels, scored.scores)
    pred = scored.scores >= thresholds["image"]
    y = scored.labels.astype(bool)
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    return {
        "image_auroc": metrics.auroc(scored.labels, scored.scores),
        **_pixel_metrics(scored),
        "image_f1_max": f1, "image_f1_max_threshold": f1_thr,
        "per_class": metrics.per_class_auroc(scored.labels, scored.scores, scored.classes),
        "n_images": int(len(scored.scores)), "n_good": int(np.sum(~y)), "n_defect": int(np.sum(y)),
        "at_threshold": {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
                         "recall": tp / max(tp + fn, 1), "precision": tp / max(tp + fp, 1),
                         "false_positive_rate": fp / max(fp + tn, 1),
                         "recall_per_class": recall_per_class(scored, thresholds["image"])},
        "region_sizes": region_sizes(scored, thresholds["pixel"], peak_fraction),
        "ms_per_image": scored.ms_per_image, "ms_per_image_total": scored.ms_per_image_total,
    }
