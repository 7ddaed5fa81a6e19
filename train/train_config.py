"""Training-run configuration (``configs/train/*.yaml``): dataclasses loaded from YAML.

Unknown keys and wrongly typed values raise `ConfigError` naming the key path
(e.g. ``loss.ce.steep``). The model architecture is a separate model config
(``configs/model/<name>.yaml``) that ``model`` names. See docs/training.md.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .config import ConfigError, ModelCfg, load_model_config
from .loss import LogisticCurve, default_curves


@dataclass
class AugmentCfg:
    """Cut&Paste self-supervision (Block E labels) applied to training inputs."""

    p_cutpaste: float = 1 / 3  # probability that an image gets a cut-paste patch (label 1)
    p_scar: float = 1 / 3  # probability of a scar (label 2); the rest stay normal (label 0)
    jitter: float = 0.1  # brightness / contrast / saturation jitter of pasted patches
    denoise: bool = True  # reconstruct the CLEAN features / image from augmented inputs


@dataclass
class CurveCfg:
    """One inverse-logistic loss-weight curve: w(p) = end + (start - end) / (1 + exp(steep (p - mid)))."""

    start: float = 1.0
    end: float = 1.0
    mid: float = 0.5  # progress (0..1) of the half-way point
    steep: float = 10.0

    def curve(self) -> LogisticCurve:
        return LogisticCurve(self.start, self.end, self.mid, self.steep)


def _curve(name: str) -> CurveCfg:
    c = default_curves()[name]
    return CurveCfg(c.start, c.end, c.mid, c.steep)


@dataclass
class LossCfg:
    """Loss weights a1 (ce), a2 (feat), a3 (img) as curves of training progress."""

    ce: CurveCfg = field(default_factory=lambda: _curve("ce"))  # a1: Cut&Paste cross-entropy
    feat: CurveCfg = field(default_factory=lambda: _curve("feat"))  # a2: feature MSE + 1 - SSIM
    img: CurveCfg = field(default_factory=lambda: _curve("img"))  # a3: image MSE + 1 - SSIM
    feat_ssim_range: float = 1.0  # SSIM data range for feature maps (sets its C1, C2)

    def curves(self) -> dict[str, LogisticCurve]:
        return {"ce": self.ce.curve(), "feat": self.feat.curve(), "img": self.img.curve()}


@dataclass
class TrainCfg:
    """One training run."""

    model: str = "edge"  # model config: a name in configs/model or a YAML path (relative to this file or cwd)
    model_overrides: dict = field(default_factory=dict)  # keys of the model config to change for this run, e.g. {image_decoder_widths: [48, 24, 12]}
    epochs: int = 30
    batch_size: int = 8
    repeat: int = 1  # passes over the training images per epoch (small data sets)
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 1e-5
    warmup_steps: int = 20  # linear warm-up, then cosine decay to lr * min_lr_ratio
    min_lr_ratio: float = 0.05
    grad_clip: float = 5.0  # max gradient norm; 0 = off
    seed: int = 0
    holdout_fraction: float = 0.1  # of the good training images, kept for calibration
    image_quantile: float = 0.99  # image threshold = this quantile of held-out normal scores
    pixel_quantile: float = 0.999  # pixel threshold = this quantile of held-out map pixels
    augment: AugmentCfg = field(default_factory=AugmentCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    checkpoint_every: int = 1  # epochs between resumable RUN_DIR/last.pt writes
    threads: int = 0  # torch CPU threads; 0 = torch's default
    num_workers: int = 0  # image-loading worker processes (calibration)
    cache_features: bool = True  # compute clean-image backbone features once, not every step
    cache_max_gb: float = 4.0  # above this the cache is skipped (features recomputed)
    amp: bool = True  # fp16 autocast + GradScaler on CUDA (ignored on CPU)
    calib_batch_size: int = 8

    def validate(self) -> None:
        checks = [("epochs", self.epochs >= 1, "use 1 or more"),
                  ("batch_size", self.batch_size >= 2, "use 2 or more (BatchNorm)"),
                  ("repeat", self.repeat >= 1, "use 1 or more"),
                  ("lr", self.lr > 0, "use a positive learning rate"),
                  ("holdout_fraction", 0 <= self.holdout_fraction < 1, "use 0 <= f < 1"),
                  ("image_quantile", 0 < self.image_quantile <= 1, "use a quantile in (0, 1]"),
                  ("pixel_quantile", 0 < self.pixel_quantile <= 1, "use a quantile in (0, 1]"),
                  ("checkpoint_every", self.checkpoint_every >= 1, "use 1 or more"),
                  ("threads", self.threads >= 0, "use 0 (default) or more"),
                  ("augment.p_cutpaste + augment.p_scar",
                   self.augment.p_cutpaste >= 0 and self.augment.p_scar >= 0
                   and self.augment.p_cutpaste + self.augment.p_scar <= 1,
                   "use probabilities >= 0 with a sum <= 1")]
        for key, ok, hint in checks:
            if not ok:
                raise ConfigError(f"train config: {key} has an invalid value: {hint}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true/false", str: "a string",
               dict: "a mapping"}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Union:  # Optional[...]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if dataclasses.is_dataclass(typ):
        return from_dict(typ, value, key)
    ok = (isinstance(value, typ) and not (typ is int and isinstance(value, bool))) or \
        (typ is float and isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise ConfigError(f"train config: {key} must be {_TYPE_NAMES.get(typ, typ)}, "
                          f"got {value!r}")
    return float(value) if typ is float else value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys name their key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"train config: {path or 'the file'} must be a mapping, got "
                          f"{type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            raise ConfigError(f"train config: unknown key '{full}'; valid keys"
                              f"{' in ' + path if path else ''}: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


def load_train_config(path: Union[str, Path]) -> TrainCfg:
    """Read and validate a training config YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train config {path} not found; see configs/train/ for examples")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    try:
        cfg = from_dict(TrainCfg, data)
        cfg.validate()
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    model = Path(cfg.model)
    if not model.is_absolute() and (path.parent / model).is_file():
        cfg.model = str(path.parent / model)
    return cfg


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def resolve_model_config(cfg: TrainCfg) -> ModelCfg:
    """The `ModelCfg` that ``cfg.model`` names, with ``cfg.model_overrides`` applied."""
    model = load_model_config(cfg.model)
    if not cfg.model_overrides:
        return model
    try:
        return ModelCfg.from_dict(_merge(model.to_dict(), cfg.model_overrides))
    except ConfigError as exc:
        raise ConfigError(f"train config: model_overrides: {exc}") from exc

