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
a subnormal in ONNX Runtime's CPU Softmax, which made it several times slower (the model's
eight Softmax nodes: 3.0 against 0.47 ms at batch 1 under the profiler). Weights below e^-80 of
the largest cannot move an fp32 sum of at most 144 terms, so the outputs are the same
(bit-identical on the MTD model).

Relative positions: a learned relative position bias per head (Swin-style), one entry per
(dy, dx) offset between query and key: ``logit[q, k] = (q . k) / sqrt(d) + B[k - q]``.
Chosen over HaloNet's content-dependent q . r logits because it is one broadcast Add on the
logits instead of two extra matmuls, two transposes and a broadcast Add (about half of the
attention's CPU time at the edge config).

Masking inside the matmul: every pixel gets two extra channels [x, 1, 0], and one padding
position [0, 0, 1] stands for every window position outside the map. The per-head projections
(`head_weights`, built from the ``q`` / ``kv`` Linear weights) map them to q' = [q * scale, 1],
k' = [k, MASK_VALUE * pad] and v (the biases ride on the 1 channel), so a padding logit is
exactly ``0 + MASK_VALUE`` (plus the relative bias) and a padding value is exactly 0: a masked
fill without a Where over the full logits and without a [heads, blocks, b*b, w*w] mask constant.

Layout: the projections are batched over heads ([N, 1, positions, C+2] @ [heads, C+2, d]), so
q, k and v come out head-major, [N, heads, positions, d], with no transpose. k and v are
projected on the H*W pixels plus the padding position, then gathered window by window along the
positions (one constant-index Gather each); the queries are gathered in block order before
theirs. Against projecting channels-last and transposing the gathered windows head-major (an 8-D
Transpose and two mask Concats per level), the exported v4 graph runs 2.35-3.0 ms faster per frame
in ONNX Runtime, and projecting before the window gather another 0.75-0.95 ms
(docs/benchmarks.md, latency). Training (`_project`) runs the same products as one GEMM over
all heads plus a transpose, which torch's autograd runs faster.

Export notes: the feature size is fixed at construction, so the gather indices and the
relative-position index are precomputed buffers; forward has no data-dependent control flow and
uses only Concat, Gather, Reshape, Transpose, MatMul, Add, Mul, ReduceMax, Sub, Clip (the floor)
and Softmax (no Pad / Where / Im2Col / Einsum); the weight and bias reshapes on constants are
folded by ONNX Runtime and TensorRT. A level whose one block covers the whole map with no halo
(the small levels of a coarse code) skips the gathers and the padding position: plain global
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


def gather_index(feat_size: tuple[int, int], block_size: int, halo_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat gather indices into the H*W map positions (row-major) plus one padding position
    (index H*W): ``query_index`` [H*W], the map positions in block order (blocks row-major,
    then the b x b positions of each block), and ``key_index`` [nb * w*w], every block's
    window row-major, positions outside the map pointing at the padding position."""
    H, W = feat_size
    b = block_size
    order = torch.arange(H * W).reshape(H // b, b, W // b, b).permute(0, 2, 1, 3).reshape(-1)
    rows, cols, _ = window_index(feat_size, block_size, halo_size)
    w = block_size + 2 * halo_size
    r, c = rows.reshape(H // b, 1, w, 1), cols.reshape(1, W // b, 1, w)
    key = torch.where((r < H) & (c < W), r * W + c, torch.tensor(H * W))  # [nbh, nbw, w, w]
    return order, key.reshape(-1)


def _project(x: torch.Tensor, w: torch.Tensor, training: bool) -> torch.Tensor:
    """x [N, 1, P, C] @ w [nh, C, e] -> [N, nh, P, e]. Inference (and the exported graph): one
    head-batched MatMul, no transpose. Training: one GEMM over all heads, then a transpose, the
    same products; torch's autograd runs the broadcast batched matmul far slower (it copies x
    per head and sums the weight gradient over the batch)."""
    if not training:
        return torch.matmul(x, w)
    nh, c, e = w.shape
    y = torch.matmul(x, w.transpose(0, 1).reshape(c, nh * e))  # [N, 1, P, nh*e]
    return y.reshape(x.shape[0], x.shape[2], nh, e).transpose(1, 2)


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
        # plain global attention over the map: the keys are the map itself, no padding key, and
        # only the bias columns of the keys inside the map (the small levels of a coarse code)
        self.global_window = self.num_blocks == 1
        self.scale = dim_head ** -0.5
        kw = dict(device=device, dtype=dtype)
        self.q = nn.Linear(dim, heads * dim_head, bias=qkv_bias, **kw)  # on channels-last pixels
        self.kv = nn.Linear(dim, 2 * heads * dim_head, bias=qkv_bias, **kw)
        span = 2 * block_size + 2 * halo_size - 1
        self.rel_bias = nn.Parameter(torch.randn(heads, span * span, **kw) * 0.02)
        self.register_buffer("rel_index", rel_pos_index(block_size, halo_size), persistent=False)
        _, _, pad_mask = window_index(self.feat_size, block_size, halo_size)
        query_index, key_index = gather_index(self.feat_size, block_size, halo_size)
        inside = (~pad_mask[0]).nonzero().reshape(-1)  # window positions on the map, row-major
        self.register_buffer("inside_keys", inside, persistent=False)  # [H*W] for one block
        if self.global_window:
            key_index = torch.arange(H * W)  # the map, row-major: no padding key
        self.register_buffer("query_index", query_index, persistent=False)  # [H*W]
        self.register_buffer("key_index", key_index, persistent=False)  # [nb * keys]
        self.keys = len(key_index) // self.num_blocks  # keys per block: w*w, or H*W

    def bias(self) -> torch.Tensor:
        """Relative position bias [nh, 1, b*b, w*w] (the same for every block); for a
        `global_window` layer only the keys on the map: [nh, 1, H*W, H*W]."""
        b, w = self.block_size, self.win_size
        bias = self.rel_bias.index_select(1, self.rel_index)  # [nh, b*b*w*w]
        bias = bias.reshape(self.heads, 1, b * b, w * w)  # [nh, 1, b*b, w*w]
        if self.global_window and self.halo_size:
            bias = bias.index_select(3, self.inside_keys)  # [nh, 1, H*W, H*W]
        return bias

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The q, k, v projections per head on pixels with two extra channels [x, 1, pad]
        (pad = 1 only at the padding position): ``wq`` [nh, C+2, d+1] gives [q * scale, 1],
        ``wk`` [nh, C+2, d+1] gives [k, MASK_VALUE * pad], ``wv`` [nh, C+2, d] gives v; the
        biases ride on the 1 channel, so the padding position's k and v are exact zeros
        but for the mask entry. Built from the ``q`` / ``kv`` Linear weights (the state dict
        keeps them); constants in the exported graph."""
        nh, d, c = self.heads, self.dim_head, self.dim
        wq = self.q.weight.reshape(nh, d, c).transpose(1, 2) * self.scale  # [nh, C, d]
        wkv = self.kv.weight.reshape(2, nh, d, c).transpose(2, 3)  # [2, nh, C, d]
        zero = wq.new_zeros
        bq = (self.q.bias.reshape(nh, 1, d) * self.scale if self.q.bias is not None
              else zero(nh, 1, d))
        bkv = self.kv.bias.reshape(2, nh, 1, d) if self.kv.bias is not None else zero(2, nh, 1, d)
        one = torch.ones_like(bq[:, :, :1])  # [nh, 1, 1]
        wq = torch.cat([torch.cat([wq, bq, zero(nh, 1, d)], 1),
                        torch.cat([zero(nh, c, 1), one, zero(nh, 1, 1)], 1)], 2)
        wk = torch.cat([torch.cat([wkv[0], bkv[0], zero(nh, 1, d)], 1),
                        torch.cat([zero(nh, c + 1, 1), one * MASK_VALUE], 1)], 2)
        wv = torch.cat([wkv[1], bkv[1], zero(nh, 1, d)], 1)
        return wq, wk, wv

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
        b, nh, d, nb, c = self.block_size, self.heads, self.dim_head, self.num_blocks, self.dim
        n = x.shape[0]
        # pixels [x, 1, 0], channels-last, then the padding position [0, 0, 1]
        x = torch.cat([x, x.new_ones(n, 1, H, W), x.new_zeros(n, 1, H, W)], dim=1)
        x = x.permute(0, 2, 3, 1).reshape(n, H * W, c + 2)
        pad = torch.cat([x.new_zeros(n, 1, c + 1), x.new_ones(n, 1, 1)], dim=2)
        x = torch.cat([x, pad], dim=1).unsqueeze(1)  # [N, 1, H*W + 1, C+2]
        wq, wk, wv = self.head_weights()
        # the head-batched projections write [N, nh, positions, d] directly: no transposes
        if self.global_window:  # one block: block order is row-major and the keys are the map
            xq = x[:, :, :H * W]
            k = _project(xq, wk, self.training)
            v = _project(xq, wv, self.training)
        else:
            xq = x.index_select(2, self.query_index)  # [N, 1, H*W, C+2] in block order
            k = _project(x, wk, self.training).index_select(2, self.key_index)
            v = _project(x, wv, self.training).index_select(2, self.key_index)
        q = _project(xq, wq, self.training).reshape(n, nh, nb, b * b, d + 1)  # [N, nh, nb, b*b, d+1]
        k = k.reshape(n, nh, nb, self.keys, d + 1)
        v = v.reshape(n, nh, nb, self.keys, d)  # 0 at padding
        # mask channel: q . k gains 1 * MASK_VALUE at padding keys (their k is 0 otherwise)
        logits = torch.matmul(q, k.transpose(-1, -2))  # [N, nh, nb, b*b, keys]
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
#   unfold lowers to Im2Col-like graphs that the TensorRT ONNX parser rejects. The
#   constant-index gathers above are plain Gather nodes and the mask gives padding no weight.
# - Projecting q / k / v channels-last, then gathering the windows (rows, then columns) and
#   transposing them head-major (this module until the ninth session): an 8-D Transpose and two
#   mask Concats per level that cost ONNX Runtime more than the rest of the level's attention.
#   Gathering the pixels' windows first and projecting them (2.25x the k / v FLOPs) was in between.
# - lucidrains `halonet-pytorch` uses F.unfold and einsum plus a -finfo.max fill (-inf in fp16);
#   the HaloAE reference code copied it with the mask inverted (halonet-pytorch #6).
# - HaloNet's content-dependent relative logits q . r (factorised height / width, as in timm's
#   PosEmbedRel) follow the paper more closely; they cost two extra batched matmuls, transposes
#   and a broadcast add over the full logits, which doubled the attention time on CPU, so the
#   learned bias is used here.
