"""Prefix reuse in the linear cache (compiler/runtime/kv_slots.py): a chat's next turn, with and without it.

    python benchmarks/prefix_reuse_bench.py ARTIFACT [--history 256] [--turn 16] [--answer 32] [--repeats 3]

Turn 1: a prompt of --history tokens (held-out text) answered with --answer tokens. Turn 2: turn 1's
prompt + answer + --turn new tokens. "reuse": turn 2 goes to the scheduler that served turn 1 (the freed
row holds the history); "cold": a fresh scheduler over the same executor. Reported: turn 2's time to
first token (median of --repeats), the prompt positions computed, and whether both gave the same tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.frontend.corpus import default_eval_text  # noqa: E402
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor  # noqa: E402
from compiler.runtime.scheduler import Request, Scheduler  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--history", type=int, default=256)
    ap.add_argument("--turn", type=int, default=16)
    ap.add_argument("--answer", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.artifact / "tokenizer", local_files_only=True)
    ids = tokenizer(default_eval_text()).input_ids
    first, extra = ids[: args.history], ids[args.history: args.history + args.turn]
    executor = OnnxRuntimeExecutor(args.artifact / "model.onnx", threads=args.threads)
    pad = tokenizer.pad_token_id or 0
    results = {"reuse": [], "cold": []}
    tokens = {}
    for _ in range(args.repeats):
        warm = Scheduler(executor, max_batch=2, pad_token_id=pad)
        turn1 = warm.generate([Request(first, args.answer)])[0]
        second = first + turn1 + extra
        for mode, scheduler in (("reuse", warm), ("cold", Scheduler(executor, max_batch=2, pad_token_id=pad))):
            handle = scheduler.submit(Request(second, 8))
            scheduler.run_until_idle()
            results[mode].append((handle.time_to_first_token_s, len(second) - handle.prefix_reused))
            tokens[mode] = handle.tokens
    print(f"{args.artifact.name}: turn 2 = {args.history} + {args.answer} + {args.turn} tokens, "
          f"onnxruntime {args.threads} threads, median of {args.repeats}")
    print("| turn 2 | TTFT ms | prompt positions computed | same tokens |")
    print("|---|---|---|---|")
    for mode, rows in results.items():
        print(f"| {mode} | {statistics.median(r[0] for r in rows) * 1e3:.1f} | {rows[0][1]} | "
              f"{tokens[mode] == tokens['cold']} |")


if __name__ == "__main__":
    main()
