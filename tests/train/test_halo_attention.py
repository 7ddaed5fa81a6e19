"""HaloAttention behaviour: padding gets no weight that counts, the logit floor changes nothing, matches a naive loop implementation,
clear errors, finite mask in half precision."""
from __future__ import annotations

import math

import pytest
import torch

from haloae.train.halo_attention import LOGIT_FLOOR, MASK_VALUE, HaloAttention, window_index


def naive_halo_attention(layer: HaloAttention, x: torch.Tensor) -> torch.Tensor:
    """Reference: explicit loops over blocks, heads and positions; padding EXCLUDED from the
    softmax (not masked), so any mask bug in the layer shows as a mismatch."""
    N, _, H, W = x.shape
    b, h = layer.block_size, layer.halo_size
    nh, d = layer.heads, layer.dim_head
    xc = x.permute(0, 2, 3, 1)  # [N, H, W, C]: q / kv are per-pixel linear layers
    q = layer.q(xc).permute(0, 3, 1, 2) * layer.scale  # [N, nh*d, H, W]
    kv = layer.kv(xc).permute(0, 3, 1, 2)  # [N, 2*nh*d, H, W]
    k_all, v_all = kv[:, : nh * d], kv[:, nh * d:]
    span = 2 * b + 2 * h - 1  # relative offsets -(b-1+h) .. b-1+h per axis
    table = layer.rel_bias.reshape(nh, span, span)
    out = torch.zeros(N, nh * d, H, W, dtype=x.dtype)
    for n in range(N):
        for head in range(nh):
            ch = slice(head * d, (head + 1) * d)
            for by in range(0, H, b):
                for bx in range(0, W, b):
                    for qy in range(by, by + b):
                        for qx in range(bx, bx + b):
                            qv = q[n, ch, qy, qx]
                            logits, values = [], []
                            for ky in range(by - h, by + b + h):
                                for kx in range(bx - h, bx + b + h):
                                    if not (0 <= ky < H and 0 <= kx < W):
                                        continue  # padding: not part of the softmax at all
                                    rel = table[head, ky - qy + b - 1 + h, kx - qx + b - 1 + h]
                                    logits.append(qv @ k_all[n, ch, ky, kx] + rel)
                                    values.append(v_all[n, ch, ky, kx])
                            a = torch.stack(logits).softmax(0)
                            out[n, ch, qy, qx] = (a[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize("size,block,halo,heads", [(8, 4, 1, 2), (6, 2, 2, 1), ((4, 8), 4, 3, 2),
                                                    (8, 8, 0, 2), (4, 4, 0, 1), (8, 8, 2, 2),
                                                    ((4, 4), 4, 1, 1)])
def test_matches_naive_reference(size, block, halo, heads):
    torch.manual_seed(0)
    layer = HaloAttention(8, size, heads=heads, block_size=block, halo_size=halo, qkv_bias=True)
    H, W = layer.feat_size
    x = torch.randn(2, 8, H, W)
    with torch.no_grad():
        got = layer(x)  # training mode: one GEMM over the heads, then a transpose
        want = naive_halo_attention(layer, x)
        head_batched = layer.eval()(x)  # inference and the exported graph: no transpose
    assert got.shape == (2, 8, H, W)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_batched, got, atol=1e-6, rtol=1e-5)
    assert layer.global_window == (block == H == W)  # the single-window path


def test_padding_gets_no_weight_that_counts():
    """Padding keys get at most e^LOGIT_FLOOR (e^-80) of a row's largest weight, and their values
    are exact zeros, so they add nothing to the output."""
    torch.manual_seed(0)
    layer = HaloAttention(8, 8, heads=2, block_size=4, halo_size=2)
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        _, attn = layer(x, return_attn=True)  # [N, nh, nb, b*b, w*w]
    _, _, pad = window_index((8, 8), 4, 2)  # [nb, w*w] True = padding
    pad = pad[None, None, :, None, :].expand_as(attn)
    assert pad.any() and (~pad).any()
    top = attn.amax(-1, keepdim=True).expand_as(attn)
    assert torch.all(attn[pad] <= math.exp(LOGIT_FLOOR) * top[pad]), "padding must get no weight"
    assert torch.all(attn[~pad] > 0.0), "valid positions must keep a positive weight"
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)))


