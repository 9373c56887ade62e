"""The `llmc` command line: `llmc build [MODEL_DIR]` and friends.

Errors the user can act on print one line and exit with a documented code (see errors.py);
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from compiler.errors import EXIT_CODES, LlmcError
from compiler.engine.engine_build import BuildOptions
from compiler.frontend.run_passes import PassRecord

err_console = Console(stderr=True, highlight=False)
out_console = Console(highlight=False)


class RichProgress:
    """Per-stage spinner and timing lines on stderr (plain lines when not a terminal)."""

    def __init__(self, console: Console):
        self.console = console
        self._status = None

    def stage_start(self, index: int, name: str) -> None:
        from compiler.driver.build import STAGES

        self._status = self.console.status(f"[{index + 1}/{len(STAGES)}] {name} ...")
        self._status.start()

    def stage_end(self, index: int, name: str, seconds: float, detail: str = "") -> None:
        from compiler.driver.build import STAGES

        if self._status:
            self._status.stop()
            self._status = None
        if detail.startswith("skipped"):
            self.console.print(f"[{index + 1}/{len(STAGES)}] {name:<9} {detail}")
            return
        extra = f"  ({detail})" if detail else ""
        self.console.print(f"[{index + 1}/{len(STAGES)}] {name:<9} done in {seconds:6.2f} s{extra}")

    def step(self, what: str, done: int, total: int) -> None:
        if self._status:
            self._status.update(f"{what} {done}/{total} ...")
        if not self.console.is_terminal:
            self.console.print(f"      {what} {done}/{total}")

    def note(self, text: str) -> None:
        self.console.print(f"      {text}", markup=False)

    def pass_done(self, record: PassRecord) -> None:
        flag = "changed" if record.modified else "no-op"
        check = record.check or {}
        extra = ""
        if check.get("max_abs") is not None:
            verdict = "ok" if check["within"] else f"OVER tolerance {check['tolerance_max_abs']:.3g}"
            extra = (f", max |dlogit| {check['max_abs']:.3g}, agreement {check['agreement']:.0%} ({verdict})")
        elif check.get("skipped"):
            extra = f", check skipped: {check['skipped']}"
        self.console.print(f"      pass {record.name:<16} {flag:<7} {record.nodes_before} -> {record.nodes_after} nodes{extra}",
                           markup=False)
        coverage = record.details.get("coverage")
        if coverage:
            self.console.print(f"           {coverage['summary']}", markup=False, soft_wrap=True)
            for module, m in coverage["matmuls"].items():
                if "skipped" in m:
                    self.console.print(f"           kept float: {module} [{m['k']}x{m['n']}]: {m['skipped']}", markup=False,
                                       soft_wrap=True)


def print_summary(report: dict) -> None:
    num = report["numerics"]
    table = Table(title=f"llmc build: {report['model']['name']} ({report['recipe']['name']})", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("backend", f"{report['backend']['name']} {report['backend']['version']}")
    table.add_row("stages", ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items()))
    table.add_row("sizes", ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in report["sizes_bytes"].items()))
    layers = report["engine"]["layer_types"]
    native = [k for k in ("ATTENTION_INPUT", "ROTARY_EMBEDDING", "KV_CACHE_UPDATE") if k in layers]
    table.add_row("native layers", ", ".join(f"{k} x{layers[k]}" for k in native) or "none")
    table.add_row("numerics", f"max |err| {num.max_abs_error:.4g}, mean |err| {num.mean_abs_error:.3g}, "
                              f"relative {num.max_rel_error:.3g}, greedy agreement {num.greedy_agreement:.1%} "
                              f"over {num.decode_steps + 1} tokens")
    quality = report.get("quality")
    if quality:
        table.add_row("held-out", f"perplexity {quality.reference_perplexity:.3f} (PyTorch) -> "
                                  f"{quality.compiled_perplexity:.3f} ({quality.ppl_delta:+.2%}), KL {quality.kl_mean:.4f}, "
                                  f"greedy agreement {quality.greedy_agreement:.1%} over {quality.agreement_tokens} "
                                  f"tokens; {quality.windows} windows of {quality.window} tokens")
    for record in report["passes"]:
        if record.details.get("coverage"):
            table.add_row("quantized", f"{record.name}: {record.details['coverage']['summary']}")
    weights = report["weights"]
    onnx_bytes = sum(v for k, v in report["sizes_bytes"].items() if k.startswith("model.onnx"))
    table.add_row("weights", f"{weights['parameters'] / 1e6:.2f}M params, floor {weights['floor_bytes'] / 1e6:.2f} MB "
                             f"(FP16 {weights['fp16_bytes'] / 1e6:.2f} MB); model.onnx {onnx_bytes / weights['floor_bytes']:.2f}x floor")
    for failure in report.get("failures", []):
        table.add_row("failure", failure)
    if report.get("cache"):
        stages = report["cache"]["stages"]
        table.add_row("cache", ", ".join(f"{k} {'hit' if v['hit'] else 'miss'}" for k, v in stages.items()))
    table.add_row("output", report.get("output", "?"))
    status = report["status"]
    table.add_row("result", "[green]PASS[/green]" if status == "pass" else "[red]FAIL[/red]")
    out_console.print(table)
    for warning in report.get("warnings", []):
        err_console.print(f"warning: {warning}", markup=False, soft_wrap=True)
    out_console.print(f"result: {status}")


def parse_fraction(text: str, option: str) -> float:
    """`2%` -> 0.02, `0.02` -> 0.02."""
    from compiler.errors import BadInputError

    raw = text.strip()
    try:
        return float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise BadInputError(f"{option} {text!r} is not a number; write 2% or 0.02") from None


def _fail(message: str, code: int):
    err_console.print(f"llmc: error: {message}", markup=False, soft_wrap=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="llmc")
def main() -> None:
    """llmc: compile a Hugging Face causal LM into a TensorRT engine and a Triton model repository."""


@main.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--recipe", default="fp16", show_default=True, help="Recipe name in recipes/ or a path to a .yaml.")
@click.option("--max-batch", default=1, show_default=True, type=int, help="Largest batch the engine accepts.")
@click.option("--max-seq", default=256, show_default=True, type=int, help="Largest total sequence (past + new) the engine accepts.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output directory [default: artifacts/<model-name>].")
@click.option("--prompt", default=None, help="Prompt for the numerics check against PyTorch.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="TensorRT timing cache file (reused across builds).")
@click.option("--calib-data", type=click.Path(path_type=Path),
              help="Calibration text for AWQ (plain text or JSONL with a 'text' field) [default: built-in sample].")
@click.option("--eval-data", type=click.Path(path_type=Path),
              help="Held-out text for perplexity / KL (plain text or JSONL) [default: built-in held-out sample].")
@click.option("--measure-quality/--no-measure-quality", default=None,
              help="Measure held-out perplexity / KL / agreement [default: on for quantizing recipes].")
@click.option("--triton-cpu-fallback", is_flag=True,
              help="Add llm_onnx to the Triton repository: serves model.onnx with onnxruntime where TensorRT can't run.")
@click.option("--check-passes", is_flag=True,
              help="Run the graph before and after every pass (onnxruntime) and record each pass's logit error; "
                   "an accuracy failure then names the first pass beyond its tolerance.")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Reuse each stage's output (export, passes, engine, validation) from earlier builds with the same "
                   "inputs; a change re-runs only the stages after it.")
@click.option("--max-ppl-delta", type=str, default=None,
              help="Accuracy budget: search per-matmul weight formats (the recipe's, then --promote-to, then FP16) for "
                   "the smallest model whose held-out perplexity rises at most this much (2% or 0.02). The chosen "
                   "assignment is written as recipe.yaml in the output.")
@click.option("--promote-to", type=click.Choice(["int8", "fp8"]), default="int8", show_default=True,
              help="With --max-ppl-delta: the weight-only format sensitive matmuls are promoted to before FP16.")
@click.option("--allow-pickle", is_flag=True,
              help="Accept pickle weights (*.bin/*.pt) when there are no safetensors. RISK: loading a pickle can "
                   "execute arbitrary code from the file; use only on files you trust.")
@click.option("--trust-remote-code", is_flag=True,
              help="Run the model directory's own Python (config auto_map) to load it. RISK: that code runs with "
                   "your permissions; use only on models you trust.")
@click.option("--draft", type=click.Path(path_type=Path), default=None,
              help="A smaller model with the same tokenizer, built into draft/ for speculative decoding "
                   "(`llmc generate --speculate draft`); the build checks that decoding with it changes nothing. "
                   "`bundled`: the bundled model's own draft.")
@click.option("--plan", "show_plan", is_flag=True,
              help="Check the inputs, print each stage with its cache hit or skip reason, and stop (no work).")
def build(model_dir, recipe, max_batch, max_seq, output, prompt, timing_cache, calib_data, eval_data, measure_quality,
          triton_cpu_fallback, check_passes, cache_dir, max_ppl_delta, promote_to, allow_pickle, trust_remote_code,
          draft, show_plan):
    """Compile MODEL_DIR (a local Hugging Face directory; default: the bundled tiny Llama)."""
    from compiler.driver.build import STAGES, BuildRequest, plan_build, run_build
    from compiler.errors import BuildInterrupted
    from compiler.driver.interrupt import interruptible, pending
    from compiler.measure.validate import DEFAULT_PROMPT

    try:
        request = BuildRequest(
            model=model_dir,
            recipe=recipe,
            output=output,
            options=BuildOptions(max_batch=max_batch, max_seq=max_seq),
            prompt=DEFAULT_PROMPT if prompt is None else prompt,
            timing_cache=timing_cache,
            calib_data=calib_data,
            eval_data=eval_data,
            measure_quality=measure_quality,
            triton_cpu_fallback=triton_cpu_fallback,
            check_passes=check_passes,
            cache_dir=cache_dir,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
            max_ppl_delta=None if max_ppl_delta is None else parse_fraction(max_ppl_delta, "--max-ppl-delta"),
            promote_to=promote_to,
            draft=draft,
        )
        if show_plan:
            for name, what in plan_build(request):
                place = f"[{STAGES.index(name) + 1}/{len(STAGES)}]" if name in STAGES else "     "  # draft/<stage>
                out_console.print(f"{place} {name:<9} {what}", markup=False)
            return
        with interruptible():  # Ctrl-C, CI timeouts: unwind at once or at the next safe point (interrupt.py)
            report = run_build(request, RichProgress(err_console))
    except LlmcError as exc:
        _fail(str(exc), exc.exit_code)
    except BuildInterrupted as exc:
        what = "interrupted by signal 2 (Ctrl-C)" if exc.signum == signal.SIGINT else \
            f"terminated by signal {exc.signum} ({signal.Signals(exc.signum).name})"
        _fail(f"build {what}; the output path holds the previous build or nothing", exc.exit_code)
    except KeyboardInterrupt:
        _fail("build interrupted (Ctrl-C); the output path holds the previous build or nothing", 130)
    print_summary(report)
    if pending() is not None:
        err_console.print(f"warning: signal {pending()} arrived after {report['output']} was complete; "
                          "the build was kept", markup=False, soft_wrap=True)


@main.command()
@click.argument("model_dir", required=False, type=click.Path(path_type=Path))
@click.option("--recipe", default="int4-awq", show_default=True, help="A recipe with one weight-quantization pass.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output directory [default: artifacts/<model>-sensitivity-<recipe>].")
@click.option("--by", type=click.Choice(["layer", "matmul", "both"]), default="both", show_default=True,
              help="Quantize one decoder layer at a time, one matmul at a time, or both.")
@click.option("--max-seq", default=256, show_default=True, type=int, help="Positions the measured graph holds.")
@click.option("--calib-data", type=click.Path(path_type=Path), help="Calibration text (plain or JSONL) for AWQ.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="Held-out text (plain or JSONL) to measure on.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle weights (RISK: can execute code from the file).")
@click.option("--trust-remote-code", is_flag=True, help="Run the model's own Python (RISK: runs with your permissions).")
@click.option("--cache-dir", type=click.Path(path_type=Path),
              help="Reuse (and store) the model's export in this stage cache: the same one `llmc build --cache-dir` uses.")
def analyze(model_dir, recipe, output, by, max_seq, calib_data, eval_data, allow_pickle, trust_remote_code, cache_dir):
    """Measure how much each layer / matmul of MODEL_DIR loses in the recipe's weight format (table + PNG)."""
    from compiler.commands.analyze import GRANULARITIES, AnalyzeRequest, run_analyze

    request = AnalyzeRequest(model=model_dir, recipe=recipe, output=output,
                             by=GRANULARITIES if by == "both" else (by,), max_seq=max_seq, calib_data=calib_data,
                             eval_data=eval_data, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                             cache_dir=cache_dir)
    try:
        result = run_analyze(request, lambda text: err_console.print(f"      {text}", markup=False))
    except LlmcError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("analyze interrupted (Ctrl-C); the output path holds the previous result or nothing", 130)
    out_console.print((Path(result["output"]) / "sensitivity.md").read_text(), markup=False)
    out_console.print(f"written: {result['output']}")


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
def report(artifact_dir):
    """Print the accuracy card (report.md) of a built ARTIFACT_DIR."""
    from rich.markdown import Markdown

    from compiler.report.card import read_card

    if not (artifact_dir / "report.json").is_file():
        _fail(f"{artifact_dir} has no report.json: not an llmc artifact (build one with `llmc build`)", 2)
    out_console.print(Markdown(read_card(artifact_dir)))


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--prompt", "prompts", multiple=True, required=True, help="Prompt text; repeat for a batch.")
@click.option("--max-new-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=0.0, show_default=True, type=float, help="0 = greedy.")
@click.option("--top-k", default=0, show_default=True, type=int, help="0 = no truncation.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--executor", type=click.Choice(["onnxruntime", "tensorrt"]), default="onnxruntime", show_default=True,
              help="onnxruntime runs model.onnx (CPU); tensorrt runs model.plan (needs a GPU TensorRT runs on).")
@click.option("--speculate", type=click.Choice(["ngram", "draft"]), default=None,
              help="Speculative decoding: the model verifies proposed tokens several at a time; the output is "
                   "the same as without it. ngram: prompt lookup; draft: a second artifact (--draft-artifact).")
@click.option("--draft-artifact", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="With --speculate draft: a smaller model built by `llmc build`, with the same tokenizer.")
@click.option("--num-draft-tokens", default=4, show_default=True, type=int,
              help="With --speculate: tokens proposed per step (fixed).")
def generate(artifact_dir, prompts, max_new_tokens, temperature, top_k, seed, executor, speculate, draft_artifact,
             num_draft_tokens):
    """Generate text from a built ARTIFACT_DIR; prints text, time to first token and tokens/s."""
    from compiler.commands.generate import run_generate

    try:
        result = run_generate(artifact_dir, list(prompts), max_new_tokens, temperature, top_k, seed, executor,
                              speculate, draft_artifact, num_draft_tokens)
    except LlmcError as exc:
        _fail(str(exc), exc.exit_code)
    for prompt, text in zip(prompts, result["texts"]):
        out_console.print(f"[bold]{prompt}[/bold]{text}", soft_wrap=True)
    out_console.print(
        f"executor {result['executor']}: time to first token {result['ttft_s'] * 1e3:.1f} ms, "
        f"{result['decode_tokens_per_s']:.1f} tokens/s decode, {result['new_tokens']} new tokens"
    )
    if "speculation" in result:
        spec = result["speculation"]
        out_console.print(
            f"speculation {spec['proposer']} (k = {spec['num_draft_tokens']}, fixed): acceptance "
            f"{spec['acceptance_rate']:.1%} ({spec['accepted']}/{spec['proposed']}), "
            f"{spec['accepted_per_target_step']:.2f} accepted tokens per target step, "
            f"{spec['target_steps']} target steps for {result['new_tokens']} new tokens "
            f"({spec['plain_target_steps']} without)", markup=False, soft_wrap=True)
        same = {True: "identical to", False: "DIFFERENT from", None: "sampled, so not comparable token by token with"}
        out_console.print(f"output {same[spec['identical_to_plain']]} plain decoding; wall-clock "
                          f"{spec['seconds']:.3f} s vs {spec['plain_seconds']:.3f} s plain: "
                          f"{spec['speedup']:.2f}x", markup=False, soft_wrap=True)
        if spec["unexcused_differences"]:
            _fail("; ".join(spec["unexcused_differences"]) + " (please report it)", 5)
        if spec["identical_to_plain"] is False:
            out_console.print("the outputs differ only where the model's own logits tie within "
                              "rounding (compiler/measure/speculation.py)", markup=False, soft_wrap=True)


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--port", default=8000, show_default=True, type=int, help="HTTP port (gRPC: port + 1).")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--openai-port", default=None, type=click.IntRange(1, 65535),
              help="Also answer OpenAI-compatible POST /v1/completions (streaming) on this port, relayed to Triton's "
                   "generate model: what LLM load generators (aiperf) and OpenAI clients speak.")
