"""Triton attention kernels for what TensorRT's native attention lacks: paged cache, FP8 cache, sliding window.

Decode (one query token per sequence) is memory-bound: each step reads the whole K/V cache once and
does ~Hq/Hkv flops per byte. So the decode kernel is shaped around bytes, flash-decoding style:
- one program per (sequence, KV head, split of the KV length): K/V of a KV head are loaded once for
  its whole query-head group (GQA), and the splits give enough programs to fill the GPU at batch 1;
- a second small kernel merges the splits' partial softmax (max, sum, weighted V) exactly;
- FP8-E4M3 K/V are loaded as bytes and widened in registers; the per-head scales are scalars of the
  program (k_scale folds into the softmax scale, v_scale into the final output), so FP8 costs no
  extra memory traffic;
- paged cache: each K/V row's address goes through the block table (a gather of whole D-rows, still
  coalesced), so any block size works;
- sliding window: the program's KV range starts at max(0, len - window): bytes outside the window
  are never read.

Prefill (Sq > 1, causal) uses a plain flash-attention forward with the same cache addressing.
Semantics: plugins/attention_reference.py. Importable without Triton (the kernels are then absent
and `available()` says why), so CPU-only machines can import the module.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # CPU-only CI: the reference and the ONNX decomposition still run
    triton = None
    tl = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

LOG2E = 1.4426950408889634


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else why not (for test skips)."""
    if triton is None:
        return f"triton is not installed ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        import os
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter)"
    return None


