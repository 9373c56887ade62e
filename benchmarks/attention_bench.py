"""Device run for issue 9: kernel numerics vs the reference, then decode bandwidth vs PyTorch SDPA.

Run on a CUDA machine from a folder holding plugins/ (python attention_bench.py [--quick]); prints
markdown tables and writes JSON to $OUT/attention_bench.json. Method: triton.testing.do_bench
(median, L2 flushed before every rep), fresh random inputs per shape, the K/V bytes counted once.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from plugins import attention_kernel as K  # noqa: E402
from plugins import attention_reference as R  # noqa: E402

PEAK = {"H100": 3.35e12, "H200": 4.8e12}  # datasheet HBM bytes/s (SXM)
Q_HEADS, KV_HEADS, PAGE = 32, 8, 16
HEAD_DIM = 128 if "--smoke" not in sys.argv else 32
RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


def median_ms(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.randn(1 << 29, device="cuda", dtype=torch.float16)  # 1 GiB
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3)


def to_paged(k: torch.Tensor, v: torch.Tensor, gen: torch.Generator):
    """K and V pools [B*nb, Hkv, PAGE, D] in one random block order, and the block table: a fragmented allocator's layout."""
    batch, heads, length, dim = k.shape
    nb = length // PAGE
    perm = torch.randperm(batch * nb, device=k.device, generator=gen)
    pools = []
    for cache in (k, v):
        raw = cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache
        blocks = raw.view(batch, heads, nb, PAGE, dim).permute(0, 2, 1, 3, 4).reshape(batch * nb, heads, PAGE, dim)
        pool = torch.empty_like(blocks)
        pool[perm] = blocks
        pools.append(pool.view(cache.dtype))
    return pools[0], pools[1], perm.view(batch, nb).to(torch.int32)


def numerics(dev="cuda", lens=(1, 1000, 4097, 8192), prefill_len=512, block=64) -> list[dict]:
    rows = []
    gen = torch.Generator(device=dev).manual_seed(0)
    lens = list(lens)
    for mode, q_len in (("decode", 1), ("prefill", prefill_len)):
        for group in (1, 4, 8):
            for paged in (False, True):
                for fp8 in (False, True):
                    for window in (0, 1024):
                        cap = max(lens)
                        kv = 8
                        q = torch.randn(len(lens), kv * group, q_len, HEAD_DIM, device=dev, generator=gen).half()
                        k = torch.randn(len(lens), kv, cap, HEAD_DIM, device=dev, generator=gen).half()
                        v = torch.randn(len(lens), kv, cap, HEAD_DIM, device=dev, generator=gen).half()
                        ks = vs = table = None
                        if fp8:
                            ks, vs = R.fp8_scales(k), R.fp8_scales(v)
                            k, v = R.quantize_fp8(k, ks), R.quantize_fp8(v, vs)
                        if paged:
                            k, v, table = to_paged(k, v, gen)
                        sl = torch.tensor([max(n, q_len) for n in lens], dtype=torch.int32, device=dev)
                        expected = R.attention_reference(q, k, v, sl, block_table=table, k_scale=ks, v_scale=vs,
                                                         window=window)
                        if mode == "decode":
                            out = K.decode_attention(q[:, :, 0].contiguous(), k, v, sl, block_table=table, k_scale=ks,
                                                     v_scale=vs, window=window, max_seq_len=cap, block_n=block)[:, :, None]
                        else:
                            out = K.prefill_attention(q, k, v, sl, block_table=table, k_scale=ks, v_scale=vs,
                                                      window=window, block_m=block, block_n=block)
                        finite = bool(torch.isfinite(out).all())
                        rel = ((out.float() - expected).norm() / expected.norm()).item()
                        mx = (out.float() - expected).abs().max().item()
                        rows.append(dict(mode=mode, group=group, paged=paged, fp8=fp8, window=window,
                                         rel_l2=rel, max_abs=mx, finite=finite))
    return rows


