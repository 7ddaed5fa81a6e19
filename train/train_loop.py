"""The HaloAE training loop (Mathian et al., arXiv 2208.03486), single process or DDP.

One step: clean images -> Cut&Paste / scar augmentation (labels 0/1/2) -> frozen backbone
features of the inputs -> Block C reconstruction -> Block D image -> Block E logits; loss
against the CLEAN image's features and the clean image (denoising), weights from the
progress schedule (loss.py). The frozen backbone never sees gradients: clean-image features
are computed once and cached (``cache_features``), and the backbone runs only on the
augmented part of each batch.

Files in RUN_DIR (rank 0 writes): ``log.csv`` (one row per epoch), ``last.pt`` (resumable,
every ``checkpoint_every`` epochs), ``final.pt`` (with calibration), ``train_config.yaml``.
"""
from __future__ import annotations

import csv
import logging
import math
import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml
from torch import nn
from torch.utils.data import DistributedSampler

from haloae.errors import UserError
from haloae.preprocess import scale_tensor

from . import ddp
from .calibrate import calibrate
from .checkpoint import read_checkpoint, save_checkpoint
from .cutpaste import augment_batch
from .data import DataError, find_train_samples, load_images, split_holdout
from .fit_stats import fit_brightness, fit_gaussian, fit_standardization, out_of_fold_maps
from .loss import haloae_loss, loss_weights
from .torch_model import HaloAE, create_model
from .train_config import TrainCfg, resolve_model_config

_LOG = logging.getLogger(__name__)

LOG_FIELDS = ["epoch", "loss", "ce", "feat_mse", "feat_ssim", "img_mse", "img_ssim",
              "a_ce", "a_feat", "a_img", "lr", "epoch_s", "time_s"]


class _Heads(nn.Module):
    """Blocks C, D, E as one forward (what DDP wraps): input features -> outputs."""

    def __init__(self, model: HaloAE) -> None:
        super().__init__()
        self.model = model

    def forward(self, feats: torch.Tensor):
        recon = self.model.reconstruct(feats)
        image = self.model.decode_image(recon) if self.model.image_decoder is not None else None
        logits = self.model.classify(image) if (self.model.classifier is not None
                                                and image is not None) else None
        return recon, image, logits


