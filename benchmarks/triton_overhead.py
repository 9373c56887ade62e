"""What Triton adds: time to first token and decode tokens/s through the served repository vs the runner.

CPU path, one process tree, same artifact, prompts and greedy settings: (1) llmc's Runner over
model.onnx called directly (what `llmc generate` does); (2) the bundled tritonserver serving the
artifact's repository (`generate` BLS -> preprocessing -> llm_onnx -> postprocessing), streamed over
HTTP (`/generate_stream`), time to first event and time between first and last event; and the
non-streamed `/generate` wall time. Needs an artifact built with `llmc build --triton-cpu-fallback`.

Run: python benchmarks/triton_overhead.py ARTIFACT_DIR [--max-tokens 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import urllib.request
from pathlib import Path

from compiler.runner import Runner
from compiler.runtime_onnx import OnnxRuntimeExecutor
from compiler.serve import TritonServer

PROMPTS = ["The compiler", "Once upon a time", "A tensor is a", "Hello"]


def direct(artifact: Path, prompts: list[str], max_tokens: int, repeats: int) -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(artifact / "tokenizer", local_files_only=True)
    runner = Runner(OnnxRuntimeExecutor(artifact / "model.onnx"), pad_token_id=tok.pad_token_id or 0)
    stops = (tok.eos_token_id,) if tok.eos_token_id is not None else ()
    runner.generate([tok("warm up").input_ids], 4)
    rows = []
    for _ in range(repeats):
        for prompt in prompts:
            start = time.perf_counter()
            ids = tok(prompt).input_ids
            times = [time.perf_counter() - start for _ in runner.stream([ids], max_tokens, stop_tokens=stops)]
            rows.append({"prompt": prompt, "ttft": times[0], "tokens": len(times), "decode_s": times[-1] - times[0]})
    return rows


def _post(url: str, body: dict):
    return urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def served(url: str, prompts: list[str], max_tokens: int, repeats: int, tokens: dict[str, int]) -> list[dict]:
    with urllib.request.urlopen(_post(f"{url}/v2/models/generate/generate", {"text_input": "warm up"})) as r:
        r.read()
    rows = []
    for _ in range(repeats):
        for prompt in prompts:
            start = time.perf_counter()
            arrivals = []
            with urllib.request.urlopen(_post(f"{url}/v2/models/generate/generate_stream",
                                              {"text_input": prompt, "max_tokens": max_tokens, "stream": True})) as r:
                for line in r:
                    if line.startswith(b"data:"):
                        arrivals.append(time.perf_counter() - start)
            start = time.perf_counter()
            with urllib.request.urlopen(_post(f"{url}/v2/models/generate/generate",
                                              {"text_input": prompt, "max_tokens": max_tokens})) as r:
                r.read()
            rows.append({"prompt": prompt, "ttft": arrivals[0], "tokens": tokens[prompt],
                         "decode_s": arrivals[-1] - arrivals[0], "total_nonstream": time.perf_counter() - start})
    return rows


def summary(rows: list[dict]) -> dict:
    ttft = statistics.median(r["ttft"] for r in rows) * 1e3
    rate = sum(r["tokens"] - 1 for r in rows) / sum(r["decode_s"] for r in rows)
    out = {"median_ttft_ms": round(ttft, 2), "decode_tokens_per_s": round(rate, 1),
           "tokens": sum(r["tokens"] for r in rows)}
    if "total_nonstream" in rows[0]:
        out["median_nonstream_ms"] = round(statistics.median(r["total_nonstream"] for r in rows) * 1e3, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runner_rows = direct(args.artifact, PROMPTS, args.max_tokens, args.repeats)
    tokens = {r["prompt"]: r["tokens"] for r in runner_rows}
    with TritonServer(args.artifact / "triton", log_path=Path("/tmp/llmc-triton-bench.log")) as server:
        triton_rows = served(f"http://{server.url}", PROMPTS, args.max_tokens, args.repeats, tokens)
    print(json.dumps({"machine": f"{platform.processor() or platform.machine()}, {platform.node()}",
                      "max_tokens": args.max_tokens, "prompts": PROMPTS, "repeats": args.repeats,
                      "runner": summary(runner_rows), "triton": summary(triton_rows)}, indent=1))


if __name__ == "__main__":
    main()
