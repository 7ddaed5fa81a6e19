"""Cut&Paste self-supervision for HaloAE's Block E (Mathian et al., arXiv 2208.03486), after
Li et al., "CutPaste: Self-Supervised Learning for Anomaly Detection and Localization"
(arXiv 2104.04015).

Two synthetic defects on RGB images in [0, 1] (torch, CHW), each drawn from a
``torch.Generator`` so runs are reproducible:

- **cut-paste** (label 1): a rectangle (2-15 % of the image area, aspect 0.3-3.3) is cut,
  colour-jittered and pasted at another random place;
- **scar** (label 2): a thin rectangle (2-16 px wide, 10-25 px long at 256 px, scaled with the
  image size) is cut, colour-jittered, rotated by -45..45 degrees and pasted.

Colour jitter is brightness, contrast and saturation (+-``jitter``); no hue change, so grey
images stay grey. `augment_batch` picks per image normal (0) / cut-paste (1) / scar (2).
"""
from __future__ import annotations

import math

import torch


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _randint(gen: torch.Generator, lo: int, hi: int) -> int:
    """Integer in [lo, hi] (inclusive)."""
    return int(torch.randint(lo, hi + 1, (), generator=gen))


def color_jitter(patch: torch.Tensor, gen: torch.Generator, jitter: float) -> torch.Tensor:
    """Brightness, contrast and saturation jitter (factors 1 +- jitter) of [3, h, w] in [0, 1]."""
    if jitter <= 0:
        return patch
    b, c, s = (_uniform(gen, 1 - jitter, 1 + jitter) for _ in range(3))
    x = patch * b
    mean = x.mean()
    x = (x - mean) * c + mean
    grey = x.mean(dim=0, keepdim=True)  # 1, h, w
    x = (x - grey) * s + grey
    return x.clamp(0.0, 1.0)


def cut_paste(img: torch.Tensor, gen: torch.Generator, area: tuple[float, float] = (0.02, 0.15),
              aspect: tuple[float, float] = (0.3, 3.3),
              jitter: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut&Paste on one image [3, H, W]: returns (image, mask [1, H, W] with 1 on the patch)."""
    _, H, W = img.shape
    a = _uniform(gen, *area) * H * W
    r = math.exp(_uniform(gen, math.log(aspect[0]), math.log(aspect[1])))
    h = int(min(max(round(math.sqrt(a * r)), 2), H - 1))
    w = int(min(max(round(math.sqrt(a / r)), 2), W - 1))
    sy, sx = _randint(gen, 0, H - h), _randint(gen, 0, W - w)
    dy, dx = _randint(gen, 0, H - h), _randint(gen, 0, W - w)
    patch = color_jitter(img[:, sy: sy + h, sx: sx + w], gen, jitter)
    out = img.clone()
    out[:, dy: dy + h, dx: dx + w] = patch
    mask = torch.zeros((1, H, W), dtype=img.dtype, device=img.device)
    mask[:, dy: dy + h, dx: dx + w] = 1.0
    return out, mask


def scar(img: torch.Tensor, gen: torch.Generator, width: tuple[float, float] = (2, 16),
         length: tuple[float, float] = (10, 25), angle: tuple[float, float] = (-45, 45),
         jitter: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """CutPaste-Scar on one image [3, H, W] (sizes in px at 256, scaled): (image, mask)."""
    _, H, W = img.shape
    k = min(H, W) / 256.0
    w = max(1.0, _uniform(gen, *width) * k)
    ln = max(2.0, _uniform(gen, *length) * k)
    theta = math.radians(_uniform(gen, *angle))
    half = math.ceil(math.hypot(w, ln) / 2) + 1  # rotated scar fits in this radius
    cy, cx = _randint(gen, half, H - 1 - half), _randint(gen, half, W - 1 - half)
    sy, sx = _randint(gen, half, H - 1 - half), _randint(gen, half, W - 1 - half)
    yy = torch.arange(H, device=img.device, dtype=torch.float32).reshape(H, 1) - cy
    xx = torch.arange(W, device=img.device, dtype=torch.float32).reshape(1, W) - cx
    u = xx * math.cos(theta) + yy * math.sin(theta)  # H, W: across the scar
    v = -xx * math.sin(theta) + yy * math.cos(theta)  # H, W: along the scar
    inside = (u.abs() <= w / 2) & (v.abs() <= ln / 2)  # H, W
    src_y = (v + sy).round().long().clamp(0, H - 1)  # axis-aligned source rectangle
    src_x = (u + sx).round().long().clamp(0, W - 1)
    source = color_jitter(img[:, src_y, src_x], gen, jitter)  # 3, H, W (rotated copy)
    out = torch.where(inside[None], source, img)
    return out, inside[None].to(img.dtype)


def augment_batch(images: torch.Tensor, gen: torch.Generator, p_cutpaste: float = 1 / 3,
                  p_scar: float = 1 / 3,
                  jitter: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per image: normal / cut-paste / scar with the given probabilities.

    ``images`` [B, 3, H, W] in [0, 1] -> (images [B, 3, H, W], labels [B] long in {0, 1, 2},
    masks [B, 1, H, W]); normal images are returned unchanged (same values).
    """
    if p_cutpaste < 0 or p_scar < 0 or p_cutpaste + p_scar > 1:
        raise ValueError(f"p_cutpaste={p_cutpaste}, p_scar={p_scar}: need both >= 0 and a sum "
                         "<= 1")
    B, _, H, W = images.shape
    u = torch.rand(B, generator=gen)
    labels = torch.zeros(B, dtype=torch.long)
    labels[u < p_cutpaste + p_scar] = 2
    labels[u < p_cutpaste] = 1
    out = images.clone()
    masks = torch.zeros((B, 1, H, W), dtype=images.dtype, device=images.device)
    for i in torch.nonzero(labels).flatten().tolist():
        fn = cut_paste if labels[i] == 1 else scar
        out[i], masks[i] = fn(images[i], gen, jitter=jitter)
    return out, labels.to(images.device), masks
