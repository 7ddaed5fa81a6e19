"""HaloAE (Mathian et al., "HaloAE: An HaloNet based Local Transformer Auto-Encoder for Anomaly
Detection and Localization", arXiv 2208.03486): Blocks A, C, D, E and `create_model()`.

- Block A `FeatureExtractor` (backbones.py): frozen multi-scale CNN features F [N, C, g, g].
- Block C `HaloAutoEncoder`: HaloNet encoder/decoder reconstructing F (stride-2 bottleneck).
- Block D `ImageDecoder`: transposed-VGG decoder, reconstructed features -> image in [0, 1].
- Block E `CutPasteClassifier`: normal / cut-paste / scar logits on the reconstructed image.

Input everywhere: float RGB in [0, 1], NCHW, ``cfg.hw`` = (height, width). Only A + C (+ the
anomaly map and its calibration) run at inference; D and E are training heads.
"""
from __future__ import annotations

import logging
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FeatureExtractor
from .calibration import Calibration
from .config import HaloCfg, ModelCfg
from .halo_attention import HaloAttention
from .position_gaussian import PositionGaussian

_LOG = logging.getLogger(__name__)


def _conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, act: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class HaloBlock(nn.Module):
    """HaloNet bottleneck block: 1x1 conv -> HaloAttention -> 1x1 conv, residual, ReLU."""

    def __init__(self, dim: int, feat_size: Union[int, tuple[int, int]], cfg: HaloCfg,
                 block_size: Optional[int] = None, halo_size: Optional[int] = None) -> None:
        super().__init__()
        dh = cfg.dim_head or dim // cfg.heads
        b = cfg.block_size if block_size is None else block_size
        h = cfg.halo_size if halo_size is None else halo_size
        self.conv1 = _conv_bn(dim, dim)
        self.attn = HaloAttention(dim, feat_size, cfg.heads, dh, b, h, cfg.qkv_bias)
        self.norm = nn.Sequential(nn.BatchNorm2d(cfg.heads * dh), nn.ReLU())
        self.conv2 = _conv_bn(cfg.heads * dh, dim, act=False)
        nn.init.zeros_(self.conv2[1].weight)  # block starts as identity (stable training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.norm(self.attn(self.conv1(x))))
        return F.relu(x + y)


class HaloAutoEncoder(nn.Module):
    """Block C: [N, C, gh, gw] -> [N, C, gh, gw] through ``levels - 1`` stride-2 stages.

    Level 0 runs at the feature grid with width ``dim``; every lower level halves the grid at
    width ``bottleneck_dim``. ``levels: 2`` is the paper's shape (one bottleneck at grid / 2).
    ``sides`` / ``blocks``: grid (h, w) and (block size, halo) per level (`ModelCfg`).
    """

    def __init__(self, in_channels: int, sides: list[tuple[int, int]],
                 blocks: list[tuple[int, int]], cfg: HaloCfg) -> None:
        super().__init__()
        widths = [cfg.dim] + [cfg.bottleneck_dim] * (len(sides) - 1)

        def halo(level: int) -> list[nn.Module]:
            b, h = blocks[level]
            return [HaloBlock(widths[level], sides[level], cfg, b, h) for _ in range(cfg.depth)]

        enc: list[nn.Module] = [_conv_bn(in_channels, cfg.dim), *halo(0)]
        for lvl in range(1, len(sides)):  # downsample: the code cannot copy F
            enc += [_conv_bn(widths[lvl - 1], widths[lvl], k=3, stride=2), *halo(lvl)]
        dec: list[nn.Module] = []
        for lvl in range(len(sides) - 1, 0, -1):
            dec += [*halo(lvl), nn.ConvTranspose2d(widths[lvl], widths[lvl - 1], 2, stride=2,
                                                   bias=False),
                    nn.BatchNorm2d(widths[lvl - 1]), nn.ReLU()]
        dec += [*halo(0), nn.Conv2d(cfg.dim, in_channels, 1)]  # linear: features may be < 0
        self.encoder = nn.Sequential(*enc)
        self.decoder = nn.Sequential(*dec)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(feats))


class ImageDecoder(nn.Module):
    """Block D: transposed-VGG decoder, [N, C, g, g] -> image [N, 3, S, S] in [0, 1]."""

    def __init__(self, in_channels: int, widths: list[int]) -> None:
        super().__init__()
        stages, cin = [], in_channels
        for w in widths:  # each stage: x2 upsample then a VGG 3x3 conv
            stages += [nn.ConvTranspose2d(cin, w, 2, stride=2, bias=False), nn.BatchNorm2d(w),
                       nn.ReLU(), _conv_bn(w, w, k=3)]
            cin = w
        stages.append(nn.Conv2d(cin, 3, 3, padding=1))
        self.net = nn.Sequential(*stages)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(feats))


