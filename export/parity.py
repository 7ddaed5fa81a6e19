"""Parity of the exported graphs: PyTorch vs ONNX Runtime fp32, and fp16 vs fp32, on K images.

Sample images come from ``--data`` (an MVTec-layout root or a folder of images, good and
defective test images mixed), else from the synthetic surface generator
(``haloae.synthetic``, good parts and every defect kind, fixed seed). All go through
THE preprocessing (``haloae.preprocess.to_model_input``). The exported graphs run through
``haloae.runtime.load_backend`` (ONNX Runtime on the CPU), the backend code the edge runs.

Tolerances (normalised units, where the calibrated threshold is 0.5; docs/bundle.md):

- fp32: max |Δscore| <= 5e-4 (0.1 % of the threshold; a score is a map maximum, so it cannot
  be held tighter than the map's float error: the full 176-direction Gaussian of `edge` measured
  1.3e-4) and max |Δmap| <= 1e-3 - an export above them fails;
- fp16 scores: |Δ| <= 0.01 + 0.01 * |fp32 value| (2 % of the threshold near it, 1 % relative
  above it); fp16 maps: |Δ| <= 0.05 + 0.01 * |fp32 value| (10 % of the pixel threshold: the
  position-wise Gaussian weighs the least-variance residual directions, so fp16 rounding of
  the input and the weights moves single map pixels by a few hundredths); every output finite.
  An fp16 graph above them is not written. The record also counts the map pixels whose side of
  the 0.5 threshold differs (``map_pixels_flipped``) and the image verdicts that differ.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from haloae.errors import Failure
from haloae.bundle import Bundle
from haloae.manifest import THRESHOLD_TARGET as THRESHOLD
from haloae.preprocess import to_model_input
from haloae.train import data as data_mod

log = logging.getLogger(__name__)

FP32_TOL = {"score": 5e-4, "map": 1e-3}
FP16_TOL = {"score": {"atol": 0.01, "rtol": 0.01}, "map": {"atol": 0.05, "rtol": 0.01}}


class ParityError(Failure, RuntimeError):
    """The exported graph does not reproduce PyTorch within the documented tolerance."""


def _synthetic(k: int, size: int, seed: int) -> list[np.ndarray]:
    from haloae import synthetic

    rng = np.random.default_rng(seed)
    kinds = (None, *synthetic.DEFECT_KINDS)  # good and every defect kind, in turn
    return [synthetic.sample(rng, size, kinds[i % len(kinds)])[0] for i in range(k)]


def _from_data(root: Path, k: int) -> list[np.ndarray]:
    root = Path(root)
    if (root / "test").is_dir():
        paths = [s.path for s in data_mod.find_mvtec_samples(root, "test")]
    elif (root / "train" / "good").is_dir():
        paths = [s.path for s in data_mod.find_mvtec_samples(root, "train")]
    else:
        paths = data_mod.list_images(root)
    if not paths:
        raise data_mod.DataError(f"no images in {root} for the parity check; pass an "
                                 "MVTec-layout root or a folder of images")
    picks = np.unique(np.linspace(0, len(paths) - 1, min(k, len(paths))).round().astype(int))
    return [data_mod.read_image(paths[i]) for i in picks]  # spread over good and defect classes


def sample_images(k: int, size: int | tuple[int, int], data: Path | None = None,
                  seed: int = 0) -> tuple[np.ndarray, str]:
    """K preprocessed images [K, 3, H, W] float32 in [0, 1] and where they came from
    (``size``: a square side or (height, width))."""
    if data is not None:
        images, source = _from_data(Path(data), k), f"data:{data}"
    else:
        side = size if isinstance(size, int) else max(size)
        images, source = _synthetic(k, side, seed), "synthetic"
    batch = np.stack([to_model_input(img, size) for img in images])
    return batch.astype(np.float32), source


def run_bundle(bundle: Bundle, precision: str, x: np.ndarray, threads: int | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``x`` [K, 3, H, W] through the bundle's ``precision`` graph with the runtime's ONNX Runtime
    backend on the CPU (``threads`` intra-op threads, default all cores), in static batches."""
    from haloae.runtime import load_backend

    backend = load_backend(bundle, "onnxruntime", precision=precision, device="cpu",
                           threads=threads or os.cpu_count() or 1)
    try:
        return backend.run_padded(x)
    finally:
        backend.close()


def torch_runner(module: torch.nn.Module, batch: int) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The PyTorch reference on ``x`` [K, 3, H, W] in the graph's static batches (padded alike)."""
    def run(x: np.ndarray):
        scores, maps = [], []
        with torch.no_grad():
            for lo in range(0, len(x), batch):
                chunk = x[lo:lo + batch]  # k, 3, H, W
                k = len(chunk)
                if k < batch:
                    chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - k, axis=0)])  # batch, 3, H, W
                s, m = module(torch.from_numpy(chunk))
                scores.append(s.numpy()[:k])
                maps.append(m.numpy()[:k])
        return np.concatenate(scores), np.concatenate(maps)
    return run


def _diff(ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray]) -> dict:
    return {"max_abs_score": float(np.max(np.abs(ref[0] - got[0]))),
            "max_abs_map": float(np.max(np.abs(ref[1] - got[1]))),
            "finite": bool(np.isfinite(got[0]).all() and np.isfinite(got[1]).all())}


def check_fp32(ref, got) -> dict:
    """Parity record torch vs ORT fp32; ``ParityError`` above ``FP32_TOL``."""
    rec = {**_diff(ref, got), "tolerance_score": FP32_TOL["score"],
           "tolerance_map": FP32_TOL["map"]}
    if not (rec["finite"] and rec["max_abs_score"] <= FP32_TOL["score"]
            and rec["max_abs_map"] <= FP32_TOL["map"]):
        raise ParityError(f"ONNX Runtime fp32 differs from PyTorch: max |Δscore| "
                          f"{rec['max_abs_score']:.3g} (tolerance {FP32_TOL['score']}), max "
                          f"|Δmap| {rec['max_abs_map']:.3g} (tolerance {FP32_TOL['map']}); "
                          "the exported graph is wrong - report it with the model config")
    return rec


def check_fp16(ref, got) -> dict:
    """Parity record fp16 vs fp32 graph; ``ParityError`` above ``FP16_TOL`` or on NaN/Inf."""
    ts, tm = FP16_TOL["score"], FP16_TOL["map"]
    rec = {**_diff(ref, got),
           "tolerance": (f"score |d| <= {ts['atol']} + {ts['rtol']} * |fp32|, "
                         f"map |d| <= {tm['atol']} + {tm['rtol']} * |fp32|"),
           "verdicts_flipped": int(np.sum((ref[0] > THRESHOLD) != (got[0] > THRESHOLD))),
           "map_pixels_flipped": float(np.mean((ref[1] > THRESHOLD) != (got[1] > THRESHOLD)))}
    within = all(bool(np.all(np.abs(r - g) <= t["atol"] + t["rtol"] * np.abs(r)))
                 for r, g, t in zip(ref, got, (ts, tm)))
    if not (rec["finite"] and within):
        raise ParityError(f"the fp16 graph drifts from fp32 (max |Δscore| "
                          f"{rec['max_abs_score']:.3g}, max |Δmap| {rec['max_abs_map']:.3g}, "
                          f"finite={rec['finite']}; tolerance {rec['tolerance']}): "
                          "use the fp32 bundle (export without --fp16)")
    return rec
