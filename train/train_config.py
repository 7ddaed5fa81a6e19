"""Training-run configuration (``configs/train/*.yaml``): pydantic schemas loaded from YAML.

Unknown keys and wrongly typed values raise `ConfigError` naming the key path
(e.g. ``loss.ce.steep``) when the file is read. The model architecture is a separate model
config (``configs/model/<name>.yaml``) that ``model`` names. A training config is a YAML path
or the name of a shipped one (``tiny``, ``mtd-edge``, ``synthetic-edge``). See docs/training.md.

The loss-weight curves are defined here once (`LogisticCurve`, `DEFAULT_CURVES`): the paper's
adaptive weights a1..a3 that `loss.loss_weights` normalises.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import Field, field_validator

from haloae import named_configs
from haloae.yaml_file import read_yaml

from .config import Cfg, ConfigError, ModelCfg, load_model_config

# The reference implementation's curves for its 250 epochs in progress units
# (mid = c / (2 * 250), steep = d * 250): the classifier dominates early, feature
# reconstruction in the middle, image reconstruction at the end.
DEFAULT_CURVES: dict[str, dict[str, float]] = {
    "ce": {"start": 1.0, "end": 0.4, "mid": 0.16, "steep": 17.5},    # a1: Cut&Paste cross-entropy
    "feat": {"start": 0.0, "end": 1.2, "mid": 0.30, "steep": 12.5},  # a2: feature MSE + 1 - SSIM
    "img": {"start": 0.0, "end": 2.0, "mid": 0.60, "steep": 12.5},   # a3: image MSE + 1 - SSIM
}


class LogisticCurve(Cfg):
    """One inverse-logistic loss-weight curve of the progress p in [0, 1]:
    w(p) = end + (start - end) / (1 + exp(steep (p - mid)))."""

    start: float = Field(description="raw weight at p -> -inf (about the value at p = 0)")
    end: float = Field(description="raw weight at p -> +inf (about the value at p = 1)")
    mid: float = Field(description="progress (0..1) of the half-way point")
    steep: float = Field(description="steepness (per unit of progress)")

    def __call__(self, p: float) -> float:
        z = max(min(self.steep * (p - self.mid), 60.0), -60.0)  # no overflow
        return self.end + (self.start - self.end) / (1.0 + math.exp(z))


def default_curves() -> dict[str, LogisticCurve]:
    """The reference curves (a1 ce, a2 feat, a3 img) in progress units."""
    return {k: LogisticCurve(**v) for k, v in DEFAULT_CURVES.items()}


class AugmentCfg(Cfg):
    """Cut&Paste self-supervision (Block E labels) applied to training inputs."""

    p_cutpaste: float = Field(1 / 3, ge=0, le=1, description="probability that an image gets a cut-paste "
                                                             "patch (label 1)")
    p_scar: float = Field(1 / 3, ge=0, le=1, description="probability of a scar (label 2); the rest stay "
                                                         "normal (label 0)")
    jitter: float = Field(0.1, ge=0, description="brightness / contrast / saturation jitter of pasted patches")
    denoise: bool = Field(True, description="reconstruct the CLEAN features / image from augmented inputs")


class LossCfg(Cfg):
    """Loss weights a1 (ce), a2 (feat), a3 (img) as curves of training progress. A curve given in
    part (``ce: {steep: 5}``) keeps the default of its other keys."""

    ce: LogisticCurve = Field(default_factory=lambda: default_curves()["ce"],
                              description="a1: Cut&Paste cross-entropy")
    feat: LogisticCurve = Field(default_factory=lambda: default_curves()["feat"],
                                description="a2: feature MSE + 1 - SSIM")
    img: LogisticCurve = Field(default_factory=lambda: default_curves()["img"],
                               description="a3: image MSE + 1 - SSIM")
    feat_ssim_range: float = Field(1.0, gt=0, description="SSIM data range for feature maps (sets its C1, C2)")

    @field_validator("ce", "feat", "img", mode="before")
    @classmethod
    def _over_default(cls, v: Any, info) -> Any:
        return {**DEFAULT_CURVES[info.field_name], **v} if isinstance(v, dict) else v

    def curves(self) -> dict[str, LogisticCurve]:
        return {"ce": self.ce, "feat": self.feat, "img": self.img}


class TrainCfg(Cfg):
    """One training run."""

    model: str = Field("edge", description="model config: a shipped name (edge, tiny, paper) or a YAML path "
                                           "(relative to this file or the working directory)")
    model_overrides: dict = Field(default_factory=dict,
                                  description="keys of the model config to change for this run, e.g. "
                                              "{image_decoder_widths: [48, 24, 12]}")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=2, description="use 2 or more (BatchNorm)")
    repeat: int = Field(1, ge=1, description="passes over the training images per epoch (small data sets)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(1e-5, ge=0)
    warmup_steps: int = Field(20, ge=0, description="linear warm-up, then cosine decay to lr * min_lr_ratio")
    min_lr_ratio: float = Field(0.05, ge=0, le=1)
    grad_clip: float = Field(5.0, ge=0, description="max gradient norm; 0 = off")
    seed: int = 0
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="of the good training images, kept for "
                                                                 "calibration")
    image_quantile: float = Field(0.99, gt=0, le=1, description="image threshold = this quantile of held-out "
                                                                "normal scores")
    pixel_quantile: float = Field(0.999, gt=0, le=1, description="pixel threshold = this quantile of held-out "
                                                                 "map pixels")
    augment: AugmentCfg = Field(default_factory=AugmentCfg)
    loss: LossCfg = Field(default_factory=LossCfg)
    checkpoint_every: int = Field(1, ge=1, description="epochs between resumable RUN_DIR/last.pt writes")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 = torch's default")
    num_workers: int = Field(0, ge=0, description="image-loading threads (training and held-out images); 0 = none")
    cache_features: bool = Field(True, description="compute clean-image backbone features once, not every step")
    cache_max_gb: float = Field(4.0, ge=0, description="above this the cache is skipped (features recomputed)")
    amp: bool = Field(True, description="fp16 autocast + GradScaler on CUDA (ignored on CPU)")
    calib_batch_size: int = Field(8, ge=1)
    calib_folds: int = Field(5, ge=2, description="cross-fitting folds of the calibration: held-out "
                                                  "images scored with the position statistics of the "
                                                  "others, training images with a Gaussian fitted "
                                                  "without them (docs/training.md, Calibration)")
    gaussian_fit: Literal["training", "all"] = Field(
        "training", description="map.error gaussian: fit the position-wise Gaussian on the training "
        "images (the held-out ones then set the position statistics and threshold), or on all "
        "good images, every image then scored out of fold for the calibration: +0.02 image "
        "AUROC with 133-267 good images, lower AUPRO (docs/training.md, How many training images?)")

    def model_post_init(self, context: Any) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` when values do not fit together (each value alone is checked by
        the schema, at construction and at every assignment)."""
        a = self.augment
        if a.p_cutpaste + a.p_scar > 1:
            raise ConfigError(f"augment.p_cutpaste + augment.p_scar = {a.p_cutpaste + a.p_scar:g}: "
                              "use probabilities with a sum <= 1")


def load_train_config(path_or_name: Union[str, Path]) -> TrainCfg:
    """Read and validate a training config: a YAML path or a shipped name (``tiny``)."""
    source = named_configs.resolve("train", path_or_name)
    if source is None:
        raise ConfigError(f"train config {str(path_or_name)!r} not found: pass a YAML path or one of "
                          f"{named_configs.names('train')}")
    where = source if isinstance(source, Path) else f"train config {str(path_or_name)!r}"
    try:
        data = read_yaml(source)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        cfg = TrainCfg.from_dict({} if data is None else data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    model = Path(cfg.model)
    if isinstance(source, Path) and not model.is_absolute() and (source.parent / model).is_file():
        cfg.model = str(source.parent / model)
    try:
        resolve_model_config(cfg)  # the model it names loads: a typo fails now, not after a run
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
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
        raise ConfigError(f"model_overrides: {exc}") from None

