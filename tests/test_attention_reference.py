"""The attention reference (plugins/attention_reference.py): block-table maths, FP8 scales, masks, and
the reference against a naive per-query softmax loop written independently here."""

from __future__ import annotations

import math

import pytest
import torch

from plugins import attention_reference as ref


def naive_attention(q, k, v, seq_lens, window=0):
    """One query at a time, explicit head mapping and key list: no shared code with the reference."""
    batch, q_heads, q_len, head_dim = q.shape
    group = q_heads // k.shape[1]
    out = torch.zeros(batch, q_heads, q_len, head_dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            for i in range(q_len):
                pos = int(seq_lens[b]) - q_len + i
                keys = [j for j in range(pos + 1) if window <= 0 or pos - j < window]
                kk = k[b, h // group, keys].double()
                vv = v[b, h // group, keys].double()
                w = torch.softmax(kk @ q[b, h, i].double() / math.sqrt(head_dim), dim=0)
                out[b, h, i] = w @ vv
    return out


def test_physical_slot_follows_the_block_table():
    table = torch.tensor([[5, 2, 7], [0, 3, 1]], dtype=torch.int32)
    positions = torch.tensor([[0, 3, 4, 11], [4, 5, 8, 9]])
    block, offset = ref.physical_slot(table, positions, block_size=4)
    assert block.tolist() == [[5, 5, 2, 7], [3, 3, 1, 1]]
    assert offset.tolist() == [[0, 3, 0, 3], [0, 1, 0, 1]]


def test_allocated_blocks_are_disjoint_and_sufficient():
    lens = [1, 16, 17, 40]
    table, pool = ref.allocate_block_table(lens, block_size=16, num_blocks=12, generator=torch.Generator().manual_seed(1))
    used = [int(table[b, j]) for b, n in enumerate(lens) for j in range(ref.blocks_needed(n, 16))]
    assert pool == 12 and len(used) == 1 + 1 + 2 + 3
    assert len(set(used)) == len(used) and all(0 <= u < pool for u in used)


def test_paged_round_trip_and_in_place_write():
    torch.manual_seed(0)
    lens = [5, 13, 8]
    cache = torch.randn(3, 2, 16, 4)
    table, pool_size = ref.allocate_block_table(lens, 4, num_blocks=16, generator=torch.Generator().manual_seed(2))
    pool = ref.linear_to_paged(cache, lens, table, pool_size, 4)
    back = ref.paged_to_linear(pool, table, 13)
    for b, n in enumerate(lens):
        assert torch.equal(back[b, :, :n], cache[b, :, :n])
    new = torch.randn(3, 2, 1, 4)
    ref.write_paged(pool, table, torch.tensor([[n - 1] for n in lens]), new)
    back = ref.paged_to_linear(pool, table, 13)
    for b, n in enumerate(lens):
        assert torch.equal(back[b, :, n - 1], new[b, :, 0])
        assert torch.equal(back[b, :, : n - 1], cache[b, :, : n - 1])


def test_fp8_scales_are_per_head_and_round_trip_within_e4m3_precision():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 32, 8) * torch.tensor([0.01, 1.0, 30.0, 900.0])[None, :, None, None]
    scale = ref.fp8_scales(x)
    assert scale.shape == (4,)
    amax = x.abs().amax(dim=(0, 2, 3))
    assert torch.allclose(scale * ref.FP8_MAX, amax)
    q = ref.quantize_fp8(x, scale)
    assert q.dtype == torch.float8_e4m3fn and torch.isfinite(q.float()).all()
    back = ref.dequantize_fp8(q, scale)
    rel = (back - x).abs() / amax[None, :, None, None]
    assert rel.max() < 2 ** -4  # 3 mantissa bits: half an ulp at the top binade is 1/16 of amax
    # a single global scale would flush the small head to zero; per-head scales keep it
    assert (back[:, 0] != 0).float().mean() > 0.9


def test_quantize_saturates_instead_of_nan():
    q = ref.quantize_fp8(torch.tensor([[1e6, -1e6]]).reshape(1, 2, 1, 1)[:, :1], torch.tensor([1.0]))
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == ref.FP8_MAX


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("q_len", [1, 6])
def test_reference_matches_naive_attention(group, window, q_len):
    torch.manual_seed(group * 10 + window + q_len)
    kv_heads, head_dim, capacity = 2, 8, 24
    lens = torch.tensor([7, 24, 12])
    q = torch.randn(3, kv_heads * group, q_len, head_dim)
    k, v = torch.randn(3, kv_heads, capacity, head_dim), torch.randn(3, kv_heads, capacity, head_dim)
    k[0, :, 7:] = float("nan")  # slots past a sequence's length must never be read
    out = ref.attention_reference(q, k, v, lens, window=window)
    assert torch.allclose(out.double(), naive_attention(q, k, v, lens, window), atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
def test_paged_reference_equals_linear(fp8):
    torch.manual_seed(3)
    lens = [9, 31, 16]
    q = torch.randn(3, 8, 2, 16)
    k, v = torch.randn(3, 2, 32, 16), torch.randn(3, 2, 32, 16)
    ks = vs = None
    if fp8:
        ks, vs = ref.fp8_scales(k), ref.fp8_scales(v)
        k, v = ref.quantize_fp8(k, ks), ref.quantize_fp8(v, vs)
    table, pool = ref.allocate_block_table(lens, 8, num_blocks=20, generator=torch.Generator().manual_seed(4))
    kp, vp = ref.linear_to_paged(k, lens, table, pool, 8), ref.linear_to_paged(v, lens, table, pool, 8)
    linear = ref.attention_reference(q, k, v, torch.tensor(lens), k_scale=ks, v_scale=vs, window=7)
    paged = ref.attention_reference(q, kp, vp, torch.tensor(lens), block_table=table, k_scale=ks, v_scale=vs, window=7)
    assert torch.equal(linear, paged)


def test_fp8_cache_attention_stays_close_to_fp16():
    torch.manual_seed(5)
    q = torch.randn(2, 8, 1, 64)
    k, v = torch.randn(2, 2, 128, 64), torch.randn(2, 2, 128, 64)
    lens = torch.tensor([100, 128])
    exact = ref.attention_reference(q, k, v, lens)
    ks, vs = ref.fp8_scales(k), ref.fp8_scales(v)
    approx = ref.attention_reference(q, ref.quantize_fp8(k, ks), ref.quantize_fp8(v, vs), lens, k_scale=ks, v_scale=vs)
    rel = (approx - exact).norm() / exact.norm()
    assert 0 < rel < 0.05, rel  # E4M3 keeps ~2 significant digits; softmax averaging shrinks the error
