"""`llmc bench`: the running server driven by a standard LLM load generator, and the serving limits it chooses.

aiperf (PyPI; run as its own CLI from its own venv, because it pins its own dependencies) sends
streamed OpenAI completions to llmc's /v1/completions (compiler/serving/openai_api.py) in front of the
bundled tritonserver, at each concurrency, and reports time to first token, inter-token latency, output
tokens/s and requests/s from its own client-side timestamps and the artifact's tokenizer. A hand-written
request loop would measure itself; the load generator is the figure users compare across servers.

Limits are the `generate` / `llm_onnx` configs' `llmc_scheduler_max_batch` (0: one request at a time)
and `llmc_scheduler_tokens_per_step`. Each setting is served from a copy of the artifact's repository
(weights hard-linked where Triton allows), so the artifact, and its manifest, stay as built. With a
time-to-first-token objective (`--slo-ttft-ms`) the sweep's best setting (the highest output tokens/s
whose p50 TTFT meets it at the busiest concurrency that does) is written to `<ARTIFACT>.serving.json`
beside the artifact, which `llmc serve` applies (`limits_file`).

Cost per million output tokens = price per hour / 3600 / (output tokens/s) x 1e6: the machine's whole
price charged to the tokens it produced at that concurrency (the seeds' cost-per-token figure).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

METRICS = {"time_to_first_token": "TTFT ms", "inter_token_latency": "ITL ms",
           "output_token_throughput": "output tok/s", "request_throughput": "req/s"}
# Limits field -> config parameter (llmc_scheduler_policy is set from Limits.static)
LIMIT_KEYS = {"max_batch": "llmc_scheduler_max_batch", "tokens_per_step": "llmc_scheduler_tokens_per_step"}
POLICY_KEY = "llmc_scheduler_policy"
SCHEDULED_MODELS = ("generate", "llm_onnx")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_batch: int  # sequences in flight (0: one request at a time)
    tokens_per_step: int = 256
    static: bool = False  # a new batch only when the last one has finished

    @property
    def label(self) -> str:
        if self.max_batch == 0:
            return "one at a time"
        return f"{'static' if self.static else 'in-flight'} (max_batch {self.max_batch}, {self.tokens_per_step} tokens/step)"


def limits_file(artifact: Path) -> Path:
    """Where `llmc bench --slo-ttft-ms` writes the chosen limits and `llmc serve` reads them."""
    artifact = Path(artifact).resolve()
    return artifact.with_name(artifact.name + ".serving.json")


def read_limits(artifact: Path) -> Limits | None:
    path = limits_file(artifact)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        return Limits(int(data["max_batch"]), int(data["tokens_per_step"]), bool(data.get("static", False)))
    except (ValueError, KeyError, TypeError) as exc:
        from compiler.errors import BadInputError

        raise BadInputError(f"{path} is not a serving limits file ({exc}): delete it or rerun "
                            "`llmc bench --slo-ttft-ms`") from exc


def repository_with(artifact: Path, limits: Limits, root: Path) -> Path:
    """A copy of the artifact's repository with `limits` in the scheduled models' configs."""
    repo = root / f"triton-{'s' if limits.static else 'b'}{limits.max_batch}-t{limits.tokens_per_step}"
    # model.plan hard-linked; the ONNX files copied (onnx-ir refuses external data with more than one link)
    shutil.copytree(Path(artifact) / "triton", repo,
                    copy_function=lambda src, dst: os.link(src, dst) if src.endswith(".plan") else shutil.copy2(src, dst))
    for model in SCHEDULED_MODELS:
        path = repo / model / "config.pbtxt"
        if not path.is_file():
            continue  # llm_onnx exists only with --triton-cpu-fallback
        config = text_format.Parse(path.read_text(), mc.ModelConfig())
        values = {key: str(getattr(limits, field)) for field, key in LIMIT_KEYS.items()}
        if limits.static or POLICY_KEY in config.parameters:
            values[POLICY_KEY] = "static" if limits.static else "inflight"
        for key, value in values.items():
            if key not in config.parameters:
                from compiler.errors import BadInputError

                what = f"{key} (static batching)" if key == POLICY_KEY else key
                raise BadInputError(f"{path} has no {what}: rebuild the artifact with this llmc")
            config.parameters[key].string_value = value
        path.unlink()  # a copy, but write a new file all the same
        path.write_text(text_format.MessageToString(config))
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
        raise RuntimeError(f"aiperf failed (exit {result.returncode}): {' '.join(command)}\n"
                           f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    data = json.loads(exports[-1].read_text())
    row = {"command": " ".join(command)}
    for key in [*METRICS, "output_sequence_length", "request_latency", "request_count"]:
        value = data.get(key) or {}
        row[key] = {k: value.get(k) for k in ("avg", "p50", "p99", "unit") if k in value}
    return row


def find_aiperf(given: str | None) -> str:
    from compiler.errors import BadInputError

    path = given or shutil.which("aiperf")
    if not path or not (Path(path).is_file() and os.access(path, os.X_OK)):
        raise BadInputError(f"no aiperf executable{f' at {given}' if given else ' on PATH'}: install it in its own "
                            "venv (python -m venv V && V/bin/pip install aiperf) and pass --aiperf V/bin/aiperf")
    return path


def p50(row: dict, metric: str) -> float:
    m = row.get(metric) or {}
    value = m.get("p50", m.get("avg"))
    return float("nan") if value is None else float(value)


def cost_per_million(tokens_per_s: float, price_per_hour: float) -> float:
    """The machine's price per hour spread over the output tokens it made in that hour, per 1e6 tokens."""
    return price_per_hour / 3600 / tokens_per_s * 1e6 if tokens_per_s > 0 else float("inf")


