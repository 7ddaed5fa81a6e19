"""HaloNet local 2D block-wise self-attention (`HaloAttention`).

HaloNet: Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual
Backbones", arXiv 2103.12731; used in HaloAE (Mathian et al., arXiv 2208.03486) Block C.

The map is cut into non-overlapping b x b query blocks. Each block attends to a
(b + 2h) x (b + 2h) window: the block plus a halo of h pixels over the zero-padded map.
Padding positions are MASKED: their values are exact zeros and their weight is at most e^-80 of
the row's largest (0 in fp16), so they add nothing to the output. (The reference HaloAE code
masked the valid positions instead, and filled with -finfo.max, which is -inf in fp16: NaN
rows.) The fill value `MASK_VALUE` is finite.

The logit floor: before the softmax, every logit is taken relative to its row maximum and
floored at `LOGIT_FLOOR` (-80). A trained Block C has logit ranges of thousands (mostly one-hot
rows) and the padding sits at -1e4; exp of anything below about -87 is subnormal or clamped to
a subnormal in ONNX Runtime's CPU Softmax, which made it several times slower (1.1 ms against
about 0.3 ms for a 32 x 32 level at batch 1). Weights below e^-80 of the largest cannot move an
fp32 sum of at most 144 terms, so the outputs are the same: bit-identical on the MTD model.

Relative positions: a learned relative position bias per head (Swin-style), one entry per
(dy, dx) offset between query and key: ``logit[q, k] = (q . k) / sqrt(d) + B[k - q]``.
Chosen over HaloNet's content-dependent q . r logits because it is one broadcast Add on the
logits instead of two extra matmuls, two transposes and a broadcast Add (about half of the
attention's CPU time at the edge config).

Masking inside the matmul: padding keys are exact zeros, and q / k get one extra channel
(1 for every query; `MASK_VALUE` for padding keys, 0 for valid ones), so a padding logit is
exactly ``0 + MASK_VALUE`` (plus the bias): a masked fill without a Where over the full logits
and without a [heads, blocks, b*b, w*w] mask constant in the exported graph.

Export notes: the feature size is fixed at construction, so the window gather indices, the
relative-position index and the padding mask are precomputed buffers; forward has no
data-dependent control flow and uses only Concat, Expand, Gather, Reshape, Transpose, MatMul,
Add, ReduceMax, Sub, Clip (the floor) and Softmax (no Pad / Where / Im2Col / Einsum); the bias Gather on constants is folded by
the exporter, ONNX Runtime and TensorRT. K/V windows come from two constant-index gathers
(rows, then columns) on the channels-last map with one zero row and column appended; window
positions outside the map point at them. A level whose one block covers the whole map
with no halo (the small levels of a coarse code) skips the gathers and the mask: plain global
attention, the same result.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

MASK_VALUE = -1.0e4  # finite in fp16 / bf16; exp(MASK_VALUE - max) == 0 in fp32 and fp16
LOGIT_FLOOR = -80.0  # logits minus their row maximum are floored here: e^-80 is a normal fp32


def _pair(v: Union[int, tuple[int, int]]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def window_index(feat_size: tuple[int, int], block_size: int, halo_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Separable window gather indices and the padding mask of every window.

    Returns ``row_index`` [nbh * w] and ``col_index`` [nbw * w] (int64 rows / columns of the
    map with one zero row / column appended: positions outside the map point at H / W) and
    ``pad_mask`` [nb, w * w] (bool, True where the window position lies outside the map);
    blocks and window positions in row-major order.
    """
    H, W = feat_size
    b, h = block_size, halo_size
    w = b + 2 * h
    u = torch.arange(w) - h
    rows = (torch.arange(H // b) * b)[:, None] + u[None, :]  # [nbh, w]
    cols = (torch.arange(W // b) * b)[:, None] + u[None, :]  # [nbw, w]
    valid_r, valid_c = (rows >= 0) & (rows < H), (cols >= 0) & (cols < W)
    valid = valid_r[:, None, :, None] & valid_c[None, :, None, :]  # [nbh, nbw, w, w]
    row_index = torch.where(valid_r, rows, torch.tensor(H)).reshape(-1)  # [nbh * w]
    col_index = torch.where(valid_c, cols, torch.tensor(W)).reshape(-1)  # [nbw * w]
    return row_index, col_index, ~valid.reshape(-1, w * w)  # pad_mask [nb, w*w]


def rel_pos_index(block_size: int, halo_size: int) -> torch.Tensor:
    """Index [b*b * w*w] into a flattened (b + w - 1)^2 relative-offset table."""
    b, w = block_size, block_size + 2 * halo_size
    span = b + w - 1
    q = torch.arange(b)
    k = torch.arange(w)
    d = k[None, :] - q[:, None] + b - 1  # [b, w] in 0 .. span - 1 (= k_map - q_map + b - 1 + h)
    idx = d[:, None, :, None] * span + d[None, :, None, :]  # [qy, qx, ky, kx]
    return idx.reshape(-1)  # [b*b * w*w]


class HaloAttention(nn.Module):
    """Multi-head halo attention over a fixed-size feature map.

    Args:
        dim: input channels.
        feat_size: (H, W) of the input map; both multiples of ``block_size``.
        heads, dim_head: heads and per-head width (default ``dim // heads``).
        block_size: query block side b. halo_size: halo h.
        qkv_bias: bias on the q / kv projections (per-pixel linear layers).

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
        # one block covering the whole map: its halo is all padding (weight 0), so this is
        # plain global attention over the map: no window gather and no padding mask, only the
        # bias columns of the keys inside the map (the small levels of a coarse code)
        self.global_window = self.num_blocks == 1
        self.scale = dim_head ** -0.5
        kw = dict(device=device, dtype=dtype)
        self.q = nn.Linear(dim, heads * dim_head, bias=qkv_bias, **kw)  # on channels-last pixels
        self.kv = nn.Linear(dim, 2 * heads * dim_head, bias=qkv_bias, **kw)
        span = 2 * block_size + 2 * halo_size - 1
        self.rel_bias = nn.Parameter(torch.randn(heads, span * span, **kw) * 0.02)
        self.register_buffer("rel_index", rel_pos_index(block_size, halo_size), persistent=False)
        row_index, col_index, pad_mask = window_index(self.feat_size, block_size, halo_size)
        self.register_buffer("row_index", row_index, persistent=False)  # [nbh*w]
        self.register_buffer("col_index", col_index, persistent=False)  # [nbw*w]
        key_mask = torch.zeros(pad_mask.shape, **kw).masked_fill(pad_mask, MASK_VALUE)
        self.register_buffer("key_mask", key_mask[..., None], persistent=False)  # [nb, w*w, 1]
        inside = (~pad_mask[0]).nonzero().reshape(-1)  # window positions on the map, row-major
        self.register_buffer("inside_keys", inside, persistent=False)  # [H*W] for one block

    def bias(self) -> torch.Tensor:
        """Relative position bias [nh, 1, b*b, w*w] (the same for every block); for a
        `global_window` layer only the keys on the map: [nh, 1, H*W, H*W]."""
        b, w = self.block_size, self.win_size
        bias = self.rel_bias.index_select(1, self.rel_index)  # [nh, b*b*w*w]
        bias = bias.reshape(self.heads, 1, b * b, w * w)  # [nh, 1, b*b, w*w]
        if self.global_window and self.halo_size:
            bias = bias.index_select(3, self.inside_keys)  # [nh, 1, H*W, H*W]
        return bias

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, feat_size={self.feat_size}, heads={self.heads}, "
                f"dim_head={self.dim_head}, block_size={self.block_size}, "
                f"halo_size={self.halo_size}")

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        """x [N, dim, H, W] -> out [N, heads*dim_head, H, W] (and attn [N, heads, nb, b*b, w*w];
        [N, heads, 1, H*W, H*W] for a `global_window` layer: the keys on the map only)."""
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.dim, *self.feat_size):
            raise ValueError(f"HaloAttention expects [N, {self.dim}, {self.feat_size[0]}, "
                             f"{self.feat_size[1]}], got {list(x.shape)}")
        H, W = self.feat_size
        b, w, nh, d = self.block_size, self.win_size, self.heads, self.dim_head
        nbh, nbw, nb = H // b, W // b, self.num_blocks

        # Channels-last so every transpose below keeps the per-head features (d) contiguous.
        x = x.permute(0, 2, 3, 1)  # [N, H, W, dim]
        q = self.q(x) * self.scale  # [N, H, W, nh*d]
        q = q.reshape(-1, nbh, b, nbw, b, nh, d)  # [N, nbh, b, nbw, b, nh, d]
        q = q.permute(0, 5, 1, 3, 2, 4, 6)  # [N, nh, nbh, nbw, b, b, d]
        q = q.reshape(-1, nh, nb, b * b, d)  # [N, nh, nb, b*b, d]

        kv = self.kv(x)  # [N, H, W, 2*nh*d]
        n, c = kv.shape[0], kv.shape[-1]
        if self.global_window:  # the window is the map itself: nothing to gather or mask
            kv = kv.reshape(-1, H * W, 2, nh, d).permute(2, 0, 3, 1, 4)  # [2, N, nh, H*W, d]
            k, v = kv[0].unsqueeze(2), kv[1].unsqueeze(2)  # [N, nh, 1, w*w, d]
            logits = torch.matmul(q, k.transpose(-1, -2))  # [N, nh, 1, b*b, w*w]
            return self._finish(logits, v, return_attn)
        kv = torch.cat([kv, kv.new_zeros(n, 1, W, c)], dim=1)  # [N, H+1, W, 2*nh*d]: zero row
        kv = torch.cat([kv, kv.new_zeros(n, H + 1, 1, c)], dim=2)  # [N, H+1, W+1, 2*nh*d]
        kv = kv.index_select(1, self.row_index)  # [N, nbh*w, W+1, 2*nh*d]
        kv = kv.index_select(2, self.col_index)  # [N, nbh*w, nbw*w, 2*nh*d]
        kv = kv.reshape(-1, nbh, w, nbw, w, 2, nh, d)  # [N, nbh, w, nbw, w, 2, nh, d]
        kv = kv.permute(5, 0, 6, 1, 3, 2, 4, 7)  # [2, N, nh, nbh, nbw, w, w, d]
        kv = kv.reshape(2, -1, nh, nb, w * w, d)  # [2, N, nh, nb, w*w, d]
        k, v = kv[0], kv[1]  # [N, nh, nb, w*w, d]; exact zeros at padding positions

        # mask channel: q . k gains 1 * key_mask = MASK_VALUE at padding keys (k is 0 there)
        q = torch.cat([q, q.new_ones(n, nh, nb, b * b, 1)], dim=-1)  # [N, nh, nb, b*b, d+1]
        k = torch.cat([k, self.key_mask.expand(n, nh, nb, w * w, 1)], dim=-1)  # [.., w*w, d+1]
        logits = torch.matmul(q, k.transpose(-1, -2))  # [N, nh, nb, b*b, w*w]
        return self._finish(logits, v, return_attn)

    def _finish(self, logits: torch.Tensor, v: torch.Tensor, return_attn: bool):
        """logits [N, nh, nb, b*b, w*w], v [N, nh, nb, w*w, d] -> out [N, nh*d, H, W]."""
        H, W = self.feat_size
        b, nh, d = self.block_size, self.heads, self.dim_head
        nbh, nbw = H // b, W // b
        logits = logits + self.bias()  # padding: MASK_VALUE + bias
        # relative to the row maximum, floored at LOGIT_FLOOR: the same weights (below e^-80 of
        # the largest either way; padding values are exact zeros), without the subnormal exp
        # results that make ONNX Runtime's CPU Softmax several times slower on the wide logit
        # ranges of a trained model (docs/benchmarks.md, latency)
        logits = (logits - logits.amax(dim=-1, keepdim=True)).clamp_min(LOGIT_FLOOR)
        attn = logits.softmax(dim=-1)

        out = torch.matmul(attn, v)  # [N, nh, nb, b*b, d]
        out = out.reshape(-1, nh, nbh, nbw, b, b, d)  # [N, nh, nbh, nbw, b, b, d]
        out = out.permute(0, 2, 4, 3, 5, 1, 6)  # [N, nbh, b, nbw, b, nh, d]
        out = out.reshape(-1, H, W, nh * d)  # [N, H, W, nh*d]
        out = out.permute(0, 3, 1, 2)  # [N, nh*d, H, W]
        if return_attn:
            return out, attn  # attn [N, nh, nb, b*b, w*w]
        return out


# Alternatives considered:
# - timm `timm/layers/halo_attn.py` (HaloAttn) builds the K/V windows with Tensor.unfold over
#   the zero-padded map and leaves the padding UNmasked (padding keys take part with k = 0);
#   unfold lowers to Im2Col-like graphs that the TensorRT ONNX parser rejects. The two
#   constant-index gathers above are plain Gather nodes and the mask gives padding zero weight.
# - lucidrains `halonet-pytorch` uses F.unfold and einsum plus a -finfo.max fill (-inf in fp16);
#   the HaloAE reference code copied it with the mask inverted (halonet-pytorch #6).
# - HaloNet's content-dependent relative logits q . r (factorised height / width, as in timm's
#   PosEmbedRel) follow the paper more closely; they cost two extra batched matmuls, transposes
#   and a broadcast add over the full logits, which doubled the attention time on CPU, so the
#   learned bias is used here.
