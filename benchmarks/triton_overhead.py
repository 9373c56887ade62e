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
import os
import platform
import statistics
import time
import urllib.request
from pathlib import Path

from compiler.runtime.runner import Runner
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.serving.serve import TritonServer

PROMPTS = ["The compiler", "Once upon a time", "A tensor is a", "Hello"]


class Direct:
    """llmc's runner called in-process, as `llmc generate` does (AutoTokenizer, same stop token)."""

    def __init__(self, artifact: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(artifact / "tokenizer", local_files_only=True)
        # The same executor settings as the served llm_onnx (no spinning), so only Triton differs.
        self.runner = Runner(OnnxRuntimeExecutor(artifact / "model.onnx", spin=False),
                             pad_token_id=self.tok.pad_token_id or 0)
        self.stops = (self.tok.eos_token_id,) if self.tok.eos_token_id is not None else ()

    def run(self, prompt: str, max_tokens: int) -> dict:
        start = time.perf_counter()
        ids = self.tok(prompt).input_ids
        times = [time.perf_counter() - start for _ in self.runner.stream([ids], max_tokens, stop_tokens=self.stops)]
        return {"ttft": times[0], "tokens": len(times), "decode_s": times[-1] - times[0], "total": times[-1]}


def _post(url: str, body: dict):
    return urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})


def triton_stream(url: str, prompt: str, max_tokens: int, tokens: int) -> dict:
    start = time.perf_counter()
    arrivals = []
    with urllib.request.urlopen(_post(f"{url}/v2/models/generate/generate_stream",
                                      {"text_input": prompt, "max_tokens": max_tokens, "stream": True})) as r:
        for line in r:
            if line.startswith(b"data:"):
                arrivals.append(time.perf_counter() - start)
    return {"ttft": arrivals[0], "tokens": tokens, "decode_s": arrivals[-1] - arrivals[0], "total": arrivals[-1]}


def triton_whole(url: str, prompt: str, max_tokens: int) -> float:
    start = time.perf_counter()
    with urllib.request.urlopen(_post(f"{url}/v2/models/generate/generate",
                                      {"text_input": prompt, "max_tokens": max_tokens})) as r:
        r.read()
    return time.perf_counter() - start


def summary(rows: list[dict]) -> dict:
    med = statistics.median
    return {"median_ttft_ms": round(med(r["ttft"] for r in rows) * 1e3, 2),
            "median_decode_tokens_per_s": round(med((r["tokens"] - 1) / r["decode_s"] for r in rows), 1),
            "median_total_ms": round(med(r["total"] for r in rows) * 1e3, 2),
            "requests": len(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    direct = Direct(args.artifact)
    rows: dict[str, list] = {"runner": [], "triton_stream": [], "triton_whole_ms": []}
    with TritonServer(args.artifact / "triton", log_path=Path("/tmp/llmc-triton-bench.log")) as server:
        url = f"http://{server.url}"
        direct.run("warm up", 4), triton_whole(url, "warm up", 4)
        for _ in range(args.repeats):  # interleaved, so both paths see the same machine load
            for prompt in PROMPTS:
                ran = direct.run(prompt, args.max_tokens)
                rows["runner"].append(ran)
                rows["triton_stream"].append(triton_stream(url, prompt, args.max_tokens, ran["tokens"]))
                rows["triton_whole_ms"].append(triton_whole(url, prompt, args.max_tokens) * 1e3)
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}",
                      "max_tokens": args.max_tokens, "prompts": PROMPTS, "repeats": args.repeats,
                      "runner": summary(rows["runner"]), "triton_stream": summary(rows["triton_stream"]),
                      "triton_generate_median_ms": round(statistics.median(rows["triton_whole_ms"]), 2)}, indent=1))


if __name__ == "__main__":
    main()
