"""HaloAE loss (Mathian et al., arXiv 2208.03486): SSIM, the loss terms and the paper's
adaptive inverse-logistic weights.

    loss = a1 * CE(logits, cut-paste labels)
         + a2 * (MSE(F_hat, F) + 1 - SSIM(F_hat, F))          # Block C, feature map
         + a3 * (MSE(I_hat, I) + 1 - SSIM(I_hat, I))          # Block D, image

The weights follow inverse-logistic curves of the training progress p in [0, 1] (so a short
run gets the whole curve), normalised to sum to 1:

    w_i(p) = end_i + (start_i - end_i) / (1 + exp(steep_i * (p - mid_i)))
    a_i(p) = w_i(p) / sum_j w_j(p)

The curves and their defaults (the reference implementation's, in progress units) are defined
once, in `train_config` (`LogisticCurve`, `DEFAULT_CURVES`); a run's are ``TrainCfg.loss``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Callable, Mapping

import torch
import torch.nn.functional as F


def loss_weights(p: float, curves: Mapping[str, Callable[[float], float]],
                 enabled: tuple[str, ...] = ("ce", "feat", "img")) -> dict[str, float]:
    """Normalised weights {term: a} at progress ``p`` (clipped to [0, 1]) over the enabled
    terms; a disabled term (no classifier / no image decoder) gets 0."""
    p = min(max(float(p), 0.0), 1.0)
    raw = {k: max(curves[k](p), 0.0) if k in enabled else 0.0 for k in ("ce", "feat", "img")}
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"loss weights all zero at progress {p}: check the loss curves")
    return {k: v / total for k, v in raw.items()}


@lru_cache(maxsize=16)
def _gauss_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    return g / g.sum()


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian blur per channel: [N, C, H, W] -> [N, C, H-s+1, W-s+1]."""
    C, size = x.shape[1], g.numel()
    kh = g.reshape(1, 1, size, 1).repeat(C, 1, 1, 1)
    kw = g.reshape(1, 1, 1, size).repeat(C, 1, 1, 1)
    return F.conv2d(F.conv2d(x, kh, groups=C), kw, groups=C)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5,
         data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of [N, C, H, W] tensors (any C: images or feature maps), Gaussian window,
    'valid' filtering (the window shrinks to fit small maps). Computed in float32."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim needs two [N, C, H, W] tensors of one shape, got "
                         f"{list(a.shape)} and {list(b.shape)}")
    a, b = a.float(), b.float()
    C, (H, W) = a.shape[1], a.shape[-2:]
    size = min(window, H, W)
    size -= 1 - size % 2  # odd
    g = _gauss_1d(size, sigma).to(a.device)
    moments = [a, b, a * a, b * b, a * b]
    if H * W >= 4096:  # images: one channels-last depthwise blur of all five (2x faster on CPU)
        x = torch.cat(moments, dim=1).contiguous(memory_format=torch.channels_last)  # N, 5C, H, W
        mu_a, mu_b, aa, bb, ab = _blur(x, g).split(C, dim=1)
    else:  # small many-channel feature maps: five separate blurs are faster
        mu_a, mu_b, aa, bb, ab = (_blur(m, g) for m in moments)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    var_a = aa - mu_a ** 2
    var_b = bb - mu_b ** 2
    cov = ab - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean()


def reconstruction_terms(pred: torch.Tensor, target: torch.Tensor,
                         data_range: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(MSE, 1 - SSIM) of a reconstruction against its target."""
    return F.mse_loss(pred.float(), target.float()), 1.0 - ssim(pred, target,
                                                                 data_range=data_range)


def haloae_loss(weights: dict[str, float], logits: torch.Tensor | None, labels: torch.Tensor,
                recon: torch.Tensor, feats: torch.Tensor, image: torch.Tensor | None,
                clean: torch.Tensor,
                feat_range: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted total loss and its parts {ce, feat_mse, feat_ssim, img_mse, img_ssim, loss}.

    ``feats`` and ``clean`` are the reconstruction targets (the CLEAN image's features and
    the clean image), whatever the input was.
    """
    parts: dict[str, torch.Tensor] = {}
    total = recon.new_zeros((), dtype=torch.float32)
    if logits is not None:  # every head present gets a term (DDP needs all gradients)
        parts["ce"] = F.cross_entropy(logits.float(), labels)
        total = total + weights.get("ce", 0.0) * parts["ce"]
    parts["feat_mse"], parts["feat_ssim"] = reconstruction_terms(recon, feats, feat_range)
    total = total + weights["feat"] * (parts["feat_mse"] + parts["feat_ssim"])
    if image is not None:
        parts["img_mse"], parts["img_ssim"] = reconstruction_terms(image, clean)
        total = total + weights.get("img", 0.0) * (parts["img_mse"] + parts["img_ssim"])
    logged = {k: float(v.detach()) for k, v in parts.items()}
    logged["loss"] = float(total.detach())
    return total, logged