def test_logit_floor_changes_no_output(monkeypatch):
    """A trained model's logits span thousands (one-hot rows): flooring them at the row maximum
    - 80 (for ONNX Runtime's CPU Softmax speed) gives the same output as no floor, and the same as
    the naive reference that leaves padding out of the softmax."""
    import haloae.train.halo_attention as ha

    torch.manual_seed(0)
    layer = HaloAttention(8, 8, heads=2, block_size=4, halo_size=2)
    x = torch.randn(1, 8, 8, 8) * 30  # logits of magnitude ~1e3, as in a trained Block C
    with torch.no_grad():
        got, attn = layer(x, return_attn=True)
        assert (attn.amax(-1) > 0.999).float().mean() > 0.5  # mostly one-hot rows
        monkeypatch.setattr(ha, "LOGIT_FLOOR", float("-inf"))
        unfloored = layer(x)
        want = naive_halo_attention(layer, x)
    torch.testing.assert_close(got, unfloored, atol=0, rtol=0)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)  # inputs x 30


def test_window_index_mask_counts():
    # 4x4 map, 2x2 blocks, halo 1: windows 4x4; corner windows have 7 padding positions.
    rows, cols, pad = window_index((4, 4), 2, 1)
    assert pad.shape == (4, 16)
    assert rows.tolist() == [4, 0, 1, 2, 1, 2, 3, 4]  # 4 = the appended zero row (padding)
    assert cols.tolist() == rows.tolist()
    assert pad.sum(1).tolist() == [7, 7, 7, 7]
    _, _, pad = window_index((8, 8), 4, 0)
    assert not pad.any()


@pytest.mark.parametrize("size", [10, (8, 6)])
def test_non_divisible_size_raises_at_construction(size):
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        HaloAttention(8, size, heads=2, block_size=4, halo_size=1)


def test_wrong_input_size_raises_at_call():
    layer = HaloAttention(8, 8, heads=2, block_size=4, halo_size=1)
    with pytest.raises(ValueError, match=r"expects \[N, 8, 8, 8\]"):
        layer(torch.randn(1, 8, 12, 12))
    with pytest.raises(ValueError, match="expects"):
        layer(torch.randn(1, 4, 8, 8))


def test_fully_padded_corner_no_nan():
    """Block 1x1 with a halo of 3: a corner window is 40 of 49 padding; zero input too."""
    torch.manual_seed(0)
    layer = HaloAttention(4, 4, heads=1, block_size=1, halo_size=3)
    torch.nn.init.zeros_(layer.rel_bias)  # zero input -> all valid logits equal
    for x in (torch.zeros(1, 4, 4, 4), torch.randn(1, 4, 4, 4) * 100):
        with torch.no_grad():
            out, attn = layer(x, return_attn=True)  # [N, nh, nb, b*b, w*w]
        assert torch.isfinite(out).all() and torch.isfinite(attn).all()
        corner = attn[0, 0, 0, 0].reshape(7, 7)  # window of the top-left 1x1 block
        tiny = math.exp(LOGIT_FLOOR) * corner.max()  # padding: no weight that counts
        assert torch.all(corner[:3] <= tiny) and torch.all(corner[:, :3] <= tiny)
        torch.testing.assert_close(corner.sum(), torch.tensor(1.0))
        if not x.any():  # zero input: uniform over the 16 valid positions
            torch.testing.assert_close(corner[3:, 3:], torch.full((4, 4), 1 / 16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask_value_safe_in_half_precision(dtype):
    assert torch.isfinite(torch.tensor(MASK_VALUE, dtype=dtype))
    logits = torch.randn(3, 10).to(dtype)
    logits[:, 6:] = MASK_VALUE
    logits[2] = MASK_VALUE  # a fully masked row stays finite (uniform), never NaN
    p = logits.softmax(-1)
    assert torch.isfinite(p).all()
    assert torch.all(p[:2, 6:] == 0)
    # the reference code's fill value turns into -inf in half precision
    assert torch.isinf(torch.tensor(torch.finfo(torch.float32).min).to(torch.float16))


def test_bfloat16_forward_matches_fp32():
    torch.manual_seed(0)
    layer = HaloAttention(8, 8, heads=2, block_size=4, halo_size=1)
    x = torch.randn(1, 8, 8, 8)
    with torch.no_grad():
        ref, attn32 = layer(x, return_attn=True)
        out, attn16 = layer.to(torch.bfloat16)(x.to(torch.bfloat16), return_attn=True)
    assert torch.isfinite(out).all()
    _, _, pad = window_index((8, 8), 4, 1)
    pad = pad[None, None, :, None, :].expand_as(attn16)
    assert torch.all(attn16[pad] <= 1.01 * math.exp(LOGIT_FLOOR) * attn16.amax(-1, keepdim=True).expand_as(attn16)[pad])
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.05)


def test_gradients_flow_to_rel_pos_and_projections():
    layer = HaloAttention(8, 8, heads=2, block_size=4, halo_size=1)
    layer(torch.randn(2, 8, 8, 8)).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