def tune(length: int, batch: int) -> dict:
    """Small sweep of tile / warps / stages on one bandwidth-bound shape; the best is used everywhere."""
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda").half()
    k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device="cuda").half()
    v = torch.randn_like(k)
    sl = torch.full((batch,), length, dtype=torch.int32, device="cuda")
    best = {}
    for fp8 in (False, True):
        kk, vv, ks, vs = k, v, None, None
        if fp8:
            ks, vs = R.fp8_scales(k), R.fp8_scales(v)
            kk, vv = R.quantize_fp8(k, ks), R.quantize_fp8(v, vs)
        results = []
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    cfg = dict(block_n=block_n, num_warps=warps, num_stages=stages)
                    try:
                        ms = median_ms(lambda: K.decode_attention(q, kk, vv, sl, k_scale=ks, v_scale=vs,
                                                                  max_seq_len=length, **cfg))
                    except Exception as exc:  # e.g. out of shared memory
                        log("tune skip", cfg, type(exc).__name__)
                        continue
                    results.append((ms, cfg))
        results.sort(key=lambda r: r[0])
        log(f"tune fp8={fp8} B={batch} L={length}: " + ", ".join(f"{ms*1e3:.0f}us {c}" for ms, c in results[:5]))
        best["fp8" if fp8 else "fp16"] = results[0][1]
    return best


