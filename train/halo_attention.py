"""HaloNet local 2D block-wise self-attention (`HaloAttention`).

HaloNet: Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual
Backbones", arXiv 2103.12731; used in HaloAE (Mathian et al., arXiv 2208.03486) Block C.

The map is cut into non-overlapping b x b query blocks. Each block attends to a
(b + 2h) x (b + 2h) window: the block plus a halo of h pixels. Window positions outside the
map (the "padding") are MASKED (they get exactly zero weight); the
reference HaloAE code masked the valid positions instead and used -finfo.max as fill,
which becomes -inf in fp16 (NaN rows). We fill with the finite `MASK_VALUE`.

Relative positions: HaloNet's content-dependent relative logits q . r, factorised into
height and width tables of 2w - 1 learned vectors each (w = b + 2h):
``logit[q, k] = q . k + q . r_h[k_y - q_y] + q . r_w[k_x - q_x]`` (q already scaled).

Export notes: the feature size is fixed at construction, so the window gather index and the
padding mask are precomputed buffers; forward has no data-dependent control flow and uses only
Gather, Reshape, Transpose, MatMul, Add, Where and Softmax (no Pad / Im2Col / Einsum). The
gather index points padding positions at pixel 0 of the unpadded map: their keys are masked
and their values get exactly zero weight, so no zero-padded copy of the map is needed.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

MASK_VALUE = -1.0e4  # finite in fp16 / bf16; exp(MASK_VALUE - max) == 0 in fp32 and fp16


def _pair(v: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def window_index(feat_size: tuple[int, int], block_size: int, halo_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index into the flattened (unpadded) map and the padding mask of every window.

    Returns ``index`` [nb * w * w] (int64; padding positions point at pixel 0, any valid pixel
    would do since they are masked) and ``pad_mask`` [nb, w * w] (bool, True where the window
    position lies outside the map); blocks and window positions in row-major order.
    """
    H, W = feat_size
    b, h = block_size, halo_size
    w = b + 2 * h
    u = torch.arange(w) - h
    rows = (torch.arange(H // b) * b)[:, None, None, None] + u[None, None, :, None]  # [nbh, 1, w, 1]
    cols = (torch.arange(W // b) * b)[None, :, None, None] + u[None, None, None, :]  # [1, nbw, 1, w]
    valid = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)  # [nbh, nbw, w, w]
    index = torch.where(valid, rows * W + cols, torch.zeros((), dtype=torch.long))
    return index.reshape(-1), ~valid.reshape(-1, w * w)  # [nb*w*w], [nb, w*w]


class RelPosEmb(nn.Module):
    """Factorised content-dependent relative position logits (HaloNet)."""

    def __init__(self, block_size: int, win_size: int, dim_head: int, scale: float) -> None:
        super().__init__()
        self.block_size, self.win_size = block_size, win_size
        halo = (win_size - block_size) // 2
        self.rel_height = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * scale)
        self.rel_width = nn.Parameter(torch.randn(2 * win_size - 1, dim_head) * scale)
        q = torch.arange(block_size)[:, None] + halo  # query position in window coordinates
        k = torch.arange(win_size)[None, :]
        self.register_buffer("rel_index", (k - q + win_size - 1).reshape(-1),  # [b * w]
                             persistent=False)

    def _table(self, rel: torch.Tensor) -> torch.Tensor:
        t = rel.index_select(0, self.rel_index)  # [b * w, d]
        return t.reshape(self.block_size, self.win_size, -1).transpose(1, 2)  # [b, d, w]

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, nb, b*b, d] (scaled) -> relative logits [B, nb, b*b, w*w]."""
        B, nb, _, d = q.shape
        b, w = self.block_size, self.win_size
        q = q.reshape(B, nb, b, b, d)  # [B, nb, qy, qx, d]
        logit_h = torch.matmul(q, self._table(self.rel_height))  # [B, nb, qy, qx, w(ky)] batched over qy
        q_t = q.transpose(2, 3)  # [B, nb, qx, qy, d]
        logit_w = torch.matmul(q_t, self._table(self.rel_width))  # [B, nb, qx, qy, w(kx)]
        logit_w = logit_w.transpose(2, 3)  # [B, nb, qy, qx, w(kx)]
        rel = logit_h[..., :, None] + logit_w[..., None, :]  # [B, nb, qy, qx, ky, kx]
        return rel.reshape(B, nb, b * b, w * w)  # [B, nb, b*b, w*w]


class HaloAttention(nn.Module):
    """Multi-head halo attention over a fixed-size feature map.

    Args:
        dim: input channels.
        feat_size: (H, W) of the input map; both multiples of ``block_size``.
        heads, dim_head: heads and per-head width (default ``dim // heads``).
        block_size: query block side b. halo_size: halo h.
        qkv_bias: bias on the q / kv 1x1 projections.

    Input [N, dim, H, W] -> output [N, heads * dim_head, H, W] (no output projection: the
    enclosing block's conv follows).
    """

    def __init__(self, dim: int, feat_size: Union[int, tuple[int, int]], heads: int = 4,
                 dim_head: Optional[int] = None, block_size: int = 8, halo_size: int = 2,
                 qkv_bias: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.feat_size = _pair(feat_size)
        H, W = self.feat_size
        if H % block_size or W % block_size:
            raise ValueError(f"HaloAttention: feature size {H}x{W} is not a multiple of "
                             f"block_size={block_size}; change the grid or the block size")
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"HaloAttention: dim={dim} is not a multiple of heads={heads};"
                                 " pass dim_head")
            dim_head = dim // heads
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.block_size, self.halo_size = block_size, halo_size
        self.win_size = block_size + 2 * halo_size
        self.num_blocks = (H // block_size) * (W // block_size)
        self.scale = dim_head ** -0.5
        kw = dict(device=device, dtype=dtype)
        self.q = nn.Conv2d(dim, heads * dim_head, 1, bias=qkv_bias, **kw)
        self.kv = nn.Conv2d(dim, 2 * heads * dim_head, 1, bias=qkv_bias, **kw)
        self.rel_pos = RelPosEmb(block_size, self.win_size, dim_head, self.scale)
        index, pad_mask = window_index(self.feat_size, block_size, halo_size)
        self.register_buffer("win_index", index, persistent=False)
        self.register_buffer("pad_mask", pad_mask[:, None, :], persistent=False)  # [nb, 1, w*w]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, feat_size={self.feat_size}, heads={self.heads}, "
                f"dim_head={self.dim_head}, block_size={self.block_size}, "
                f"halo_size={self.halo_size}")

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        """x [N, dim, H, W] -> out [N, heads*dim_head, H, W] (and attn [N, heads, nb, b*b, w*w])."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.dim, *self.feat_size):
            raise ValueError(f"HaloAttention expects [N, {self.dim}, {self.feat_size[0]}, "
                             f"{self.feat_size[1]}], got {list(x.shape)}")
        H, W = self.feat_size
        b, w, nh, d = self.block_size, self.win_size, self.heads, self.dim_head
        nbh, nbw, nb = H // b, W // b, self.num_blocks

        q = self.q(x) * self.scale
        q = q.reshape(-1, nh, d, nbh, b, nbw, b)  # [N, nh, d, nbh, b, nbw, b]
        q = q.permute(0, 1, 3, 5, 4, 6, 2)  # [N, nh, nbh, nbw, b, b, d]
        q = q.reshape(-1, nb, b * b, d)  # [N*nh, nb, b*b, d]

        kv = self.kv(x).flatten(2)  # [N, 2*nh*d, H*W]
        kv = kv.index_select(2, self.win_index)  # [N, 2*nh*d, nb*w*w] (padding -> pixel 0, masked)
        kv = kv.reshape(-1, 2, nh, d, nb, w * w)  # [N, 2, nh, d, nb, w*w]
        kv = kv.permute(1, 0, 2, 4, 5, 3)  # [2, N, nh, nb, w*w, d]
        kv = kv.reshape(2, -1, nb, w * w, d)  # [2, N*nh, nb, w*w, d]
        k, v = kv[0], kv[1]  # [N*nh, nb, w*w, d]

        logits = torch.matmul(q, k.transpose(-1, -2))  # [N*nh, nb, b*b, w*w]
        logits = logits + self.rel_pos(q)
        logits = logits.masked_fill(self.pad_mask, MASK_VALUE)
        attn = logits.softmax(dim=-1)

        out = torch.matmul(attn, v)  # [N*nh, nb, b*b, d]
        out = out.reshape(-1, nh, nbh, nbw, b, b, d)  # [N, nh, nbh, nbw, b, b, d]
        out = out.permute(0, 1, 6, 2, 4, 3, 5)  # [N, nh, d, nbh, b, nbw, b]
        out = out.reshape(-1, nh * d, H, W)  # [N, nh*d, H, W]
        if return_attn:
            return out, attn.reshape(-1, nh, nb, b * b, w * w)  # [N, nh, nb, b*b, w*w]
        return out


# Alternatives considered:
# - timm `timm/layers/halo_attn.py` (HaloAttn) builds the K/V windows with Tensor.unfold and
#   leaves the zero-padded halo UNmasked (padding keys take part with k = 0); unfold lowers to
#   Im2Col-like graphs that the TensorRT ONNX parser rejects. The constant-index gather above is
#   one Gather node and the mask makes padding weight exactly zero.
# - lucidrains `halonet-pytorch` uses F.unfold and einsum plus a -finfo.max fill (-inf in fp16);
#   the HaloAE reference code copied it with the mask inverted (halonet-pytorch #6).
# - A learned relative bias table (Swin-style) is cheaper but content-independent; HaloNet's
#   q . r logits are kept here as the paper uses them.