class CutPasteClassifier(nn.Module):
    """Block E: image [N, 3, S, S] -> logits [N, 3] (0 normal, 1 cut-paste, 2 scar)."""

    def __init__(self, widths: list[int], num_classes: int = 3) -> None:
        super().__init__()
        layers, cin = [], 3
        for w in widths:
            layers.append(_conv_bn(cin, w, k=3, stride=2))
            cin = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, img01: torch.Tensor) -> torch.Tensor:
        x = self.features(img01 * 2.0 - 1.0)
        return self.head(x.mean(dim=(2, 3)))  # global average pool -> [N, cin]


class HaloAE(nn.Module):
    """The HaloAE model (Blocks A, C, D, E); build it with `create_model()`."""

    def __init__(self, cfg: ModelCfg, pretrained: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = FeatureExtractor(cfg.backbone, cfg.hw, pretrained=pretrained)
        c = self.backbone.out_channels
        self.feature_channels = c
        self.autoencoder = HaloAutoEncoder(c, cfg.level_sides(), cfg.level_blocks(), cfg.halo)
        # anomaly-map statistics and thresholds (buffers; fitted after training)
        # map.fine_weight: the finer layers' channels (all but the last) also give their own distance
        fine = self.backbone.finer_channels if cfg.map.fine_weight > 0 else 0
        self.gaussian = PositionGaussian.for_config(c, cfg, fine) if cfg.map.error == "gaussian" else None
        self.calibration = Calibration(cfg.backbone.grid_hw, self.gaussian.maps if self.gaussian else 1)
        self.image_decoder = ImageDecoder(c, cfg.image_decoder_widths) if cfg.image_decoder else None
        self.classifier = CutPasteClassifier(cfg.classifier_widths) if cfg.classifier else None

    def train(self, mode: bool = True) -> "HaloAE":
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm statistics of Block A never update
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters of Blocks C, D, E (the backbone is frozen): pass these to the optimizer."""
        return [p for p in self.parameters() if p.requires_grad]

    def check_input(self, x01: torch.Tensor) -> None:
        h, w = self.cfg.hw
        if x01.dim() != 4 or x01.shape[1] != 3 or tuple(x01.shape[-2:]) != (h, w):
            raise ValueError(f"HaloAE '{self.cfg.name}' expects RGB float in [0, 1] shaped "
                             f"[N, 3, {h}, {w}], got {list(x01.shape)}: resize the image to "
                             f"{w}x{h} (width x height) and convert HWC uint8 to NCHW / 255")

    def extract(self, x01: torch.Tensor) -> torch.Tensor:
        """Block A: RGB [0, 1] [N, 3, H, W] -> frozen features F [N, C, gh, gw]."""
        self.check_input(x01)
        with torch.no_grad():
            return self.backbone(x01)

    def reconstruct(self, feats: torch.Tensor) -> torch.Tensor:
        """Block C: F [N, C, g, g] -> F_hat [N, C, g, g]."""
        return self.autoencoder(feats)

    def decode_image(self, recon: torch.Tensor) -> torch.Tensor:
        """Block D: F_hat -> reconstructed image [N, 3, S, S] in [0, 1]."""
        if self.image_decoder is None:
            raise RuntimeError(f"model '{self.cfg.name}' has no image decoder "
                               "(set image_decoder: true in its config)")
        return self.image_decoder(recon)

    def classify(self, img01: torch.Tensor) -> torch.Tensor:
        """Block E: image [N, 3, S, S] in [0, 1] -> logits [N, 3] (normal, cut-paste, scar)."""
        if self.classifier is None:
            raise RuntimeError(f"model '{self.cfg.name}' has no classifier "
                               "(set classifier: true in its config)")
        return self.classifier(img01)

    def forward(self, x01: torch.Tensor) -> dict[str, Optional[torch.Tensor]]:
        feats = self.extract(x01)
        recon = self.reconstruct(feats)
        image = self.decode_image(recon) if self.image_decoder is not None else None
        logits = self.classify(image) if (self.classifier is not None and image is not None) else None
        return {"features": feats, "recon": recon, "image": image, "logits": logits}


def create_model(cfg: ModelCfg, device=None, dtype=None, pretrained: bool = True) -> HaloAE:
    """Build a `HaloAE` from its config.

    ``pretrained=False`` skips reading backbone weights: use it when a checkpoint's
    ``state_dict`` (which holds the backbone too) is loaded right after.
    """
    model = HaloAE(cfg, pretrained=pretrained)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    n = sum(p.numel() for p in model.trainable_parameters())
    gh, gw = cfg.backbone.grid_hw
    _LOG.info("HaloAE %s: %d feature channels at %dx%d, %.2fM trainable parameters",
              cfg.name, model.feature_channels, gh, gw, n / 1e6)
    return model
