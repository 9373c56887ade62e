"""`llmc bench ARTIFACT`: serving figures from a standard load generator (compiler/serving/bench.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from compiler.errors import LlmcError


@click.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--aiperf", "aiperf", help="aiperf executable (its own venv: pip install aiperf) [default: on PATH]")
@click.option("--concurrency", "concurrency", default="1,4,16,64", show_default=True,
              help="Concurrent streaming clients, comma-separated.")
@click.option("--max-batch", "max_batch", default="16", show_default=True,
              help="Scheduler sequences in flight to try, comma-separated (0: one request at a time).")
@click.option("--tokens-per-step", "tokens_per_step", default="256", show_default=True,
              help="Scheduler token budgets per graph call to try, comma-separated.")
@click.option("--static", "static", is_flag=True,
              help="Also serve each in-flight setting as static batching (a batch waits for its longest request).")
@click.option("--requests-per-client", default=4, show_default=True, type=click.IntRange(1))
@click.option("--isl", default=32, show_default=True, type=click.IntRange(1), help="Prompt tokens per request.")
@click.option("--osl", default=64, show_default=True, type=click.IntRange(1), help="Output tokens per request.")
@click.option("--price-per-hour", type=click.FloatRange(0, min_open=True),
              help="The machine's price per hour: adds the cost per million output tokens.")
@click.option("--slo-ttft-ms", type=click.FloatRange(0, min_open=True),
              help="Pick the highest-throughput setting whose p50 time to first token meets this, and write it "
                   "to ARTIFACT.serving.json beside the artifact, which `llmc serve` applies.")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("bench"), show_default=True,
              help="Directory for bench.json, bench.md and bench.png.")
def bench(artifact_dir, aiperf, concurrency, max_batch, tokens_per_step, static, requests_per_client, isl, osl,
          price_per_hour, slo_ttft_ms, output):
    """Drive ARTIFACT_DIR's server with aiperf: TTFT, inter-token latency, tokens/s, requests/s (p50, p99)."""
    from compiler.commands.cli import err_console, out_console
    from compiler.serving.bench import Limits, find_aiperf, run_bench

    try:
        settings = [Limits(b, t) for b in _ints(max_batch, "--max-batch", 0) for t in _ints(tokens_per_step,
                                                                                              "--tokens-per-step", 1)
                    if b == 0 or t >= b]
        settings = list(dict.fromkeys(Limits(0, 256) if s.max_batch == 0 else s for s in settings))
        if static:
            settings += [Limits(s.max_batch, s.tokens_per_step, static=True) for s in settings if s.max_batch]
        if not settings:
            raise click.BadParameter("every --tokens-per-step is below its --max-batch: a step must fit every decode")
        results = run_bench(artifact_dir, find_aiperf(aiperf), settings, _ints(concurrency, "--concurrency", 1),
                            output, requests_per_client, isl, osl, price_per_hour, slo_ttft_ms,
                            say=lambda line: out_console.print(line, markup=False, soft_wrap=True))
    except LlmcError as exc:
        err_console.print(f"llmc: error: {exc}", markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except RuntimeError as exc:  # aiperf or the server failed: its command and output are in the message
        err_console.print(f"llmc: error: {exc}", markup=False, soft_wrap=True)
        sys.exit(1)
    out_console.print(f"wrote {output}/bench.json, bench.md" + (", bench.png" if (output / "bench.png").exists() else ""),
                      markup=False)
    if results["chosen"]:
        c = results["chosen"]
        out_console.print(f"chosen: max_batch {c['max_batch']}, {c['tokens_per_step']} tokens/step "
                          f"(written beside the artifact; llmc serve applies it)", markup=False)
    elif slo_ttft_ms is not None:
        out_console.print(f"no setting met p50 TTFT <= {slo_ttft_ms:g} ms; nothing written", markup=False)


def _ints(text: str, flag: str, low: int) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{flag} takes comma-separated integers (got {text!r})") from None
    if not values or min(values) < low:
        raise click.BadParameter(f"{flag} takes comma-separated integers >= {low} (got {text!r})")
    return values
