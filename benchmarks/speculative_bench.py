"""Speculative decoding vs plain greedy decoding, side by side in one process (issue 25).

    python benchmarks/speculative_bench.py TARGET_ARTIFACT [--draft-artifact DIR] [--batch 1 8] [--new 64] [-k 4]

An artifact here is any folder with model.onnx and tokenizer/ (what `llmc build` writes). Every
configuration generates from the same prompts, greedy, after one untimed warm-up; each figure is the
median of --repeats runs. Two prompt sets: "repetitive" (the prompt quotes a passage a model may
copy: the n-gram proposer's case where the model copies) and "free" (short prompts). Batch b takes
the set's prompts in turn. Output: a markdown table (generate wall time including the shared
prefill, speedup vs plain, target forward passes per generated token, acceptance, mean accepted
tokens per sequence per target step) and whether each run printed plain greedy's tokens.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compiler.runtime.proposers import DraftProposer, NgramProposer  # noqa: E402
from compiler.runtime.runner import Runner  # noqa: E402
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor  # noqa: E402
from compiler.runtime.speculative import SpeculativeRunner  # noqa: E402

PASSAGE = ("ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n"
           "Arise, fair sun, and kill the envious moon,\nWho is already sick and pale with grief,\n")
PROMPTS = {
    "repetitive": [PASSAGE + "\n" + PASSAGE[:40], PASSAGE + PASSAGE[:60]],
    "free": ["KING RICHARD III:\n", "First Citizen:\nBefore we proceed any further, hear me speak."],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", type=Path)
    ap.add_argument("--draft-artifact", type=Path)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("-k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ngram-min", type=int, nargs="+", default=[1],
                    help="shortest n-gram match that proposes (one ngram row per value)")
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    args = ap.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target / "tokenizer", local_files_only=True)
    pad = tokenizer.pad_token_id or 0
    target = Runner(OnnxRuntimeExecutor(args.target / "model.onnx", threads=args.threads), pad_token_id=pad)
    proposers = {("ngram" if n == 1 else f"ngram n>={n}"): NgramProposer(max_n=max(3, n), min_n=n)
                 for n in args.ngram_min}
    if args.draft_artifact:
        proposers["draft"] = DraftProposer(OnnxRuntimeExecutor(args.draft_artifact / "model.onnx", threads=args.threads), pad)
    print(f"target {args.target}, draft {args.draft_artifact}, k = {args.k} (fixed), {args.new} new tokens, "
          f"onnxruntime {args.threads} thread(s), median of {args.repeats}")
    print("| prompts | batch | decoder | generate s | speedup | target steps / token | acceptance | accepted / step | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, texts in ((n, PROMPTS[n]) for n in args.prompts):
        for batch in args.batch:
            ids = [tokenizer(texts[i % len(texts)]).input_ids for i in range(batch)]
            runners = {"plain": target, **{p: SpeculativeRunner(target, prop, args.k) for p, prop in proposers.items()}}
            base = reference = None
            for label, runner in runners.items():
                runner.generate(ids, args.new)  # warm-up
                results, times = [], []
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    results.append(runner.generate(ids, args.new))
                    times.append(time.perf_counter() - start)
                wall = statistics.median(times)
                got = results[0]
                if label == "plain":
                    base, reference = wall, got.tokens
                    extra = ("-", "-")
                else:
                    extra = (f"{got.acceptance_rate:.1%}", f"{got.accepted_per_step:.2f}")
                print(f"| {name} | {batch} | {label} | {wall:.3f} | {base / wall:.2f}x | "
                      f"{got.steps / got.new_tokens * batch:.3f} | {extra[0]} | {extra[1]} | {got.tokens == reference} |")


if __name__ == "__main__":
    main()