def choose(rows: list[dict], slo_ttft_ms: float) -> dict | None:
    """At the busiest concurrency where some setting's p50 time to first token meets the objective, the
    setting with the highest output tokens/s there: serve the most users within it, then the fastest.
    (Throughput across concurrencies is not one scale: a lone client's row says nothing about load.)"""
    meeting = [r for r in rows if p50(r, "time_to_first_token") <= slo_ttft_ms]
    if not meeting:
        return None
    busiest = max(r["concurrency"] for r in meeting)
    return max((r for r in meeting if r["concurrency"] == busiest), key=lambda r: p50(r, "output_token_throughput"))


def table(rows: list[dict], price_per_hour: float | None) -> list[str]:
    cost = price_per_hour is not None
    out = ["| limits | concurrency | TTFT p50 / p99 ms | ITL p50 ms | output tok/s | req/s |"
           + (" $/M output tokens |" if cost else ""),
           "|---|---|---|---|---|---|" + ("---|" if cost else "")]
    for r in rows:
        ttft = r["time_to_first_token"]
        line = (f"| {r['limits']} | {r['concurrency']} | {ttft.get('p50', float('nan')):.1f} / "
                f"{ttft.get('p99', float('nan')):.1f} | {p50(r, 'inter_token_latency'):.1f} | "
                f"{p50(r, 'output_token_throughput'):.1f} | {p50(r, 'request_throughput'):.2f} |")
        if cost:
            line += f" {r['cost_per_million_output_tokens']:.2f} |"
        out.append(line)
    return out