def _lr_at(cfg: TrainCfg, step: int, total: int) -> float:
    """Linear warm-up then cosine decay to ``lr * min_lr_ratio``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(total - cfg.warmup_steps, 1)
    t = min((step - cfg.warmup_steps) / span, 1.0)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1.0 + math.cos(math.pi * t))


def _versions() -> dict[str, str]:
    import cv2
    import numpy

    from haloae import __version__
    return {"haloae": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "opencv": cv2.__version__, "python": platform.python_version()}


def _feature_cache(model: HaloAE, images: torch.Tensor, cfg: TrainCfg, device: torch.device,
                   progress: bool) -> Optional[torch.Tensor]:
    """Backbone features of every clean training image [N, C, g, g], or None if too big."""
    if not cfg.cache_features:
        return None
    (gh, gw), c, n = model.cfg.backbone.grid_hw, model.feature_channels, images.shape[0]
    gb = n * c * gh * gw * 4 / 1e9
    if gb > cfg.cache_max_gb:
        _LOG.warning("feature cache would take %.1f GB > cache_max_gb=%.1f: computing features "
                     "every step instead", gb, cfg.cache_max_gb)
        return None
    out = torch.empty((n, c, gh, gw), dtype=torch.float32, device=device)
    bs = max(cfg.calib_batch_size, cfg.batch_size)
    starts = range(0, n, bs)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="caching features", unit="batch", leave=False)
    with torch.no_grad():
        for i in starts:
            x = scale_tensor(images[i: i + bs].to(device))
            out[i: i + bs] = model.extract(x)
    return out


def _init_output_bias(model: HaloAE, images: torch.Tensor, cache: Optional[torch.Tensor],
                      device: torch.device) -> None:
    """Data-dependent init: the bias of Block C's last 1x1 conv = the mean training feature
    per channel. Raw backbone features have channel means up to ~10 with unit-scale
    variation; learning those offsets by gradient descent would take most of a short run."""
    last = [m for m in model.autoencoder.modules()
            if isinstance(m, nn.Conv2d) and m.out_channels == model.feature_channels]
    if not last or last[-1].bias is None:
        _LOG.warning("Block C has no output conv with a bias: skipping its data-dependent init")
        return
    with torch.no_grad():
        if cache is not None:
            mean = cache.mean(dim=(0, 2, 3))
        else:
            x = scale_tensor(images[:64].to(device))
            mean = model.extract(x).mean(dim=(0, 2, 3))
        last[-1].bias.copy_(mean.to(last[-1].bias))


def _write_log(path: Path, row: dict) -> None:
    new = not path.is_file()
    with open(path, "a", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: (f"{row[k]:.6g}" if isinstance(row.get(k), float) else row.get(k, ""))
                    for k in LOG_FIELDS})


class RunError(UserError, ValueError):
    """The run folder does not fit the request (existing run without --resume, ...)."""


def _check_run_dir(out: Path, resume: bool) -> Optional[dict]:
    last = out / "last.pt"
    if resume:
        if not last.is_file():
            raise RunError(f"--resume: {last} not found; start a new run without --resume")
        return read_checkpoint(last)
    if last.is_file() or (out / "final.pt").is_file():
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose a "
                       "new --out folder")
    return None


@dataclass
class TrainResult:
    """What `train` leaves: the final checkpoint (rank 0, finished runs only) and the model."""

    final: Optional[Path]  # None on ranks > 0 and when --stop-after ended the run early
    model: HaloAE
    rank: int
    world_size: int


SCORE_KEYS = ("score", "topk", "mean_weight", "fine_weight", "coarse_weight", "coarse_cells")  # calibration only


def _without_score(model_cfg: dict) -> dict:
    """A model config dict without the image-score keys (a resumed run may change them)."""
    return {**model_cfg, "map": {k: v for k, v in model_cfg.get("map", {}).items() if k not in SCORE_KEYS}}


def train(cfg: TrainCfg, data: Path, out: Path, device: str = "auto", resume: bool = False,
          stop_after: Optional[int] = None, progress: bool = True) -> TrainResult:
    """Train, calibrate and write RUN_DIR (see module doc)."""
    info = ddp.setup(device)
    try:
        final, model = _train(cfg, Path(data), Path(out), info, resume, stop_after, progress)
    finally:
        ddp.cleanup(info)
    return TrainResult(final, model, info.rank, info.world_size)


def _train(cfg: TrainCfg, data: Path, out: Path, info: ddp.DistInfo, resume: bool,
           stop_after: Optional[int], progress: bool) -> tuple[Optional[Path], HaloAE]:
    t_start = time.monotonic()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    progress = progress and info.is_main
    state = _check_run_dir(out, resume)
    model_cfg = resolve_model_config(cfg)
    samples, kind = find_train_samples(data)
    train_s, hold_s = split_holdout(samples, cfg.holdout_fraction, cfg.seed)
    if len(train_s) < 2:
        raise DataError(f"only {len(train_s)} training image(s) in {data} after holding out "
                        f"{len(hold_s)} for calibration; add defect-free images")
    torch.manual_seed(cfg.seed)
    model = create_model(model_cfg, device=info.device)
    if state is not None:
        if _without_score(state["config"]) != _without_score(model_cfg.to_dict()):
            raise RunError(f"{out / 'last.pt'} was trained with another model config; resume "
                           "with the same --config (only map.score, map.topk, map.mean_weight, "
                           "map.fine_weight, map.coarse_weight and map.coarse_cells may change: they are "
                           "applied at calibration) or start a new --out")
        refit = ("calibration.", "gaussian.")  # fitted again at the end (shapes follow map.*_weight)
        fresh = {k: v for k, v in model.state_dict().items() if k.startswith(refit)}
        model.load_state_dict({**{k: v for k, v in state["state_dict"].items()
                                  if not k.startswith(refit)}, **fresh})
    model.train()
    images = load_images(train_s, model_cfg.hw, progress, cfg.num_workers)  # uint8 [N, 3, H, W] on CPU
    if info.device.type == "cuda":
        images = images.pin_memory()
    if state is None:  # before any feature: every feature depends on it
        fit_brightness(model, images)
    cache = _feature_cache(model, images, cfg, info.device, progress)
    if state is None:  # resumed runs load the statistics with the weights
        cache = fit_standardization(model, images, cache, info.device, cfg.calib_batch_size,
                                    progress)
        _init_output_bias(model, images, cache, info.device)

    heads: nn.Module = _Heads(model)
    if info.distributed:
        ids = [info.device.index] if info.device.type == "cuda" else None
        heads = nn.parallel.DistributedDataParallel(heads, device_ids=ids)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr,
                            weight_decay=cfg.weight_decay)
    use_amp = cfg.amp and info.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    history: list[dict] = []
    start_epoch, time_before = 0, 0.0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        saved_scaler = (state.get("resume") or {}).get("scaler") or {}
        if use_amp and saved_scaler:  # absent when the run started without AMP (CPU)
            scaler.load_state_dict(saved_scaler)
        start_epoch = int(state["epoch"])
        history = list(state["train"].get("history", []))
        time_before = float(state["train"].get("time_s", 0.0))
        _LOG.info("resuming %s after epoch %d", out, start_epoch)

    sampler = DistributedSampler(range(len(train_s)), num_replicas=info.world_size,
                                 rank=info.rank, shuffle=True, seed=cfg.seed)
    per_epoch = len(sampler) * cfg.repeat  # images per rank and epoch
    steps_per_epoch = per_epoch // cfg.batch_size + (per_epoch % cfg.batch_size >= 2)
    if steps_per_epoch == 0:
        raise DataError(f"{len(train_s)} training image(s) over {info.world_size} process(es) "
                        "do not fill a batch of 2; add images or use fewer processes")
    total_steps = steps_per_epoch * cfg.epochs
    end_epoch = cfg.epochs if stop_after is None else min(cfg.epochs, start_epoch + stop_after)
    enabled = tuple(k for k, on in (("ce", model.classifier is not None), ("feat", True),
                                    ("img", model.image_decoder is not None)) if on)
    curves = cfg.loss.curves()
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=(end_epoch - start_epoch) * steps_per_epoch, unit="step",
                   desc="haloae-train", dynamic_ncols=True)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    data_info = {"root": str(data.resolve()), "layout": kind, "train_images": len(train_s),
                 "holdout_images": len(hold_s), "holdout_fraction": cfg.holdout_fraction}

    def train_info(epochs_done: int) -> dict:
        return {"epochs": epochs_done, "seed": cfg.seed, "data": data_info,
                "time_s": time_before + time.monotonic() - t_start,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "versions": _versions(), "history": history, "config": cfg.to_dict(),
                "world_size": info.world_size, "device": str(info.device)}

    for epoch in range(start_epoch, end_epoch):
        t_epoch = time.monotonic()
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch * 1009 + info.rank)
        order: list[int] = []
        for r in range(cfg.repeat):
            sampler.set_epoch(epoch * cfg.repeat + r)
            order += list(sampler)
        sums: dict[str, float] = {}
        n_steps, lr = 0, cfg.lr
        for b in range(steps_per_epoch):  # a lone leftover image is dropped (BatchNorm)
            idx = order[b * cfg.batch_size: (b + 1) * cfg.batch_size]
            step = epoch * steps_per_epoch + b
            weights = loss_weights(step / max(total_steps - 1, 1), curves, enabled)
            lr = _lr_at(cfg, step, total_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            parts = _step(model, heads, opt, scaler, images, cache, idx, gen, cfg, weights,
                          info.device, use_amp)
            for k, v in {**parts, **{f"a_{k}": v for k, v in weights.items()}}.items():
                sums[k] = sums.get(k, 0.0) + v
            n_steps += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"ep {epoch + 1}/{cfg.epochs} " + " ".join(
                    f"{k}={parts[k]:.3g}" for k in ("loss", "ce", "feat_mse", "feat_ssim",
                                                     "img_mse", "img_ssim") if k in parts))
        means = ddp.all_mean({k: v / max(n_steps, 1) for k, v in sums.items()}, info)
        row = {"epoch": epoch + 1, **means, "lr": lr, "epoch_s": time.monotonic() - t_epoch,
               "time_s": time_before + time.monotonic() - t_start}
        history.append({k: (float(v) if isinstance(v, float) else v) for k, v in row.items()})
        if info.is_main:
            _write_log(out / "log.csv", row)
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == end_epoch:
                save_checkpoint(out / "last.pt", model, None, train_info(epoch + 1), opt,
                                epoch + 1, {"scaler": scaler.state_dict()})
    if bar is not None:
        bar.close()
    if end_epoch < cfg.epochs:
        _LOG.info("stopped after epoch %d of %d; continue with --resume", end_epoch, cfg.epochs)
        return None, model
    final = None
    if not hold_s:
        _LOG.warning("holdout_fraction=0: calibrating on the training images; thresholds "
                     "will be too low (hold out some normal images)")
    if info.is_main:
        held = load_images(hold_s, model_cfg.hw, progress, cfg.num_workers) if hold_s else images
        pooled = cfg.gaussian_fit == "all" and bool(hold_s) and model.gaussian is not None
        if cfg.gaussian_fit == "all" and not pooled:
            _LOG.warning("gaussian_fit=all needs map.error=gaussian and held-out images; fitting "
                         "the Gaussian on the training images")
        if pooled:  # the Gaussian on every good image, each one then scored out of fold: the
            # held-out images' maps set the position statistics and the threshold floor, as
            # they would in the default, the training images' join the pooled quantile
            every = torch.cat([images, held])
            cache = None  # freed first: then the features of every good image, computed once
            cache = _feature_cache(model, every, cfg, info.device, progress)  # for all 6 fits
            gauss = fit_gaussian(model, every, cache, info.device, cfg.calib_batch_size, progress)
            every_maps = out_of_fold_maps(model, every, cache, None, info.device, cfg.calib_folds,
                                          cfg.seed, cfg.calib_batch_size, progress)
            oof, maps = every_maps[:len(images)], every_maps[len(images):]
        else:
            gauss = fit_gaussian(model, images, cache, info.device, cfg.calib_batch_size, progress)
            oof = out_of_fold_maps(model, images, cache, held, info.device, cfg.calib_folds,
                                   cfg.seed, cfg.calib_batch_size, progress) if hold_s else None
            maps = None
        final = _finish(model, cfg, held, oof, out, info,
                        lambda: {**train_info(cfg.epochs), "gaussian": gauss,
                                 "brightness_target": _brightness_target(model)}, progress, maps)
    ddp.barrier(info)
    return final, model


def _brightness_target(model: HaloAE) -> Optional[float]:
    """The mean every image is scaled to (``backbone.brightness: gain``), for the run record."""
    if model.cfg.backbone.brightness != "gain":
        return None
    return round(float(model.backbone.brightness_target), 4)


def _finish(model: HaloAE, cfg: TrainCfg, held: torch.Tensor, oof: Optional[torch.Tensor],
            out: Path, info: ddp.DistInfo, train_info: Callable[[], dict], progress: bool,
            maps: Optional[torch.Tensor] = None) -> Path:
    """Calibrate on the held-out normal images (uint8 [M, 3, H, W]) and the training images'
    out-of-fold maps ``oof`` (with ``gaussian_fit: all``: on ``maps``, the held-out images'
    out-of-fold maps, instead of their maps under the shipped Gaussian), then write final.pt."""
    batches = None
    if maps is None:
        starts = range(0, held.shape[0], cfg.calib_batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="calibrating", unit="batch", leave=False)
        batches = (scale_tensor(held[i: i + cfg.calib_batch_size]) for i in starts)
    cal = calibrate(model, batches, cfg.image_quantile, cfg.pixel_quantile, info.device, oof,
                    cfg.calib_folds, cfg.seed, maps)
    cal["images"] = int(held.shape[0])
    cal["gaussian_fit"] = "all" if maps is not None else "training"
    path = save_checkpoint(out / "final.pt", model, cal, train_info())
    model.train()
    return path


def _step(model: HaloAE, heads: nn.Module, opt, scaler, images: torch.Tensor,
          cache: Optional[torch.Tensor], idx: list[int], gen: torch.Generator, cfg: TrainCfg,
          weights: dict[str, float], device: torch.device, use_amp: bool) -> dict[str, float]:
    """One optimisation step on the images ``idx``; returns the logged loss parts."""
    it = torch.tensor(idx)
    clean = scale_tensor(images[it].to(device, non_blocking=True))  # B, 3, S, S
    a = cfg.augment
    x, labels, _ = augment_batch(clean, gen, a.p_cutpaste, a.p_scar, a.jitter)
    with torch.no_grad():
        target = cache[it.to(cache.device)] if cache is not None else model.extract(clean)
        feats_in = target.clone()
        aug = labels > 0  # B
        if bool(aug.any()):
            feats_in[aug] = model.extract(x[aug])
    if not a.denoise:  # plain auto-encoder: reconstruct what it sees
        target, clean = feats_in, x
    autocast = torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext()
    with autocast:
        recon, image, logits = heads(feats_in)
    loss, parts = haloae_loss(weights, logits, labels, recon, target, image, clean,
                              cfg.loss.feat_ssim_range)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.trainable_parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    return parts
