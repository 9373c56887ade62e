"""What logits-fp32-topk costs on a GPU: the FP16 lm_head GEMM alone against it plus the refinement.

Why: passes/logits_fp32_topk.py adds, per logits position, a TopK over the vocabulary, a gather of K
weight rows, K x hidden FP32 multiply-adds and a scatter into FP32 logits. No engine runs here, so this
times the same operations in PyTorch on CUDA (cuBLAS FP16 GEMM with FP32 accumulation, as TensorRT's),
eager and as a replayed CUDA graph (TensorRT launches a whole engine, so the graph is the closer
figure), at Gemma 3 270M's lm_head (hidden 640, vocab 262144, tied) and a Llama 3.2 1B-shaped one
(2048, 128256), batch 1 / 8 / 64 (decode: one position a row).

    python benchmarks/logits_refine_cost.py            # on a CUDA machine; prints a table

Also checks, on fresh random inputs, that the refined logits' argmax is the float64 argmax and the
best K / 2 values by float64 are within 1e-4 relative of it (refined, not FP16-rounded).
"""

from __future__ import annotations

import statistics

import torch

K = 16
SHAPES = {"gemma3-270m": (640, 262144), "llama-1b": (2048, 128256)}
BATCHES = (1, 8, 64)


def lm_head(h16, table16):
    return h16 @ table16.T  # [B, V] FP16 (FP32 accumulation in cuBLAS)


def topk_wide(logits):
    """The pass as written: TopK over the widened (FP32) logits."""
    return torch.topk(logits.float(), K, dim=-1, sorted=False).indices


def topk_fp16(logits):
    """TopK over the FP16 logits themselves (half the bytes read)."""
    return torch.topk(logits, K, dim=-1, sorted=False).indices


def topk_two_stage(logits, chunk=1024):
    """Each chunk's max, the K best chunks, TopK inside those K chunks: every one of the K best values lies in
    a chunk whose max is among the K best maxima (at most K - 1 chunks can hold a larger value)."""
    b, v = logits.shape
    chunk = max(c for c in range(1, chunk + 1) if v % c == 0)  # the largest divisor of v up to `chunk`
    chunks = logits.view(b, v // chunk, chunk)
    best = torch.topk(chunks.amax(-1), K, dim=-1, sorted=False).indices  # [B, K]
    picked = chunks.gather(1, best[:, :, None].expand(b, K, chunk)).view(b, K * chunk)
    inner = torch.topk(picked, K, dim=-1, sorted=False).indices  # [B, K] into the picked chunks
    return best.gather(1, inner // chunk) * chunk + inner % chunk


TOPK = {"topk-fp32": topk_wide, "topk-fp16": topk_fp16, "two-stage": topk_two_stage}


def refined(h16, table16, topk=topk_wide):
    logits = lm_head(h16, table16)
    idx = topk(logits)  # [B, K]
    rows = table16[idx].float()  # [B, K, H]: the tied table's rows
    values = (rows @ h16.float()[:, :, None]).squeeze(-1)  # [B, K]
    return logits.float().scatter(-1, idx, values)


def timed(fn, reps=200):
    """Median microseconds of `fn` over `reps` runs, eager and as a replayed CUDA graph."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    eager = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        eager.append(a.elapsed_time(b) * 1e3)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(10):
        graph.replay()
    torch.cuda.synchronize()
    replay = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        replay.append(a.elapsed_time(b) * 1e3)
    return statistics.median(eager), statistics.median(replay)


def check(hidden, vocab, gen, topk):
    table = (torch.randn(vocab, hidden, generator=gen, device="cuda") * 0.05).half()
    h = torch.randn(4, hidden, generator=gen, device="cuda").half()
    got = refined(h, table, topk)
    exact = h.double() @ table.double().T
    top = torch.topk(exact, K // 2, dim=-1).indices  # well inside the K refined (at the K-th, FP16 order may differ)
    rel = ((got.gather(-1, top).double() - exact.gather(-1, top)).abs() / exact.gather(-1, top).abs()).max().item()
    assert torch.equal(got.argmax(-1), exact.argmax(-1)), "argmax differs from float64"
    assert rel < 1e-4, rel
    return rel


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False  # the refinement is FP32 products (TensorRT's FP32 MatMul)
    torch.set_float32_matmul_precision("highest")
    gen = torch.Generator(device="cuda").manual_seed(0)
    device = torch.cuda.get_device_name()
    bandwidth = 4.8e12 if "H200" in device else 3.35e12  # datasheet HBM bytes/s (H200, H100 SXM)
    print(device, "torch", torch.__version__)
    rows = []
    for name, (hidden, vocab) in SHAPES.items():
        table = (torch.randn(vocab, hidden, generator=gen, device="cuda") * 0.05).half()  # 335 / 525 MB: >> L2
        for batch in BATCHES:
            h = torch.randn(batch, hidden, generator=gen, device="cuda").half()
            base = timed(lambda: lm_head(h, table))
            floor_us = hidden * vocab * 2 / bandwidth * 1e6  # the table read once
            for label, topk in TOPK.items():
                rel = check(hidden, vocab, gen, topk)
                full = timed(lambda: refined(h, table, topk))
                logits = lm_head(h, table)
                alone = timed(lambda: topk(logits))
                rows.append((name, batch, label, floor_us, *base, *full, alone[1], rel))
    print(f"{'shape':12s} {'B':>3s} {'top-k':10s} {'floor':>6s} {'lm_head eager':>13s} {'graph':>6s} "
          f"{'+refine eager':>13s} {'graph':>6s} {'extra (graph)':>13s} {'top-k alone':>11s} {'max rel err':>11s}")
    for name, batch, label, floor_us, be, bg, fe, fg, tk, rel in rows:
        print(f"{name:12s} {batch:3d} {label:10s} {floor_us:6.1f} {be:13.1f} {bg:6.1f} {fe:13.1f} {fg:6.1f} "
              f"{fg - bg:+10.1f} us {tk:11.1f} {rel:11.1e}")


if __name__ == "__main__":
    main()