def plot(rows: list[dict], path: Path) -> bool:
    """Output tokens/s against p50 TTFT, one line per limits setting through its concurrencies."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(r["limits"] for r in rows):
        mine = [r for r in rows if r["limits"] == label]
        ax.plot([p50(r, "time_to_first_token") for r in mine], [p50(r, "output_token_throughput") for r in mine],
                marker="o", label=label)
        for r in mine:
            ax.annotate(f"c{r['concurrency']}", (p50(r, "time_to_first_token"), p50(r, "output_token_throughput")),
                        fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel("p50 time to first token (ms, log)")
    ax.set_ylabel("output tokens/s")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_bench(artifact: Path, aiperf: str, settings: list[Limits], concurrency: list[int], out_dir: Path,
              requests_per_client: int = 4, isl: int = 32, osl: int = 64, price_per_hour: float | None = None,
              slo_ttft_ms: float | None = None, say=print) -> dict:
    """Serve each limits setting, drive it at each concurrency, write bench.json / bench.md / bench.png
    into out_dir; with an objective, write the chosen limits to `limits_file(artifact)`."""
    import platform
    import tempfile
    import time

    from compiler.serving.openai_api import OpenAIServer
    from compiler.serving.serve import TritonServer

    artifact = Path(artifact).resolve()
    if not (artifact / "triton" / "generate" / "config.pbtxt").is_file():
        from compiler.errors import BadInputError

        raise BadInputError(f"{artifact} has no Triton repository (triton/generate/config.pbtxt): benchmark an "
                            "artifact of `llmc build --triton-cpu-fallback`")
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "artifact": str(artifact),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "isl": isl, "osl": osl,
               "requests_per_client": requests_per_client, "price_per_hour": price_per_hour,
               "slo_ttft_ms": slo_ttft_ms, "runs": [], "chosen": None}
    with tempfile.TemporaryDirectory(prefix="llmc-bench-") as tmp:
        for limits in settings:
            repo = repository_with(artifact, limits, Path(tmp))
            with TritonServer(repo, log_path=Path(tmp) / f"{repo.name}.log") as server:
                with OpenAIServer(f"127.0.0.1:{server.grpc_port}", model_name=artifact.name) as api:
                    for c in concurrency:
                        row = run_aiperf(aiperf, f"http://127.0.0.1:{api.port}", artifact / "tokenizer", c,
                                         c * requests_per_client, isl, osl, Path(tmp) / f"aiperf-{repo.name}-c{c}",
                                         artifact.name)
                        row.update(limits=limits.label, max_batch=limits.max_batch,
                                   tokens_per_step=limits.tokens_per_step, static=limits.static, concurrency=c)
                        if price_per_hour is not None:
                            row["cost_per_million_output_tokens"] = cost_per_million(
                                p50(row, "output_token_throughput"), price_per_hour)
                        results["runs"].append(row)
                        say(table([row], price_per_hour)[-1])
    if slo_ttft_ms is not None:
        best = choose(results["runs"], slo_ttft_ms)
        if best is not None:
            results["chosen"] = {"max_batch": best["max_batch"], "tokens_per_step": best["tokens_per_step"],
                                 "static": best.get("static", False),
                                 "concurrency": best["concurrency"], "slo_ttft_ms": slo_ttft_ms,
                                 "output_tokens_per_s": p50(best, "output_token_throughput"),
                                 "ttft_p50_ms": p50(best, "time_to_first_token")}
            limits_file(artifact).write_text(json.dumps(results["chosen"], indent=2) + "\n")
    (out_dir / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"# llmc bench: {artifact.name}", "",
             f"{results['machine']}, {results['date']}; aiperf, streamed /v1/completions, {isl}-token prompts, "
             f"{osl} output tokens, {requests_per_client} requests per concurrent client.", "",
             *table(results["runs"], price_per_hour), ""]
    if slo_ttft_ms is not None:
        c = results["chosen"]
        lines.append(f"Objective p50 TTFT <= {slo_ttft_ms:g} ms: " + (
            f"max_batch {c['max_batch']}, {c['tokens_per_step']} tokens/step ({c['output_tokens_per_s']:.1f} output "
            f"tok/s at concurrency {c['concurrency']}, TTFT p50 {c['ttft_p50_ms']:.1f} ms), written to "
            f"{limits_file(artifact)}" if c else "no setting met it; nothing written"))
    if plot(results["runs"], out_dir / "bench.png"):
        lines += ["", "![throughput vs TTFT](bench.png)"]
    (out_dir / "bench.md").write_text("\n".join(lines) + "\n")
    return results
