"""`llmc build` end to end: load -> export -> passes -> build -> validate -> package.

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

from passes import PassContext, needs_plugins

from . import __version__
from .backend import get_backend
from .build import build_engine
from .default_model import cache_root, default_model_dir
from .errors import AccuracyError, BadInputError, UnsupportedModelError
from .export import export_onnx
from .load import load_model, read_spec
from .package import StagedOutput, copy_tokenizer, tool_versions, write_report
from .pipeline import run_passes
from .recipe import load_recipe
from .triton_repo import triton_model_name, write_repository
from .types import BuildOptions, PassRecord
from .validate import DEFAULT_PROMPT, validate

EXTERNAL_DATA_THRESHOLD = 1 << 30  # protobuf's 2 GiB cap: put weights beside the graph well before it

STAGES = ("load", "export", "passes", "build", "validate", "package")


@dataclasses.dataclass
class BuildRequest:
    model: Path | None = None
    recipe: str = "fp16"
    output: Path | None = None
    options: BuildOptions = dataclasses.field(default_factory=BuildOptions)
    prompt: str = DEFAULT_PROMPT
    decode_steps: int = 16
    timing_cache: Path | None = None


class Progress:
    """Callbacks the CLI implements (rich spinners); the default prints nothing."""

    def stage_start(self, index: int, name: str) -> None: ...
    def stage_end(self, index: int, name: str, seconds: float, detail: str = "") -> None: ...
    def pass_done(self, record: PassRecord) -> None: ...


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
    output = (Path(request.output) if request.output else Path("artifacts") / model_path.resolve().name).resolve()
    check_output_path(output, model_path.resolve())
    timing_cache = request.timing_cache or cache_root() / "timing" / f"{backend.name}-{backend.version}.cache"

    def stage(index: int, name: str, fn: Callable, detail: Callable = lambda r: ""):
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
        exported = stage(1, "export", lambda: _export(loaded), lambda g: f"{len(g.model.graph)} nodes")
        ctx = PassContext(max_positions=request.options.max_seq, sliding_window=spec.sliding_window or 0)
        final, records = stage(2, "passes", lambda: _passes(exported, recipe, ctx, progress.pass_done),
                               lambda r: f"{len(r[0].model.graph)} nodes after {len(r[1])} passes")
        onnx_files = _save_onnx(final.model, out.path / "model.onnx")
        engine = stage(3, "build", lambda: build_engine(out.path / "model.onnx", out.path / "model.plan",
                                                         request.options, backend, timing_cache),
                       lambda e: f"{e.backend} {e.backend_version}, {e.plan_path.stat().st_size / 1e6:.2f} MB")
        result = stage(4, "validate", lambda: validate(loaded, out.path / "model.onnx", recipe.tolerance,
                                                        prompt=request.prompt, decode_steps=request.decode_steps,
                                                        max_positions=request.options.max_seq),
                       lambda v: f"max err {v.max_abs_error:.3g}, agreement {v.greedy_agreement:.0%}")
        name = triton_model_name(loaded.name)

        def package():
            write_repository(out.path / "triton", name, engine)
            copy_tokenizer(loaded.path, out.path / "tokenizer")
            report = {
                "status": "pass" if result.passed else "fail",
                "llmc_version": __version__,
                "model": {"name": loaded.name, "path": loaded.path, "architecture": loaded.spec.architecture,
                          "spec": loaded.spec, "parameters": loaded.num_parameters},
                "recipe": {"name": recipe.name, "source": recipe.source, "passes": recipe.passes,
                           "tolerance": recipe.tolerance},
                "options": request.options,
                "versions": tool_versions(),
                "backend": {"name": backend.name, "version": backend.version,
                            "supports_plugins": backend.supports_plugins, "timing_cache": engine.timing_cache},
                "timings_s": timings,
                "passes": records,
                "engine": {"layer_types": engine.layer_types, "io": engine.tensors},
                "sizes_bytes": {p.name: p.stat().st_size for p in [*onnx_files, engine.plan_path]},
                "numerics": result,
                "triton_model": f"triton/{name}",
                "warnings": _serving_warnings(backend),
            }
            write_report(out.path / "report.json", report)
            return report

        report = stage(5, "package", package)
        report["timings_s"]["total"] = sum(timings.values())
        write_report(out.path / "report.json", report)
        if not result.passed:
            failed = out.commit(output.with_name(output.name + ".failed"))
            raise AccuracyError(
                f"numerics outside recipe '{recipe.name}' tolerance: {'; '.join(result.failures)}; "
                f"the rejected build is in {failed} (report.json); try a higher-precision recipe"
            )
        report["output"] = str(out.commit())
        return report
