"""Score a test set with a checkpoint (PyTorch) or a bundle (ONNX Runtime) and compute metrics.

Both paths use THE preprocessing (``data.to_model_input``) and the same metric code, so
``haloae-eval --bundle`` shows directly how far deployed scores are from training-side scores.
Scores and maps are the normalised outputs (calibrated thresholds at 0.5):

    score = 0.5 * score_raw / image_threshold_raw,  map = 0.5 * map_raw / pixel_threshold_raw
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from haloae.edge.zones import IgnoreZones, ZoneSet, reduction_from_model_config

from . import metrics
from .data import DataError, Sample, find_mvtec_samples, read_image, read_mask, to_model_input

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
    thr = model.calibration.thresholds()
    info = {"model": model.cfg.name, "device": str(dev), "threads": _threads(threads),
            "file": str(path),
            "raw_image": thr["image_threshold"], "raw_pixel": thr["pixel_threshold"],
            "calibration_method": cal.get("method"), "calibration": _reliability(cal)}
    return Scorer(run, model.cfg.hw, batch, "checkpoint", info, model.cfg.to_dict())


def bundle_scorer(bundle_dir: Path, device: str = "auto", threads: int | None = None,
                  precision: str = "fp32") -> Scorer:
    """ONNX Runtime session on the bundle's ``model.onnx`` (or ``model.fp16.onnx``)."""
    import onnxruntime as ort

    from haloae.export.bundle import model_file, verify_bundle

    manifest = verify_bundle(bundle_dir)
    path = model_file(bundle_dir, manifest, precision)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = _threads(threads)
    opts.log_severity_level = 3
    providers = ["CPUExecutionProvider"]
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device.startswith("cuda") and not has_cuda:
        raise ValueError(f"--device {device}: this onnxruntime has no CUDA provider; install "
                         "onnxruntime-gpu or use --device cpu")
    if device != "cpu" and has_cuda:
        providers.insert(0, "CUDAExecutionProvider")
    sess = ort.InferenceSession(str(path), opts, providers=providers)
    inp, outs = manifest["input"], manifest["outputs"]
    names = [outs["score"]["name"], outs["anomaly_map"]["name"]]

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s, m = sess.run(names, {inp["name"]: x})
        return s, m

    n, _, h, w = inp["shape"]
    thr = manifest["threshold"]
    info = {"model": manifest["model"].get("id"), "device": sess.get_providers()[0],
            "threads": _threads(threads),
            "file": str(path), "raw_image": thr.get("raw_image"), "raw_pixel": thr.get("raw_pixel"),
            "calibration_method": thr.get("method"), "calibration": _reliability(thr)}
    return Scorer(run, (int(h), int(w)), n, "bundle", info, manifest["model"].get("config"))


def _reliability(cal: dict[str, Any]) -> dict[str, Any]:
    """What the report says about how far the shipped image threshold can be trusted."""
    keys = ("quantile", "promised_false_positive_rate", "threshold_images", "images_needed",
            "reliable")
    return {k: cal[k] for k in keys if k in cal}


def _load(sample: Sample, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    image = read_image(sample.path)
    x = to_model_input(image, size)
    if sample.mask_path is not None:
        mask = read_mask(sample.mask_path, size).astype(np.uint8)
    else:
        mask = np.zeros(size, np.uint8)
    return x, mask, (image.shape[1], image.shape[0])


def score_dataset(scorer: Scorer, data: Path, progress: bool = True,
                  zones: IgnoreZones | None = None) -> ScoredSet:
    """Score every image of ``<data>/test`` (MVTec layout) with ``scorer``; ``zones`` (in image
    pixels) are applied to each map and score as the edge daemon does (``haloae.edge.zones``)."""
    zone_set = ZoneSet(zones, "--ignore-zones") if zones is not None else None
    reduction = reduction_from_model_config(scorer.model_config) if zones is not None else None
    samples = find_mvtec_samples(data, "test")
    if not samples:
        raise DataError(f"no test images in {data}/test")
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
                     1000.0 * model_time / n, 1000.0 * total / n)


def choose_thresholds(scored: ScoredSet, method: str = "holdout") -> dict[str, Any]:
    """Decision thresholds in normalised units.

    ``holdout``: the calibration stored with the model (quantiles of held-out normal images),
    i.e. 0.5 for both. ``test-f1``: the F1-optimal image and pixel thresholds on this labelled
    set (optimistic: tuned on the images it is then measured on).
    """
    if method == "holdout":
        return {"method": "holdout", "image": 0.5, "pixel": 0.5}
    if method != "test-f1":
        raise ValueError(f"--calibrate-on {method}: use one of {', '.join(CALIBRATIONS)}")
    _, image_thr = metrics.f1_max(scored.labels, scored.scores)
    pix_labels, pix_scores = _pixel_subsample(scored)
    _, pixel_thr = metrics.f1_max(pix_labels, pix_scores)
    return {"method": "test-f1", "image": image_thr, "pixel": pixel_thr}


def _pixel_subsample(scored: ScoredSet, max_pixels: int = 4_000_000):
    y, s = scored.masks.reshape(-1), scored.maps.reshape(-1)
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


def compute_metrics(scored: ScoredSet, thresholds: dict[str, Any]) -> dict[str, Any]:
    """Threshold-free metrics plus the confusion counts at ``thresholds['image']``."""
    f1, f1_thr = metrics.f1_max(scored.labels, scored.scores)
    pred = scored.scores >= thresholds["image"]
    y = scored.labels.astype(bool)
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    return {
        "image_auroc": metrics.auroc(scored.labels, scored.scores),
        "pixel_auroc": metrics.pixel_auroc(scored.masks, scored.maps),
        "aupro": metrics.aupro(scored.masks, scored.maps, max_fpr=0.3),
        "image_f1_max": f1, "image_f1_max_threshold": f1_thr,
        "per_class": metrics.per_class_auroc(scored.labels, scored.scores, scored.classes),
        "n_images": int(len(scored.scores)), "n_good": int(np.sum(~y)), "n_defect": int(np.sum(y)),
        "at_threshold": {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
                         "recall": tp / max(tp + fn, 1), "precision": tp / max(tp + fp, 1),
                         "false_positive_rate": fp / max(fp + tn, 1),
                         "recall_per_class": recall_per_class(scored, thresholds["image"])},
        "ms_per_image": scored.ms_per_image, "ms_per_image_total": scored.ms_per_image_total,
    }
