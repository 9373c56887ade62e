"""Decode cost before vs after the KV-cache rewrites, on onnxruntime CPU (issue: GQA fusion + KV IO).

Builds one small model (4 layers, hidden 512, 8 query / 2 KV heads), exports it once, and derives
two graphs: "before" (Concat-grown cache, repeat_kv Expand; recipe fp16 minus the two rewrites)
and "after" (GQA-native Attention, fixed-capacity cache updated by TensorScatter). Measures decode
ms/token at 256 and 1024 cached tokens in one process, and prints the KV bytes each graph moves
per decode step per layer, computed from the graphs' cache shapes.

Run: python benchmarks/kv_decode.py [--precision fp16|fp32] [--steps 20]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from compiler.frontend.default_model import make_tiny_model
from compiler.frontend.export import export_onnx
from compiler.frontend.load import load_model
from compiler.frontend.run_passes import run_passes
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.recipe import Recipe, Tolerance
from passes import PassContext

CONTEXTS = (256, 1024)


def build(graph_path: Path, passes: tuple[str, ...], capacity: int, out: Path) -> Path:
    model = ir.load(graph_path)
    from compiler.graph_io import ExportedGraph
    from compiler.graph_io import io_from_model

    graph, _ = run_passes(ExportedGraph(model, io_from_model(model)), Recipe("bench", "", passes, Tolerance(1, 1, 0)),
                          PassContext(max_positions=capacity))
    ir.save(graph.model, out)
    return out


def kv_bytes(kind: str, past: int, capacity: int, hq: int, hkv: int, d: int, elem: int) -> dict[str, int]:
    """Cache bytes moved per decode step per layer by the cache path (not attention's own reads)."""
    one = 2 * hkv * d * elem  # one token's K and V: the floor
    if kind == "before":
        # Concat reads P and writes P+1 tokens of K,V; repeat_kv writes the Hq-head copy (P+1 tokens).
        return {"read": 2 * past * hkv * d * elem, "write": 2 * (past + 1) * hkv * d * elem + 2 * (past + 1) * hq * d * elem,
                "floor": one}
    # TensorScatter: TensorRT's KV_CACHE_UPDATE writes one token in place (output aliased to input).
    return {"read": 0, "write": one, "floor": one,
            "onnxruntime_copy": 2 * 2 * capacity * hkv * d * elem}  # ORT's TensorScatter copies the buffer


def time_decode(path: Path, kind: str, past: int, capacity: int, steps: int, dtype) -> float:
    ex = OnnxRuntimeExecutor(path, optimization="all")  # speed, not numerics: every ORT fusion on
    io = ex.io
    rng = np.random.default_rng(0)
    if kind == "before":
        feeds = {"input_ids": np.array([[5]]), "attention_mask": np.ones((1, past + 1), np.int64),
                 "position_ids": np.array([[past]])}
        for n in io.past_names:
            feeds[n] = rng.standard_normal((1, io.num_kv_heads, past, io.head_dim)).astype(dtype)
    else:
        feeds = {"input_ids": np.array([[5]]), "position_ids": np.array([[past]])}
        for n in io.past_names:
            feeds[n] = rng.standard_normal((1, io.num_kv_heads, capacity, io.head_dim)).astype(dtype)
    for _ in range(3):
        ex.run(feeds)  # warm-up: allocations, thread pool
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        ex.run(feeds)  # same step repeated: cache length constant, so every step costs the same
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", choices=["fp16", "fp32"], default="fp16")
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    tail = ("cast-fp16", "cleanup") if args.precision == "fp16" else ("cleanup",)
    before_passes = ("cleanup", "rotary-2d-cache", *tail)
    after_passes = ("cleanup", "rotary-2d-cache", "gqa-native-attention", "kv-cache-scatter", *tail)
    dtype = np.float16 if args.precision == "fp16" else np.float32
    elem = np.dtype(dtype).itemsize
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = make_tiny_model(tmp / "m", hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
                                    intermediate_size=1408, vocab_size=2048)
        loaded = load_model(model_dir)
        exported = tmp / "export.onnx"
        ir.save(export_onnx(loaded).model, exported)
        spec = loaded.spec
        print(f"machine: {platform.processor() or platform.machine()}, model: 4 layers, hidden 512, 8/2 heads, "
              f"head_dim {spec.head_dim}, {args.precision}, onnxruntime CPU, {args.steps} steps each")
        print("| cached tokens | graph | capacity | median ms/token | cache bytes read/step/layer | written | floor |")
        print("|---|---|---|---|---|---|---|")
        max_ctx = max(CONTEXTS) + 16
        before = build(exported, before_passes, max_ctx, tmp / "before.onnx")
        after_max = build(exported, after_passes, max_ctx, tmp / "after.onnx")
        for past in CONTEXTS:
            tight = build(exported, after_passes, past + 16, tmp / f"after{past}.onnx")
            rows = [("before (Concat + repeat_kv)", "before", before, past + 1),
                    ("after (TensorScatter, GQA Attention)", "after", after_max, max_ctx),
                    ("after, capacity = context + 16", "after", tight, past + 16)]
            for label, kind, path, cap in rows:
                ms = time_decode(path, kind, past, cap, args.steps, dtype)
                b = kv_bytes(kind, past, cap, spec.num_heads, spec.num_kv_heads, spec.head_dim, elem)
                print(f"| {past} | {label} | {cap} | {ms:.2f} | {b['read']:,} | {b['write']:,} | {b['floor']:,} |")


if __name__ == "__main__":
    main()
