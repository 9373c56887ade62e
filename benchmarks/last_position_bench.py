"""Prefill time with every position's logits vs the last position's only (passes/last_position_logits.py).

Usage: python benchmarks/last_position_bench.py ARTIFACT_OR_MODEL.onnx [--tokens N] [--repeats R]
Applies the pass to a copy of the graph (in a temporary folder), then times one prefill of N tokens
through llmc's onnxruntime executor on each graph (median of R, after one warm-up), checking that the
last position's logits agree.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from compiler.graph_io import LOGITS_AT
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from passes.last_position_logits import LastPositionLogitsPass


def prefill(executor: OnnxRuntimeExecutor, ids: np.ndarray, extra: dict, repeats: int) -> tuple[float, np.ndarray]:
    io = executor.io
    feeds = {"input_ids": ids, "position_ids": np.arange(ids.shape[1])[None], **extra,
             **{n: np.zeros((1, io.num_kv_heads, io.capacity, io.head_dim), executor.input_dtype(n))
                for n in io.past_names}}
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        logits = executor.run(feeds)["logits"]
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]), logits


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path = args.model / "model.onnx" if args.model.is_dir() else args.model
    with tempfile.TemporaryDirectory(prefix="llmc-last-") as tmp:
        model = ir.load(path)
        LastPositionLogitsPass()(model)
        after_path = Path(tmp) / "model.onnx"
        ir.save(model, after_path, external_data="model.onnx.data")
        del model
        before = OnnxRuntimeExecutor(path)
        tokens = args.tokens or before.io.capacity
        ids = np.random.default_rng(0).integers(4, before.io.vocab_size, (1, tokens)).astype(np.int64)
        t_before, full = prefill(before, ids, {}, args.repeats)
        del before
        after = OnnxRuntimeExecutor(after_path)
        t_after, last = prefill(after, ids, {LOGITS_AT: np.array([[tokens - 1]])}, args.repeats)
    diff = float(np.abs(full[0, -1].astype(np.float32) - last[0, 0].astype(np.float32)).max())
    print(f"{path}: prefill of {tokens} tokens, vocab {full.shape[-1]}: every position {t_before * 1e3:.0f} ms "
          f"(logits {full.nbytes / 1e6:.1f} MB), last position {t_after * 1e3:.0f} ms (logits {last.nbytes / 1e3:.1f} kB): "
          f"{t_before / t_after:.2f}x; max |diff| at the last position {diff}")


if __name__ == "__main__":
    main()