def serve(artifact_dir, port, host, openai_port):
    """Serve ARTIFACT_DIR's Triton repository with the bundled tritonserver (Ctrl-C stops it)."""
    from compiler.serving.serve import serve_forever

    try:
        serve_forever(artifact_dir, port, host, err_console, openai_port=openai_port)
    except LlmcError as exc:
        err_console.print(f"llmc: error: {exc}", markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)


@main.command()
@click.argument("artifact_dir", type=click.Path(path_type=Path))
def inspect(artifact_dir):
    """Print ARTIFACT_DIR's manifest, verify every file's sha256, and check the local TensorRT matches."""
    from compiler.report.inspect_artifact import inspect_artifact

    try:
        ok = inspect_artifact(artifact_dir, out_console, err_console)
    except LlmcError as exc:
        _fail(str(exc), exc.exit_code)
    if not ok:
        sys.exit(2)


@main.group()
def cache() -> None:
    """The stage cache (--cache-dir): bounded by LLMC_CACHE_MAX_GB (default 20), least recently used first out."""


@cache.command()
@click.argument("cache_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--max-gb", type=float, default=None, help="Keep at most this many GiB [default: LLMC_CACHE_MAX_GB or 20].")
@click.option("--max-entries", type=int, default=None, help="Keep at most this many entries.")
def prune(cache_dir, max_gb, max_entries):
    """Remove the least recently used entries of CACHE_DIR until it is within the bounds."""
    from compiler.driver.cache import StageCache, default_max_bytes

    store = StageCache(cache_dir)
    if max_gb is not None and max_gb < 0 or max_entries is not None and max_entries < 0:
        _fail("--max-gb and --max-entries must be >= 0", 2)
    max_bytes = default_max_bytes() if max_gb is None else int(max_gb * (1 << 30))
    removed = store.prune(max_bytes, max_entries)
    left = store.entries()
    out_console.print(f"removed {len(removed)} entries; {len(left)} left, "
                      f"{sum(size for _, size, _ in left) / (1 << 30):.2f} GiB", markup=False)


from compiler.commands.bench import bench  # noqa: E402 - its own module; registered here

main.add_command(bench)


@main.command("exit-codes")
def exit_codes():
    """Print the exit codes llmc uses."""
    for code, meaning in sorted(EXIT_CODES.items()):
        click.echo(f"{code}  {meaning}")


def run() -> None:
    """The `llmc` command: click's main, then an exit that skips the interpreter's teardown.

    Why: once a big build has printed its result, Python's final garbage collection walks every
    object the build made (the graph, torch modules, onnxruntime sessions): the process sat in
    gc_collect_main for 30-60+ s after `result: pass` on 135M-1B models on 2 cores. Every file is
    written and closed, staging removed and the lock released before main returns (try/finally
    inside the build), so nothing is lost by leaving at once. Tests call `main` in-process instead.
    """
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):  # sys.exit("message"): print it, exit 1 (as Python does)
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    run()
