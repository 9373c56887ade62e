"""In-flight batching against one-at-a-time serving, through the real server, measured by aiperf.

One artifact built with `llmc build --triton-cpu-fallback`; for each serving mode its Triton repository
is copied (hard links for the weights) with `llmc_scheduler_max_batch` set (0: today's one request
at a time, generate -> llm_onnx's runner; N: generate's in-flight scheduler with N rows), served by the bundled
tritonserver with llmc's OpenAI-compatible /v1/completions in front (compiler/serving/openai_api.py),
and driven by aiperf (a standard LLM load generator from PyPI, run as its own CLI from the venv given
by --aiperf) at each concurrency: streamed completions, synthetic prompts of a fixed token count,
fixed requested output length. aiperf reports time to first token, inter-token latency, output
tokens/s and requests/s from its own client-side timestamps and tokenizer (the artifact's).

Run: python benchmarks/serving_bench.py ARTIFACT --aiperf /path/to/venv/bin/aiperf
     [--concurrency 1 4 16] [--requests-per-client 4] [--isl 32] [--osl 64] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from compiler.serving.openai_api import OpenAIServer
from compiler.serving.serve import TritonServer

METRICS = {"time_to_first_token": "TTFT ms", "inter_token_latency": "ITL ms",
           "output_token_throughput": "output tok/s", "request_throughput": "req/s"}


def repository_for(artifact: Path, max_batch: int, root: Path) -> Path:
    """A copy of the artifact's repository with the scheduler size set in generate's and llm_onnx's configs
    (the artifact is untouched)."""
    repo = root / f"triton-b{max_batch}"
    # model.plan hard-linked; the ONNX files copied (onnx-ir refuses external data with more than one link)
    shutil.copytree(artifact / "triton", repo,
                    copy_function=lambda src, dst: os.link(src, dst) if src.endswith(".plan") else shutil.copy2(src, dst))
    pattern = r'(key: "llmc_scheduler_max_batch"\s*value \{\s*string_value: ")\d+(")'
    for model in ("generate", "llm_onnx"):
        config = repo / model / "config.pbtxt"
        text = config.read_text()
        if not re.search(pattern, text):
            raise SystemExit(f"{config} has no llmc_scheduler_max_batch: rebuild the artifact with this llmc")
        config.unlink()  # a copy, but write a new file all the same
        config.write_text(re.sub(pattern, rf"\g<1>{max_batch}\g<2>", text))
    return repo


def run_aiperf(aiperf: str, url: str, tokenizer: Path, concurrency: int, requests: int, isl: int, osl: int,
               out_dir: Path, model: str) -> dict:
    command = [aiperf, "profile", "--model", model, "--url", url, "--endpoint-type", "completions", "--streaming",
               "--tokenizer", str(tokenizer), "--concurrency", str(concurrency), "--request-count", str(requests),
               "--warmup-request-count", str(min(concurrency, 4)),
               "--prompt-input-tokens-mean", str(isl), "--prompt-input-tokens-stddev", "0",
               "--prompt-output-tokens-mean", str(osl), "--prompt-output-tokens-stddev", "0",
               "--extra-inputs", "temperature:0", "--random-seed", "0", "--ui-type", "none",
               "--output-artifact-dir", str(out_dir), "--no-gpu-telemetry", "--no-server-metrics",
               "--request-timeout-seconds", "180"]  # a server that died fails the row instead of hanging it
    # aiperf's offline mode looks a local tokenizer path up as a hub cache entry and fails (HFValidationError):
    # a local directory loads without it, and nothing here reaches a hub.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    exports = sorted(out_dir.rglob("profile_export_aiperf.json"))
    if result.returncode != 0 or not exports:
        raise SystemExit(f"aiperf failed (exit {result.returncode}): {' '.join(command)}\n"
                         f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    data = json.loads(exports[-1].read_text())
    row = {"command": " ".join(command)}
    for key in [*METRICS, "output_sequence_length", "request_latency", "request_count"]:
        value = data.get(key) or {}
        row[key] = {k: value.get(k) for k in ("avg", "p50", "p99", "unit") if k in value}
    return row


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
            repo = repository_for(args.artifact, mode, Path(tmp))
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
