"""Bytes moved per generated token for the two ways of serving an engine's KV cache through Triton (issue 28).

(a) `tensorrt_plan` with the cache as sequence-batcher implicit state: Triton's TensorRT backend binds
    a state's input and output to separate buffers and carries the output of step i into the input of
    step i+1 (implicit_state_management.md; tensorrt_backend src/instance_state.cc), so every token
    copies the sequence's whole cache twice (state -> input binding, output binding -> state): on the
    GPU while the states fit the CUDA memory pool (64 MB by default, --cuda-memory-pool-byte-size),
    over PCIe where they live in host memory (the initial state is host memory).
(b) llmc's TensorRT executor inside a Python model (compiler/serving/triton_models/llm.py): the cache is
    bound in place on the GPU (present.* at past_key_values.*'s address), so per token only the ids and
    positions go up (2 x int64) and one row of logits comes back (vocab x float32). A step whose rows are
    not one run of the cache buffer adds a device-to-device gather + scatter of those rows' caches
    (compiler/runtime/device_cache.py): 2 x the per-sequence cache, on the GPU only.

Both designs write the new token's K and V (the floor, layers x 2 x kv_heads x head_dim x bytes): not counted.
Usage: python benchmarks/serving_bytes.py CONFIG.json [CONFIG.json ...] [--max-seq N ...] [--bytes 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

POOL = 64 << 20  # Triton's default CUDA memory pool per GPU


def shape(config: Path) -> dict:
    c = json.loads(config.read_text())
    c = c.get("text_config", c)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return {"name": config.parent.name, "layers": c["num_hidden_layers"], "kv_heads": c["num_key_value_heads"],
            "head_dim": head_dim, "vocab": c["vocab_size"], "max_positions": c["max_position_embeddings"]}


def per_token(s: dict, max_seq: int, nbytes: int) -> dict:
    kv_token = s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * nbytes
    cache = kv_token * max_seq  # one sequence's whole cache at capacity max_seq
    state_tensor = cache // (2 * s["layers"])  # one declared state (one layer's K or V)
    logits = s["vocab"] * 4
    return {"kv_floor": kv_token, "cache": cache, "state_tensor": state_tensor,
            "a_implicit_state": 2 * cache + logits, "a_over_pcie": cache > POOL,
            "b_in_place": logits + 2 * 8, "b_gathered_step_device": 2 * cache + logits + 2 * 8}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs", nargs="+", type=Path)
    ap.add_argument("--max-seq", type=int, nargs="*", default=[])
    ap.add_argument("--bytes", type=int, default=2, help="bytes per cache element (FP16: 2, FP8: 1)")
    args = ap.parse_args()
    print("| model | max_seq | KV floor / token | cache / sequence | (a) implicit state / token / seq | "
          "(a) where | (b) llmc executor / token / seq | (a) / (b) |")
    print("|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        s = shape(config)
        for max_seq in [*args.max_seq, s["max_positions"]]:
            r = per_token(s, max_seq, args.bytes)
            where = "host memory, PCIe both ways" if r["a_over_pcie"] else "GPU (fits the 64 MB pool)"
            print(f"| {s['name']} | {max_seq} | {r['kv_floor']:,} B | {r['cache'] / 1e6:,.1f} MB | "
                  f"{r['a_implicit_state'] / 1e6:,.1f} MB | {where} | {r['b_in_place'] / 1e6:.3f} MB | "
                  f"{r['a_implicit_state'] / r['b_in_place']:,.0f}x |")


if __name__ == "__main__":
    main()
