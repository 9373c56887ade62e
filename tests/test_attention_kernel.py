"""The Triton kernels (plugins/attention_kernel.py) against the reference: decode and prefill, linear and
paged, FP16 and FP8 cache, with and without window, GQA ratios 1/4/8.

Runs on a CUDA GPU; without one, in Triton's CPU interpreter when triton is installed (small
shapes); else skips with the reason. Tolerance: relative L2 error vs the float32 reference on the same
(already quantized) cache, which the kernel leaves by rounding P to FP16 before P.V and its output to
FP16: in the interpreter's shapes at most 2.6e-4 over all 48 cases (benchmarks/NOTES.md), bound 1e-3
(4x); on a GPU's larger shapes 5e-3, not measured on this CPU-only machine.

The interpreter is scoped to this file: `triton.jit` reads TRITON_INTERPRET when it decorates, so
on CPU the kernels tested here are a private copy of plugins/attention_kernel.py decorated with the
flag set, and the flag is set only while this file's tests run. plugins.attention_kernel itself
keeps compilable kernels for the AOT-compile tests (tests/test_trt_plugin.py), whichever file a
pytest-xdist worker collects or runs first.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import plugins
from plugins import attention_reference as ref

INTERPRET = not torch.cuda.is_available()


@contextlib.contextmanager
def interpreting():
    """TRITON_INTERPRET=1 for the duration, then as it was."""
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = before


def load_kernels():
    """The kernel module as the plugin uses it on a GPU; on CPU, a copy decorated for the interpreter."""
    if not INTERPRET:
        from plugins import attention_kernel

        return attention_kernel
    spec = importlib.util.spec_from_file_location("plugins._attention_kernel_interpreted",
                                                  Path(plugins.__file__).parent / "attention_kernel.py")
    module = importlib.util.module_from_spec(spec)
    with interpreting():
        spec.loader.exec_module(module)
    return module


kern = load_kernels()
with interpreting() if INTERPRET else contextlib.nullcontext():
    UNAVAILABLE = kern.unavailable_reason()  # None, or why (e.g. triton not installed)
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


@pytest.fixture(autouse=True, scope="module")
def interpreter():
    """The interpreter's flag while this file's tests run (Triton also reads it at launch), never beyond."""
    with interpreting() if INTERPRET else contextlib.nullcontext():
        yield
DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = DEV == "cpu"  # the interpreter runs every program in Python: keep shapes tiny
TOL = 1e-3 if SMALL else 5e-3


def make_case(group, paged, fp8, lens, head_dim, kv_heads=2, q_len=1, block_size=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, capacity = len(lens), -(-max(lens) // block_size) * block_size
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=gen).half()
    k = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen).half()
    v = torch.randn(batch, kv_heads, capacity, head_dim, generator=gen).half()
    ks = vs = table = None
    if fp8:
        ks, vs = ref.fp8_scales(k) * torch.rand(kv_heads, generator=gen).add(0.5), ref.fp8_scales(v)
        k, v = ref.quantize_fp8(k, ks), ref.quantize_fp8(v, vs)
    if paged:
        table, pool = ref.allocate_block_table(lens, block_size, num_blocks=sum(lens) // block_size + len(lens) + 3,
                                               generator=gen)
        k = ref.linear_to_paged(k, lens, table, pool, block_size)
        v = ref.linear_to_paged(v, lens, table, pool, block_size)
    to = (lambda t: None if t is None else t.to(DEV))
    return to(q), to(k), to(v), torch.tensor(lens, dtype=torch.int32, device=DEV), to(table), to(ks), to(vs)


def rel_err(out, expected):
    assert torch.isfinite(out).all()
    return ((out.float() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("paged", [False, True], ids=["linear", "paged"])
@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
@pytest.mark.parametrize("window", [0, 37])
def test_decode_matches_reference(group, paged, fp8, window):
    lens = [3, 70, 64] if SMALL else [1, 777, 4096, 2500]
    head_dim = 32 if SMALL else 128
    q, k, v, sl, table, ks, vs = make_case(group, paged, fp8, lens, head_dim, seed=group + 2 * paged + 4 * fp8)
    expected = ref.attention_reference(q, k, v, sl, block_table=table, k_scale=ks, v_scale=vs, window=window)
    out = kern.decode_attention(q[:, :, 0], k, v, sl, block_table=table, k_scale=ks, v_scale=vs, window=window,
                                max_seq_len=max(lens), block_n=16 if SMALL else 64)
    assert rel_err(out[:, :, None], expected) < TOL


@pytest.mark.parametrize("group", [1, 4] if SMALL else [1, 4, 8])  # interpreter: 8 adds nothing over 4 at its size
@pytest.mark.parametrize("paged", [False, True], ids=["linear", "paged"])
@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
@pytest.mark.parametrize("window", [0, 37])
def test_prefill_matches_reference(group, paged, fp8, window):
    lens, q_len = ([20, 48], 20) if SMALL else ([300, 1000, 513], 300)
    head_dim = 32 if SMALL else 128
    q, k, v, sl, table, ks, vs = make_case(group, paged, fp8, lens, head_dim, q_len=q_len, seed=7 + group)
    expected = ref.attention_reference(q, k, v, sl, block_table=table, k_scale=ks, v_scale=vs, window=window)
    block = 16 if SMALL else 64
    out = kern.prefill_attention(q, k, v, sl, block_table=table, k_scale=ks, v_scale=vs, window=window,
                                 block_m=block, block_n=block)
    assert rel_err(out, expected) < TOL


def test_decode_split_count_does_not_change_the_result():
    q, k, v, sl, *_ = make_case(4, False, False, [64, 50] if SMALL else [4000, 3000], 32 if SMALL else 128)
    one = kern.decode_attention(q[:, :, 0], k, v, sl, num_splits=1, block_n=16, prefetch=True)
    many = kern.decode_attention(q[:, :, 0], k, v, sl, num_splits=4, block_n=16)
    assert (one.float() - many.float()).abs().max() < 2e-3


@pytest.mark.parametrize("paged", [False, True], ids=["linear", "paged"])
@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
@pytest.mark.parametrize("window", [0, 7])
@pytest.mark.parametrize("q_len", [1, 20])
def test_plugin_kernel_writes_the_cache_and_attends_like_the_reference(fp8, window, q_len, paged):
    """The plugin's single launch: new K/V written in place at position_ids[:, 0], then attention; paged: the
    caches are a shuffled block pool (PagedAttentionBlockTable), written and read through the block table."""
    if fp8 and SMALL:
        pytest.skip("Triton 3.9's CPU interpreter rounds FP32->FP8 wrongly at binade edges (31.76 -> 16): GPU only")
    gen = torch.Generator().manual_seed(q_len + window + fp8)
    batch, kv_heads, group, cap, head_dim = 2, 2, 4, 64, 32 if SMALL else 128
    start = torch.tensor([5, 40 - q_len + 1 if q_len > 1 else 33])
    q = torch.randn(batch, kv_heads * group, q_len, head_dim, generator=gen).half()
    k_new = torch.randn(batch, kv_heads, q_len, head_dim, generator=gen).half()
    v_new = torch.randn(batch, kv_heads, q_len, head_dim, generator=gen).half()
    k_cache = torch.randn(batch, kv_heads, cap, head_dim, generator=gen).half()
    v_cache = torch.randn(batch, kv_heads, cap, head_dim, generator=gen).half()
    ks = vs = None
    if fp8:
        ks, vs = ref.fp8_scales(k_cache), ref.fp8_scales(v_cache)
        k_cache, v_cache = ref.quantize_fp8(k_cache, ks), ref.quantize_fp8(v_cache, vs)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for cache, new, s in ((expected_k, k_new, ks), (expected_v, v_new, vs)):
        written = ref.quantize_fp8(new, s) if fp8 else new
        for b in range(batch):
            cache[b, :, int(start[b]): int(start[b]) + q_len] = written[b]
    expected = ref.attention_reference(q, expected_k, expected_v, start + q_len, k_scale=ks, v_scale=vs, window=window)
    positions = start[:, None] + torch.arange(q_len)[None]
    to = (lambda t: None if t is None else t.to(DEV))
    table = None
    if paged:  # every sequence owns cap // 16 blocks of a larger shuffled pool; the pools replace the caches
        table, pool = ref.allocate_block_table([cap] * batch, 16, num_blocks=batch * cap // 16 + 3, generator=gen)
        k_cache, v_cache, expected_k, expected_v = (ref.linear_to_paged(c, [cap] * batch, table, pool, 16)
                                                    for c in (k_cache, v_cache, expected_k, expected_v))
    kc, vc = to(k_cache), to(v_cache)
    out = kern.plugin_attention(to(q), to(k_new), to(v_new), kc, vc, to(positions), k_scale=to(ks), v_scale=to(vs),
                                window=window, block_table=to(table), block_n=16 if SMALL else 64)
    as_bytes = (lambda t: t.cpu().view(torch.uint8)) if fp8 else (lambda t: t.cpu())
    assert torch.equal(as_bytes(kc), as_bytes(expected_k)) and torch.equal(as_bytes(vc), as_bytes(expected_v))
    assert rel_err(out.cpu(), expected) < TOL
