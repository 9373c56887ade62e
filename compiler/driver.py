"""`llmc build` end to end: load -> calibrate -> export -> passes -> build -> validate -> quality -> package.

Each stage is one module; this file only calls them in order, times them, and assembles the
report. Nothing is written at the output path until every stage has succeeded (or, for an
accuracy failure, the complete build is kept at `<out>.failed` for inspection).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from passes import NEEDS_CALIBRATION, PassContext, needs_plugins

from . import __version__
from .backend import get_backend
from .build import build_engine
from .calibrate import calibrate
from .corpus import default_calibration_text, default_eval_text, read_text_file
from .default_model import cache_root, default_model_dir
from .errors import AccuracyError, BadInputError, UnsupportedModelError
from .export import export_onnx
from .load import load_model, read_spec
from .package import StagedOutput, copy_tokenizer, tool_versions, write_report
from .pipeline import run_passes
from .quality import measure_quality
from .sizes import weight_footprint
from .recipe import load_recipe
from .runtime import io_from_onnx
from .triton_repo import write_repository
from .types import BuildOptions, PassRecord, ServingSpec
from .validate import DEFAULT_PROMPT, validate

EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf's 2 GiB cap: put weights beside the graph well before it

STAGES = ("load", "calibrate", "export", "passes", "build", "validate", "quality", "package")


@dataclasses.dataclass
class BuildRequest:
    model: Path | None = None
    recipe: str = "fp16"
    output: Path | None = None
    options: BuildOptions = dataclasses.field(default_factory=BuildOptions)
    prompt: str = DEFAULT_PROMPT
    decode_steps: int = 16
    timing_cache: Path | None = None
    calib_data: Path | None = None  # plain text / JSONL; default: the shipped calibration sample
    eval_data: Path | None = None  # held-out text for perplexity / KL; default: the shipped held-out sample
    measure_quality: bool | None = None  # None: only for recipes that quantize or set max_ppl_delta
    triton_cpu_fallback: bool = False  # add llm_onnx to the Triton repository


class Progress:
    """Callbacks the CLI implements (rich spinners); the default prints nothing."""

    def stage_start(self, index: int, name: str) -> None: ...
    def stage_end(self, index: int, name: str, seconds: float, detail: str = "") -> None: ...
    def pass_done(self, record: PassRecord) -> None: ...
    def step(self, what: str, done: int, total: int) -> None: ...


def _serving_warnings(backend) -> list[str]:
    if backend.name == "tensorrt_rtx":
        return [f"model.plan was built by TensorRT-RTX {backend.version}: Triton's TensorRT backend and "
                "data-center GPUs can't load it; rebuild with full TensorRT (pip install tensorrt) to serve it"]
    return []


def check_validation_fits(loaded, request: BuildRequest) -> None:
    """Fail before the expensive stages if the validation prompt can't fit the engine's positions."""
    needed = len(loaded.tokenizer(request.prompt).input_ids) + request.decode_steps
    if needed > request.options.max_seq:
        raise BadInputError(
            f"validation needs {needed} positions (prompt + {request.decode_steps} decode steps) but "
            f"--max-seq is {request.options.max_seq}; shorten --prompt or raise --max-seq"
        )


def _export(loaded):
    try:
        return export_onnx(loaded)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the first line says which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"torch.onnx export of {loaded.spec.architecture} failed: {first} "
            "(set LLMC_DEBUG=1 for the traceback; please report the model config)"
        ) from exc


def _passes(exported, recipe, ctx, on_pass):
    try:
        return run_passes(exported, recipe, ctx, on_pass)
    except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
        raise UnsupportedModelError(f"recipe '{recipe.name}' cannot be applied to this graph: {exc}") from exc


def check_output_path(output: Path, model_path: Path) -> None:
    """Refuse output paths whose replacement would destroy something that is not an llmc artifact."""
    if output == Path.cwd() or output in Path.cwd().parents or output == Path(output.anchor):
        raise BadInputError(f"output path {output} is the current directory or above it; pass -o <new-subdirectory>")
    if output == model_path or output in model_path.parents or model_path in output.parents:
        raise BadInputError(f"output path {output} overlaps the model directory {model_path}; choose another -o")
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / "report.json").is_file())):
        raise BadInputError(
            f"output path {output} exists and is not an llmc artifact (no report.json); "
            "llmc replaces only its own previous builds: remove it or choose another -o"
        )


def _save_onnx(model: ir.Model, path: Path) -> list[Path]:
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=path.name + ".data")
        return [path, path.with_name(path.name + ".data")]
    ir.save(model, path)
    return [path]


def run_build(request: BuildRequest, progress: Progress | None = None) -> dict:
    """Run every stage; returns the report (also written as report.json). Raises LlmcError subclasses."""
    progress = progress or Progress()
    timings: dict[str, float] = {}
    backend = get_backend()
    recipe = load_recipe(request.recipe)
    plugins = needs_plugins(recipe.passes)
    if plugins:  # before any export: TensorRT-RTX's parser would abort the process on the plugin node
        backend.require_plugins(f"recipe '{recipe.name}' (llmc::PagedAttention plugin node)")
    model_path = Path(request.model) if request.model else default_model_dir()
    spec = read_spec(model_path.expanduser().resolve())  # fail fast (bad dir, unsupported arch) before any output exists
    if spec.sliding_window and request.options.max_seq > spec.sliding_window and not plugins:
        raise UnsupportedModelError(
            f"--max-seq {request.options.max_seq} exceeds the model's sliding_window ({spec.sliding_window}); "
            "TensorRT's native attention has no window: use --max-seq <= the window, or the "
            "fp16-plugin / fp8kv recipe (full TensorRT) whose plugin applies it"
        )
    if request.options.max_seq > spec.max_position_embeddings:
        raise BadInputError(
            f"--max-seq {request.options.max_seq} exceeds the model's max_position_embeddings "
            f"({spec.max_position_embeddings}); lower --max-seq"
        )
    needs_calibration = any(p in NEEDS_CALIBRATION for p in recipe.passes)
    wants_quality = request.measure_quality if request.measure_quality is not None else (
        recipe.quantizes or recipe.max_ppl_delta is not None)
    calib_text = (read_text_file(request.calib_data, "--calib-data") if request.calib_data
                  else default_calibration_text()) if needs_calibration else None
    eval_text = (read_text_file(request.eval_data, "--eval-data") if request.eval_data
                 else default_eval_text()) if wants_quality else None
    output = (Path(request.output) if request.output else Path("artifacts") / model_path.resolve().name).resolve()
    check_output_path(output, model_path.resolve())
    timing_cache = request.timing_cache or cache_root() / "timing" / f"{backend.name}-{backend.version}.cache"

    def stage(index: int, name: str, fn: Callable | None, detail: Callable = lambda r: "", why_skipped: str = ""):
        if fn is None:
            progress.stage_end(index, name, 0.0, f"skipped: {why_skipped}")
            return None
        progress.stage_start(index, name)
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        progress.stage_end(index, name, timings[name], detail(result))
        return result

    with StagedOutput(output) as out:
        loaded = stage(0, "load", lambda: load_model(model_path),
                       lambda m: f"{m.spec.architecture}, {m.num_parameters / 1e6:.2f}M params")
        check_validation_fits(loaded, request)
        calibration = stage(
            1, "calibrate",
            (lambda: calibrate(loaded, calib_text, on_progress=lambda d, t: progress.step("calibrate", d, t)))
            if needs_calibration else None,
            lambda c: f"{c.tokens} tokens, {len(c.activations)} linear layers",
            why_skipped="no pass of this recipe needs calibration")
        exported = stage(2, "export", lambda: _export(loaded), lambda g: f"{len(g.model.graph)} nodes")
        ctx = PassContext(max_positions=request.options.max_seq,
                          activations=calibration.activations if calibration else None,
                          sliding_window=spec.sliding_window or 0)
        final, records = stage(3, "passes", lambda: _passes(exported, recipe, ctx, progress.pass_done),
                               lambda r: f"{len(r[0].model.graph)} nodes after {len(r[1])} passes")
        footprint = weight_footprint(final.model)
        onnx_files = _save_onnx(final.model, out.path / "model.onnx")
        engine = stage(4, "build", lambda: build_engine(out.path / "model.onnx", out.path / "model.plan",
                                                         request.options, backend, timing_cache),
                       lambda e: f"{e.backend} {e.backend_version}, {e.plan_path.stat().st_size / 1e6:.2f} MB")
        result = stage(5, "validate", lambda: validate(loaded, out.path / "model.onnx", recipe.tolerance,
                                                        prompt=request.prompt, decode_steps=request.decode_steps,
                                                        max_positions=request.options.max_seq),
                       lambda v: f"max err {v.max_abs_error:.3g}, agreement {v.greedy_agreement:.0%}")
        quality = stage(
            6, "quality",
            (lambda: measure_quality(loaded, out.path / "model.onnx", eval_text, capacity=request.options.max_seq))
            if wants_quality else None,
            lambda q: f"perplexity {q.reference_perplexity:.3f} -> {q.compiled_perplexity:.3f} "
                      f"({q.ppl_delta:+.2%}), KL {q.kl_mean:.4f}, agreement {q.greedy_agreement:.1%}",
            why_skipped="the recipe does not quantize (use --measure-quality)")
        failures = list(result.failures)
        if quality and recipe.max_ppl_delta is not None and quality.ppl_delta > recipe.max_ppl_delta:
            failures.append(
                f"held-out perplexity rose {quality.ppl_delta:.2%} ({quality.reference_perplexity:.3f} -> "
                f"{quality.compiled_perplexity:.3f}), over the recipe's max_ppl_delta {recipe.max_ppl_delta:.2%}")
        passed = not failures

        def package():
            copy_tokenizer(loaded.path, out.path / "tokenizer")
            tok = loaded.tokenizer
            serving = ServingSpec(
                max_batch=request.options.max_batch, max_seq=request.options.max_seq,
                io=io_from_onnx(out.path / "model.onnx"), tokenizer_dir=out.path / "tokenizer",
                onnx_files=tuple(onnx_files), pad_token_id=tok.pad_token_id or 0,
                stop_token_ids=tuple(t for t in [tok.eos_token_id] if t is not None),
                cpu_fallback=request.triton_cpu_fallback)
            triton_models = write_repository(out.path / "triton", engine, serving)
            report = {
                "status": "pass" if passed else "fail",
                "llmc_version": __version__,
                "model": {"name": loaded.name, "path": loaded.path, "architecture": loaded.spec.architecture,
                          "spec": loaded.spec, "parameters": loaded.num_parameters},
                "recipe": {"name": recipe.name, "source": recipe.source, "passes": recipe.passes,
                           "pass_options": recipe.pass_options, "tolerance": recipe.tolerance,
                           "max_ppl_delta": recipe.max_ppl_delta},
                "options": request.options,
                "versions": tool_versions(),
                "backend": {"name": backend.name, "version": backend.version,
                            "supports_plugins": backend.supports_plugins, "timing_cache": engine.timing_cache},
                "timings_s": timings,
                "passes": records,
                "engine": {"layer_types": engine.layer_types, "io": engine.tensors},
                "sizes_bytes": {p.name: p.stat().st_size for p in [*onnx_files, engine.plan_path]},
                "numerics": result,
                "quality": quality,
                "calibration": None if calibration is None else {
                    "tokens": calibration.tokens, "sequences": calibration.sequences,
                    "source": str(request.calib_data) if request.calib_data else "built-in sample"},
                "eval_data": None if eval_text is None else (str(request.eval_data) if request.eval_data
                                                               else "built-in held-out sample"),
                "weights": footprint,
                "precision": _precision_map(records),
                "failures": failures,
                "triton_model": "triton/llm",
                "triton_models": sorted(triton_models),
                "warnings": _serving_warnings(backend),
            }
            write_report(out.path / "report.json", report)
            return report

        report = stage(7, "package", package)
        report["timings_s"]["total"] = sum(timings.values())
        write_report(out.path / "report.json", report)
        if not passed:
            failed = out.commit(output.with_name(output.name + ".failed"))
            raise AccuracyError(
                f"accuracy outside recipe '{recipe.name}' limits: {'; '.join(failures)}; "
                f"the rejected build is in {failed} (report.json); try a less aggressive recipe "
                f"({_safer_recipe(recipe.name)})"
            )
        report["output"] = str(out.commit())
        return report


def _precision_map(records: list[PassRecord]) -> dict[str, str]:
    """HF module name -> weight format, from what each quantization pass reports it touched."""
    fmt = {"quantize-int4-rtn": "int4-rtn", "quantize-int4-awq": "int4-awq", "quantize-int8-wo": "int8",
           "quantize-fp8-wo": "fp8"}
    out = {}
    for r in records:
        for module in r.details.get("quantized", []):
            out[module] = fmt.get(r.name, r.name)
    return out


def _safer_recipe(name: str) -> str:
    if name.startswith("int4"):
        return "int8-wo or fp8-wo, or int4-awq with a smaller block_size"
    if name in ("int8-wo", "fp8-wo"):
        return "fp16"
    return "fp16"