if triton is not None:

    @triton.jit
    def _kv_offsets(b, hk, n, BT, stride_btb, stride_b, stride_h, stride_s, PAGED: tl.constexpr, PAGE: tl.constexpr,
                    nmask):
        """Element offset of row n (a [BLOCK_N] vector of positions) of KV head hk of sequence b."""
        if PAGED:
            blk = tl.load(BT + b * stride_btb + n // PAGE, mask=nmask, other=0).to(tl.int64)
            return blk * stride_b + hk * stride_h + (n % PAGE).to(tl.int64) * stride_s
        else:
            return b.to(tl.int64) * stride_b + hk * stride_h + n.to(tl.int64) * stride_s

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, BT, SeqLens, KScale, VScale, Opart, Mpart, Lpart,
        qk_scale, WINDOW, CHUNK,
        stride_qb, stride_qh,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_btb,
        stride_ob, stride_oh, stride_os,
        stride_mb, stride_mh,
        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGED: tl.constexpr, PAGE: tl.constexpr, FP8: tl.constexpr, HAS_WINDOW: tl.constexpr,
        PREFETCH: tl.constexpr,
    ):
        b = tl.program_id(0)
        hk = tl.program_id(1)
        split = tl.program_id(2)
        length = tl.load(SeqLens + b)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(length - WINDOW, 0)
        start = lo + split * CHUNK
        end = tl.minimum(start + CHUNK, length)

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        gmask = offs_g < G
        heads = hk * G + offs_g
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
        q = q.to(tl.float16)
        scale = qk_scale * 1.4426950408889634  # exp2 domain
        if FP8:
            scale = scale * tl.load(KScale + hk)

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        # PREFETCH: each iteration computes the next tile's row offsets while this tile's loads are in
        # flight, taking a paged cache's block-table load off the K/V loads' critical path. Measured
        # on H100: it lifts FP8 paged from 57% to 78% of peak but costs FP16 paged (90% -> 74%), so
        # the launcher turns it on for FP8 paged only (benchmarks/NOTES.md).
        n = start + offs_n
        koff = _kv_offsets(b, hk, n, BT, stride_btb, stride_kb, stride_kh, stride_ks, PAGED, PAGE, n < end)
        voff = _kv_offsets(b, hk, n, BT, stride_btb, stride_vb, stride_vh, stride_vs, PAGED, PAGE, n < end)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + offs_n
            nmask = n < end
            if not PREFETCH:
                koff = _kv_offsets(b, hk, n, BT, stride_btb, stride_kb, stride_kh, stride_ks, PAGED, PAGE, nmask)
                voff = _kv_offsets(b, hk, n, BT, stride_btb, stride_vb, stride_vh, stride_vs, PAGED, PAGE, nmask)
            k = tl.load(K + koff[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
            v = tl.load(V + voff[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
            if PREFETCH:
                nxt = n + BLOCK_N
                koff = _kv_offsets(b, hk, nxt, BT, stride_btb, stride_kb, stride_kh, stride_ks, PAGED, PAGE, nxt < end)
                voff = _kv_offsets(b, hk, nxt, BT, stride_btb, stride_vb, stride_vh, stride_vs, PAGED, PAGE, nxt < end)
            s = tl.dot(q, tl.trans(k.to(tl.float16))) * scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
            m_i = m_new
        if FP8:
            acc = acc * tl.load(VScale + hk)
        out = Opart + b * stride_ob + heads[:, None] * stride_oh + split * stride_os + offs_d[None, :]
        tl.store(out, acc, mask=gmask[:, None])
        tl.store(Mpart + b * stride_mb + heads * stride_mh + split, m_i, mask=gmask)
        tl.store(Lpart + b * stride_mb + heads * stride_mh + split, l_i, mask=gmask)

    @triton.jit
    def _decode_combine_kernel(
        Opart, Mpart, Lpart, Out, NUM_SPLITS,
        stride_ob, stride_oh, stride_os, stride_mb, stride_mh, stride_outb, stride_outh,
        D: tl.constexpr, S_PAD: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D)
        smask = offs_s < NUM_SPLITS
        m = tl.load(Mpart + b * stride_mb + h * stride_mh + offs_s, mask=smask, other=float("-inf"))
        l = tl.load(Lpart + b * stride_mb + h * stride_mh + offs_s, mask=smask, other=0.0)
        m_max = tl.max(m, 0)
        w = tl.where(l > 0, tl.exp2(m - m_max), 0.0)  # empty splits (m = -inf, l = 0) weigh nothing
        part = tl.load(Opart + b * stride_ob + h * stride_oh + offs_s[:, None] * stride_os + offs_d[None, :],
                       mask=smask[:, None], other=0.0)
        out = tl.sum(part * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(Out + b * stride_outb + h * stride_outh + offs_d, out.to(Out.dtype.element_ty))

    @triton.jit
    def _prefill_kernel(
        Q, K, V, BT, SeqLens, KScale, VScale, Out,
        qk_scale, WINDOW, Q_LEN,
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_btb,
        stride_outb, stride_outh, stride_outs,
        G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PAGED: tl.constexpr, PAGE: tl.constexpr, FP8: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):
        mblock = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2)
        hk = h // G
        length = tl.load(SeqLens + b)
        offs_m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        mmask = offs_m < Q_LEN
        pos = length - Q_LEN + offs_m  # absolute position of each query row
        q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                    mask=mmask[:, None], other=0.0).to(tl.float16)
        scale = qk_scale * 1.4426950408889634
        if FP8:
            scale = scale * tl.load(KScale + hk)
        first = length - Q_LEN + mblock * BLOCK_M
        hi = tl.minimum(first + BLOCK_M, length)
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(first - WINDOW + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for n0 in range(lo, hi, BLOCK_N):
            n = n0 + offs_n
            nmask = n < length
            koff = _kv_offsets(b, hk, n, BT, stride_btb, stride_kb, stride_kh, stride_ks, PAGED, PAGE, nmask)
            voff = _kv_offsets(b, hk, n, BT, stride_btb, stride_vb, stride_vh, stride_vs, PAGED, PAGE, nmask)
            k = tl.load(K + koff[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
            v = tl.load(V + voff[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k.to(tl.float16))) * scale
            ok = nmask[None, :] & (n[None, :] <= pos[:, None])
            if HAS_WINDOW:
                ok = ok & (n[None, :] > pos[:, None] - WINDOW)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
            m_i = m_new
        if FP8:
            acc = acc * tl.load(VScale + hk)
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + b * stride_outb + h * stride_outh + offs_m[:, None] * stride_outs + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mmask[:, None])


    @triton.jit
    def _cache_rows(b, hk, n, BT, CAP, H_KV: tl.constexpr, D: tl.constexpr, PAGED: tl.constexpr,
                    PAGE: tl.constexpr, nmask):
        """Element offsets of rows n (positions) of KV head hk of sequence b in a contiguous cache: linear
        [B, Hkv, CAP, D], or paged, a pool [N, Hkv, PAGE, D] through block-table row b (CAP = the table's width)."""
        if PAGED:
            blk = tl.load(BT + b * CAP + n // PAGE, mask=nmask, other=0).to(tl.int64)
            return ((blk * H_KV + hk) * PAGE + n % PAGE) * D
        else:
            return ((b * H_KV + hk) * CAP + n) * D

    @triton.jit
    def _plugin_body(
        Q, Knew, Vnew, Kc, Vc, Pos, KScale, VScale, BT, Out, KcOut, VcOut,
        qk_scale, WINDOW, Q_LEN, CAP,
        H_Q: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        FP8: tl.constexpr, HAS_WINDOW: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    ):
        """The TensorRT plugin's single launch: cache write + causal attention, one node per layer.

        All tensors contiguous: q/out [B, Hq, S, D], new K/V [B, Hkv, S, D], cache [B, Hkv, CAP, D] or,
        PAGED, a pool [N, Hkv, PAGE, D] with block tables BT [B, CAP] int32 (CAP is then the table's
        width) (aliased in/out), position_ids [B, S] (contiguous per row: the new tokens sit at
        pos[b, 0] .. pos[b, 0] + S - 1). KcOut/VcOut are the same buffers as Kc/Vc (TensorRT passes the
        aliased outputs as separate pointers). Race-free in one launch: the program of the first query
        head of a group writes its rows of the new K/V into the cache, and every program reads the
        new rows from the K/V inputs (rounded through FP8 exactly as written), never from the cache
        rows being written; cache rows before pos[b, 0] are only read.
        """
        G: tl.constexpr = H_Q // H_KV
        mblock = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.program_id(2).to(tl.int64)
        hk = h // G
        start = tl.load(Pos + b * Q_LEN).to(tl.int32)
        offs_m = mblock * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        mmask = offs_m < Q_LEN
        pos = start + offs_m
        q_base = Q + ((b * H_Q + h) * Q_LEN) * D
        q = tl.load(q_base + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0).to(tl.float16)
        kn_base = Knew + ((b * H_KV + hk) * Q_LEN) * D
        vn_base = Vnew + ((b * H_KV + hk) * Q_LEN) * D
        ks = 1.0
        vs = 1.0
        if FP8:
            ks = tl.load(KScale + hk)
            vs = tl.load(VScale + hk)
        if h % G == 0:  # write this m-block's new rows (quantized) into the aliased cache
            kn = tl.load(kn_base + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
            vn = tl.load(vn_base + offs_m[:, None] * D + offs_d[None, :], mask=mmask[:, None], other=0.0)
            if FP8:
                kn = tl.clamp(tl.math.div_rn(kn.to(tl.float32), ks), -448.0, 448.0)
                vn = tl.clamp(tl.math.div_rn(vn.to(tl.float32), vs), -448.0, 448.0)
            rows = _cache_rows(b, hk, pos, BT, CAP, H_KV, D, PAGED, PAGE, mmask)[:, None] + offs_d[None, :]
            tl.store(KcOut + rows, kn.to(KcOut.dtype.element_ty), mask=mmask[:, None])
            tl.store(VcOut + rows, vn.to(VcOut.dtype.element_ty), mask=mmask[:, None])
        scale = qk_scale * 1.4426950408889634
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        first = start + mblock * BLOCK_M
        lo = 0
        if HAS_WINDOW:
            lo = tl.maximum(first - WINDOW + 1, 0)
        # (1) cached rows [lo, start): read only
        for n0 in range(lo, start, BLOCK_N):
            n = n0 + offs_n
            nmask = n < start
            rows = _cache_rows(b, hk, n, BT, CAP, H_KV, D, PAGED, PAGE, nmask)[:, None] + offs_d[None, :]
            k = tl.load(Kc + rows, mask=nmask[:, None], other=0.0)
            v = tl.load(Vc + rows, mask=nmask[:, None], other=0.0)
            kf = k.to(tl.float32) * ks
            vf = v.to(tl.float32) * vs
            s = tl.dot(q, tl.trans(kf.to(tl.float16))) * scale
            ok = nmask[None, :]
            if HAS_WINDOW:
                ok = ok & (n[None, :] > pos[:, None] - WINDOW)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), vf.to(tl.float16))
            m_i = m_new
        # (2) the new rows, from the inputs, up to this block's last query
        hi = tl.minimum((mblock + 1) * BLOCK_M, Q_LEN)
        for j0 in range(0, hi, BLOCK_N):
            j = j0 + offs_n
            jmask = j < Q_LEN
            k = tl.load(kn_base + j[:, None] * D + offs_d[None, :], mask=jmask[:, None], other=0.0).to(tl.float32)
            v = tl.load(vn_base + j[:, None] * D + offs_d[None, :], mask=jmask[:, None], other=0.0).to(tl.float32)
            if FP8:  # the values the cache now holds: FP8-rounded
                k = tl.clamp(tl.math.div_rn(k, ks), -448.0, 448.0).to(tl.float8e4nv).to(tl.float32) * ks
                v = tl.clamp(tl.math.div_rn(v, vs), -448.0, 448.0).to(tl.float8e4nv).to(tl.float32) * vs
            s = tl.dot(q, tl.trans(k.to(tl.float16))) * scale
            key_pos = start + j
            ok = jmask[None, :] & (key_pos[None, :] <= pos[:, None])
            if HAS_WINDOW:
                ok = ok & (key_pos[None, :] > pos[:, None] - WINDOW)
            s = tl.where(ok, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v.to(tl.float16))
            m_i = m_new
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(Out + ((b * H_Q + h) * Q_LEN) * D + offs_m[:, None] * D + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mmask[:, None])


    @triton.jit
    def _plugin_kernel(
        Q, Knew, Vnew, Kc, Vc, Pos, KScale, VScale, BT, Out, qk_scale, WINDOW, Q_LEN, CAP,
        H_Q: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        FP8: tl.constexpr, HAS_WINDOW: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
    ):
        _plugin_body(Q, Knew, Vnew, Kc, Vc, Pos, KScale, VScale, BT, Out, Kc, Vc, qk_scale, WINDOW, Q_LEN, CAP,
                     H_Q, H_KV, D, BLOCK_M, BLOCK_N, FP8, HAS_WINDOW, PAGED, PAGE)

    @triton.jit
    def _plugin_kernel_trt(
        Q, Knew, Vnew, Kc, Vc, Pos, KScale, VScale, Q_LEN, CAP, Out, KcOut, VcOut,
        QK_SCALE: tl.constexpr, WINDOW: tl.constexpr,
        H_Q: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        FP8: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):
        """TensorRT's AOT plugin argument order: the node's inputs, the extra int32 scalars, its outputs."""
        _plugin_body(Q, Knew, Vnew, Kc, Vc, Pos, KScale, VScale, Pos, Out, KcOut, VcOut, QK_SCALE, WINDOW, Q_LEN, CAP,
                     H_Q, H_KV, D, BLOCK_M, BLOCK_N, FP8, HAS_WINDOW, False, 1)  # BT unused: never loaded

    @triton.jit
    def _plugin_kernel_trt_paged(
        Q, Knew, Vnew, Kc, Vc, Pos, KScale, VScale, BT, Q_LEN, CAP, Out, KcOut, VcOut,
        QK_SCALE: tl.constexpr, WINDOW: tl.constexpr,
        H_Q: tl.constexpr, H_KV: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        FP8: tl.constexpr, HAS_WINDOW: tl.constexpr, PAGE: tl.constexpr,
    ):
        """The paged node (PagedAttentionBlockTable): block_tables is its ninth input; CAP = the table's width."""
        _plugin_body(Q, Knew, Vnew, Kc, Vc, Pos, KScale, VScale, BT, Out, KcOut, VcOut, QK_SCALE, WINDOW, Q_LEN, CAP,
                     H_Q, H_KV, D, BLOCK_M, BLOCK_N, FP8, HAS_WINDOW, True, PAGE)


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _cache_args(k_cache, v_cache, block_table):
    paged = block_table is not None
    page = k_cache.shape[2] if paged else 1
    if paged and page & (page - 1):
        raise ValueError(f"paged block size {page} must be a power of two")
    bt = block_table if paged else torch.zeros(1, 1, dtype=torch.int32, device=k_cache.device)
    return paged, page, bt


def _scales(k_scale, v_scale, k_cache):
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if fp8 and (k_scale is None or v_scale is None):
        raise ValueError("an FP8 cache needs k_scale and v_scale (one float32 per KV head)")
    dummy = torch.ones(1, dtype=torch.float32, device=k_cache.device)
    ks = k_scale.float().contiguous() if fp8 else dummy
    vs = v_scale.float().contiguous() if fp8 else dummy
    return fp8, ks, vs


def choose_splits(batch: int, kv_heads: int, span: int, block_n: int, sm_count: int = 132, waves: int = 4) -> int:
    """Enough (sequence, KV head, split) programs for `waves` per SM, but no split shorter than 4 tiles."""
    want = max(1, -(-sm_count * waves // (batch * kv_heads)))
    most = max(1, -(-span // (block_n * 4)))
    return min(want, most)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                     block_table: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, window: int = 0, sm_scale: float | None = None,
                     max_seq_len: int | None = None, num_splits: int | None = None,
                     block_n: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                     prefetch: bool | None = None) -> torch.Tensor:
    """Flash-decoding over the cache. q: [B, Hq, D] (one token each); returns [B, Hq, D] in q's dtype.

    max_seq_len bounds every seq_lens[b] (the host knows it; reading seq_lens back would sync).
    Tile defaults are the H100 sweep's best (benchmarks/NOTES.md): FP16 32 rows x 2 stages, FP8 64 x 3-4.
    """
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = q_heads // kv_heads
    paged, page, bt = _cache_args(k_cache, v_cache, block_table)
    fp8, ks, vs = _scales(k_scale, v_scale, k_cache)
    block_n = block_n or (64 if fp8 else 32)
    num_stages = num_stages or ((3 if paged else 4) if fp8 else 2)
    prefetch = (fp8 and paged) if prefetch is None else prefetch
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * page if paged else k_cache.shape[2]
    span = min(max_seq_len, window) if window > 0 else max_seq_len
    sm_count = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 8
    splits = num_splits or choose_splits(batch, kv_heads, span, block_n, sm_count)
    chunk = -(-span // splits)
    chunk = -(-chunk // block_n) * block_n
    splits = -(-span // chunk)
    dev = q.device
    opart = torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=dev)
    mpart = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=dev)
    lpart = torch.empty_like(mpart)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    _decode_split_kernel[(batch, kv_heads, splits)](
        q, k_cache, v_cache, bt, seq_lens, ks, vs, opart, mpart, lpart,
        scale, window, chunk,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0),
        opart.stride(0), opart.stride(1), opart.stride(2),
        mpart.stride(0), mpart.stride(1),
        G=group, G_PAD=max(16, _next_pow2(group)), D=head_dim, BLOCK_N=block_n,
        PAGED=paged, PAGE=page, FP8=fp8, HAS_WINDOW=window > 0, PREFETCH=prefetch,
        num_warps=num_warps, num_stages=num_stages,
    )
    out = torch.empty(batch, q_heads, head_dim, dtype=q.dtype, device=dev)
    _decode_combine_kernel[(batch, q_heads)](
        opart, mpart, lpart, out, splits,
        opart.stride(0), opart.stride(1), opart.stride(2), mpart.stride(0), mpart.stride(1),
        out.stride(0), out.stride(1),
        D=head_dim, S_PAD=max(2, _next_pow2(splits)), num_warps=4,
    )
    return out


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seq_lens: torch.Tensor, *,
                      block_table: torch.Tensor | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None, window: int = 0, sm_scale: float | None = None,
                      block_m: int = 64, block_n: int = 64, num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """Causal attention of q [B, Hq, Sq, D] (the last Sq positions of each sequence) over the cache."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    paged, page, bt = _cache_args(k_cache, v_cache, block_table)
    fp8, ks, vs = _scales(k_scale, v_scale, k_cache)
    out = torch.empty(batch, q_heads, q_len, head_dim, dtype=q.dtype, device=q.device)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    _prefill_kernel[(triton.cdiv(q_len, block_m), q_heads, batch)](
        q, k_cache, v_cache, bt, seq_lens, ks, vs, out,
        scale, window, q_len,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        G=q_heads // kv_heads, D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        PAGED=paged, PAGE=page, FP8=fp8, HAS_WINDOW=window > 0,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


PLUGIN_BLOCK_M = 16
PLUGIN_BLOCK_N = 64


def plugin_attention(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, position_ids: torch.Tensor, *, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, window: int = 0, sm_scale: float | None = None,
                     block_table: torch.Tensor | None = None,
                     block_m: int = PLUGIN_BLOCK_M, block_n: int = PLUGIN_BLOCK_N) -> torch.Tensor:
    """What the llmc::PagedAttention plugin launches: writes key/value into the caches in place at
    position_ids[:, 0] and returns attention over the updated cache (the ONNX function's semantics).
    With block_table [B, max_blocks] int32 the caches are pools [N, Hkv, block_size, D] (PagedAttentionBlockTable)."""
    batch, q_heads, q_len, head_dim = q.shape
    fp8, ks, vs = _scales(k_scale, v_scale, k_cache)
    paged, page, bt = _cache_args(k_cache, v_cache, block_table)
    out = torch.empty_like(q)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(head_dim)
    _plugin_kernel[(triton.cdiv(q_len, block_m), q_heads, batch)](
        q.contiguous(), key.contiguous(), value.contiguous(), k_cache, v_cache, position_ids.contiguous(), ks, vs,
        bt.to(torch.int32).contiguous(), out, scale, window, q_len, bt.shape[1] if paged else k_cache.shape[2],
        H_Q=q_heads, H_KV=k_cache.shape[1], D=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
        FP8=fp8, HAS_WINDOW=window > 0, PAGED=paged, PAGE=page, num_warps=4, num_stages=2,
    )
    return out