def sdpa_best(q4, k, v):
    """Fastest SDPA backend with K/V expanded to Q's heads, and with enable_gqa (no expansion) if it runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    group = q4.shape[1] // k.shape[1]
    out = {}
    ke, ve = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q4, ke, ve)
                out[f"expanded/{backend.name}"] = median_ms(lambda: F.scaled_dot_product_attention(q4, ke, ve))
        except Exception as exc:
            log("sdpa", backend.name, "unavailable:", str(exc).splitlines()[0][:100])
    del ke, ve
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                    SDPBackend.MATH):
        try:
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
                out[f"gqa/{backend.name}"] = median_ms(
                    lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))
        except Exception as exc:
            log("sdpa gqa", backend.name, "unavailable:", str(exc).splitlines()[0][:100])
    return out


def decode_table(cfg: dict, peak: float, batches, lengths) -> list[dict]:
    rows = []
    gen = torch.Generator(device="cuda").manual_seed(1)
    for batch in batches:
        for length in lengths:
            torch.cuda.empty_cache()
            q = torch.randn(batch, Q_HEADS, HEAD_DIM, device=dev, generator=gen).half()
            k = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device=dev, generator=gen).half()
            v = torch.randn(batch, KV_HEADS, length, HEAD_DIM, device=dev, generator=gen).half()
            sl = torch.full((batch,), length, dtype=torch.int32, device="cuda")
            kv_bytes16 = 2 * k.numel() * 2
            qo = 2 * q.numel() * 2
            row = dict(B=batch, L=length, kv_bytes_fp16=kv_bytes16)
            ref = K.decode_attention(q, k, v, sl, max_seq_len=length, **cfg["fp16"])
            row["triton_fp16_linear_ms"] = median_ms(lambda: K.decode_attention(q, k, v, sl, max_seq_len=length,
                                                                                **cfg["fp16"]))
            kp, vp, table = to_paged(k, v, gen)
            got = K.decode_attention(q, kp, vp, sl, block_table=table, max_seq_len=length, **cfg["fp16"])
            row["paged_equals_linear"] = bool((got.float() - ref.float()).abs().max() < 1e-2)
            row["triton_fp16_paged_ms"] = median_ms(lambda: K.decode_attention(
                q, kp, vp, sl, block_table=table, max_seq_len=length, **cfg["fp16"]))
            del kp, vp
            ks, vs = R.fp8_scales(k), R.fp8_scales(v)
            k8, v8 = R.quantize_fp8(k, ks), R.quantize_fp8(v, vs)
            row["triton_fp8_linear_ms"] = median_ms(lambda: K.decode_attention(
                q, k8, v8, sl, k_scale=ks, v_scale=vs, max_seq_len=length, **cfg["fp8"]))
            k8p, v8p, table8 = to_paged(k8, v8, gen)
            row["triton_fp8_paged_ms"] = median_ms(lambda: K.decode_attention(
                q, k8p, v8p, sl, block_table=table8, k_scale=ks, v_scale=vs, max_seq_len=length, **cfg["fp8"]))
            del k8, v8, k8p, v8p
            sd = sdpa_best(q[:, :, None], k, v)
            row["sdpa"] = sd
            best_name = min(sd, key=sd.get) if sd else None
            row["sdpa_best"] = best_name
            row["sdpa_best_ms"] = sd.get(best_name) if best_name else None
            for key in ("triton_fp16_linear", "triton_fp16_paged"):
                row[key + "_pct"] = 100 * (kv_bytes16 + qo) / (row[key + "_ms"] * 1e-3) / peak
            for key in ("triton_fp8_linear", "triton_fp8_paged"):
                row[key + "_pct"] = 100 * (kv_bytes16 / 2 + qo) / (row[key + "_ms"] * 1e-3) / peak
            if best_name:
                row["sdpa_best_pct_unique_bytes"] = 100 * (kv_bytes16 + qo) / (row["sdpa_best_ms"] * 1e-3) / peak
            log(json.dumps({k2: (round(v2, 4) if isinstance(v2, float) else v2) for k2, v2 in row.items()}))
            rows.append(row)
            del q, k, v
    return rows


def main():
    if "--smoke" in sys.argv:  # CPU, Triton interpreter: checks the script's plumbing, not the GPU
        rows = numerics("cpu", lens=(1, 40, 64), prefill_len=16, block=16)
        print(max(r["rel_l2"] for r in rows), all(r["finite"] for r in rows), len(rows))
        return
    quick = "--quick" in sys.argv
    out_dir = os.environ.get("OUT", ".")
    name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in PEAK.items() if key in name), 3.35e12)
    RESULTS["device"] = name
    RESULTS["versions"] = dict(torch=torch.__version__, triton=triton.__version__)
    log("device", name, RESULTS["versions"])
    t0 = time.time()
    RESULTS["copy_bytes_per_s"] = copy_bandwidth()
    log(f"copy bandwidth {RESULTS['copy_bytes_per_s']/1e12:.2f} TB/s = {100*RESULTS['copy_bytes_per_s']/peak:.1f}% of datasheet {peak/1e12} TB/s")
    if "--no-numerics" not in sys.argv:
        RESULTS["numerics"] = numerics()
        worst = {}
        for r in RESULTS["numerics"]:
            key = (r["mode"], r["fp8"])
            worst[key] = max(worst.get(key, 0), r["rel_l2"])
        log("numerics worst rel L2 per (mode, fp8):", worst, "all finite:", all(r["finite"] for r in RESULTS["numerics"]))
        log(f"[{time.time()-t0:.0f}s]")
    cfg = tune(32768, 8)
    RESULTS["config"] = cfg
    log(f"[{time.time()-t0:.0f}s] config {cfg}")
    batches, lengths = ((1, 8), (1024, 8192)) if quick else ((1, 8, 64), (1024, 8192, 32768))
    RESULTS["decode"] = decode_table(cfg, peak, batches, lengths)
    with open(os.path.join(out_dir, "attention_bench.json"), "w") as fh:
        json.dump(RESULTS, fh, indent=1)
    log(f"\n[{time.time()-t0:.0f}s] {name}: % of datasheet peak {peak/1e12} TB/s "
        f"(copy {RESULTS['copy_bytes_per_s']/1e12:.2f} TB/s)")
    log("| B | L | fp16 lin us (%) | fp16 paged us (%) | fp8 lin us (%) | fp8 paged us (%) | best SDPA | SDPA us (% unique bytes) |")
    log("|---|---|---|---|---|---|---|---|")
    for r in RESULTS["decode"]:
        cells = [f"{r[k+'_ms']*1e3:.1f} ({r[k+'_pct']:.0f}%)" for k in
                 ("triton_fp16_linear", "triton_fp16_paged", "triton_fp8_linear", "triton_fp8_paged")]
        sd = f"{r['sdpa_best_ms']*1e3:.1f} ({r['sdpa_best_pct_unique_bytes']:.0f}%)" if r["sdpa_best"] else "n/a"
        log(f"| {r['B']} | {r['L']} | " + " | ".join(cells) + f" | {r['sdpa_best']} | {sd} |")


if __name__ == "__main__":
    main()
