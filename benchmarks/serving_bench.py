"""In-flight batching against one-at-a-time serving, through the real server, measured by aiperf.

One artifact built with `llmc build --triton-cpu-fallback`; for each serving mode its Triton repository
is copied (hard links for the weights) with `llmc_scheduler_max_batch` set (0: today's one request
at a time, generate -> llm_onnx's runner; N: generate's in-flight scheduler with N rows), served by the bundled
tritonserver with llmc's OpenAI-compatible /v1/completions in front (compiler/serving/openai_api.py),
and driven by aiperf (a standard LLM load generator from PyPI, run as its own CLI from the venv given
by --aiperf) at each concurrency: streamed completions, synthetic prompts of a fixed token count,
fixed requested output length. aiperf reports time to first token, inter-token latency, output
tokens/s and requests/s from its own client-side timestamps and tokenizer (the artifact's).

`llmc bench` (compiler/serving/bench.py) is the command for users; this script keeps the side-by-side
comparison of serving modes behind the committed serving_bench_*.json.

Run: python benchmarks/serving_bench.py ARTIFACT --aiperf /path/to/venv/bin/aiperf
     [--concurrency 1 4 16] [--requests-per-client 4] [--isl 32] [--osl 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from compiler.serving.bench import METRICS, Limits, repository_with, run_aiperf
from compiler.serving.openai_api import OpenAIServer
from compiler.serving.serve import TritonServer

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--aiperf", required=True, help="the aiperf executable (its own venv: it pins its deps)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--only-inflight", type=int, nargs="*", default=[],
                        help="concurrencies run for the in-flight modes only (one at a time crashes at 64: NOTES)")
    parser.add_argument("--modes", type=int, nargs="+", default=[0, 16],
                        help="llmc_scheduler_max_batch values to compare (0: one request at a time)")
    parser.add_argument("--requests-per-client", type=int, default=4)
    parser.add_argument("--isl", type=int, default=32)
    parser.add_argument("--osl", type=int, default=64)
    parser.add_argument("--out", type=Path, default=Path("serving_bench.json"))
    args = parser.parse_args()

    results = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cores", "date": time.strftime(
        "%Y-%m-%d %H:%M UTC", time.gmtime()), "artifact": str(args.artifact), "isl": args.isl, "osl": args.osl, "runs": []}
    with tempfile.TemporaryDirectory(prefix="llmc-serving-bench-") as tmp:
        for mode in args.modes:
            repo = repository_with(args.artifact, Limits(mode), Path(tmp))
            with TritonServer(repo, log_path=Path(tmp) / f"server-b{mode}.log") as server:
                grpc = f"127.0.0.1:{server.grpc_port}"
                with OpenAIServer(grpc, model_name=args.artifact.name) as api:
                    for concurrency in [*args.concurrency, *(args.only_inflight if mode else [])]:
                        row = run_aiperf(args.aiperf, f"http://127.0.0.1:{api.port}", args.artifact / "tokenizer",
                                         concurrency, concurrency * args.requests_per_client, args.isl, args.osl,
                                         Path(tmp) / f"aiperf-b{mode}-c{concurrency}", args.artifact.name)
                        row.update(mode="one at a time" if mode == 0 else f"in-flight (max_batch {mode})",
                                   max_batch=mode, concurrency=concurrency)
                        results["runs"].append(row)
                        print(_line(row), flush=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


def _line(row: dict) -> str:
    parts = [f"{row['mode']:<28} c={row['concurrency']:<3}"]
    for key, label in METRICS.items():
        m = row[key]
        parts.append(f"{label} p50 {m.get('p50', m.get('avg', float('nan'))):.1f}" + (
            f" p99 {m['p99']:.1f}" if m.get("p99") is not None else "") if m else f"{label} -")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
