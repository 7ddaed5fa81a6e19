"""Checkpoints of HaloAE runs: a ``torch.save`` of tensors and plain Python values only, so
``torch.load(path, weights_only=True)`` loads them (never an arbitrary pickle).

Layout (docs/architecture.md)::

    {"format": "haloae-checkpoint", "version": 1,
     "config": ModelCfg as dict, "state_dict": {...}, "calibration": {...} | None,
     "train": {"epochs", "seed", "data", "time_s", "created", "versions", "history", ...},
     "epoch": int, "optimizer": {...}, "resume": {...}}   # last three in resumable ones only

Writes are atomic (temporary file + rename), so an interrupted run never leaves a torn file.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from haloae.errors import UserError

from .config import ConfigError, ModelCfg
from .torch_model import HaloAE, create_model

_LOG = logging.getLogger(__name__)

FORMAT, VERSION = "haloae-checkpoint", 1
PathLike = Union[str, Path]


class CheckpointError(UserError, ValueError):
    """A checkpoint file is missing, unreadable or not a HaloAE checkpoint."""


def _plain(value: Any) -> Any:
    """Tensors to CPU, numpy / tuples to plain lists: what weights_only loading accepts."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None:
        return None
    for base in (bool, int, float, str):  # subclasses too (torch.__version__ is a str subclass)
        if isinstance(value, base):
            return base(value)
    if hasattr(value, "tolist"):  # numpy scalar or array
        return _plain(value.tolist())
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot store {type(value).__name__} in a weights-only checkpoint")


def _unwrap(model: nn.Module) -> HaloAE:
    return getattr(model, "module", model)  # DistributedDataParallel -> HaloAE


def save_checkpoint(path: PathLike, model: nn.Module, calibration: Optional[dict],
                    train_info: dict, optimizer: Optional[torch.optim.Optimizer] = None,
                    epoch: Optional[int] = None, resume: Optional[dict] = None) -> Path:
    """Write a checkpoint atomically. ``optimizer``, ``epoch`` and ``resume`` (scaler and
    other loop state) make it resumable."""
    path = Path(path)
    model = _unwrap(model)
    ckpt: dict[str, Any] = {
        "format": FORMAT, "version": VERSION,
        "config": _plain(model.cfg.to_dict()),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "calibration": _plain(calibration) if calibration is not None else None,
        "train": _plain(train_info),
    }
    if epoch is not None:
        ckpt["epoch"] = int(epoch)
    if optimizer is not None:
        ckpt["optimizer"] = _plain(optimizer.state_dict())
    if resume is not None:
        ckpt["resume"] = _plain(resume)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    _LOG.info("checkpoint %s (epoch %s)", path, epoch)
    return path


def read_checkpoint(path: PathLike) -> dict:
    """The checkpoint dict (tensors on CPU), loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: pass the final.pt (or last.pt) "
                              "that haloae-train wrote into its --out folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path} is not a readable HaloAE checkpoint ({type(exc).__name__}:"
                              f" {str(exc).splitlines()[0] if str(exc) else ''}); use a "
                              "final.pt written by haloae-train") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a HaloAE checkpoint (no format "
                              f"'{FORMAT}'); use a final.pt written by haloae-train")
    if int(ckpt.get("version", 0)) > VERSION:
        raise CheckpointError(f"{path} has checkpoint version {ckpt['version']}, this haloae "
                              f"reads up to {VERSION}: upgrade haloae")
    return ckpt


def model_from_checkpoint(ckpt: dict, device: Any = "cpu", source: str = "checkpoint") -> HaloAE:
    """Build the model of a checkpoint dict and load its weights (eval mode)."""
    try:
        cfg = ModelCfg.from_dict(ckpt["config"])
    except (KeyError, ConfigError) as exc:
        raise CheckpointError(f"{source}: its model config is missing or invalid ({exc})") from exc
    model = create_model(cfg, pretrained=False)
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except (KeyError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:400]
        raise CheckpointError(f"{source}: weights do not match its model config, probably "
                              f"written by another haloae version ({detail})") from exc
    return model.to(device).eval()


def load_checkpoint(path: PathLike, device: Any = "cpu") -> tuple[HaloAE, dict]:
    """Load ``(model in eval mode on device, checkpoint dict)``; raises `CheckpointError`."""
    ckpt = read_checkpoint(path)
    return model_from_checkpoint(ckpt, device, str(path)), ckpt
