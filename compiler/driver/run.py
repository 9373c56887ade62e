"""`llmc build` end to end: load -> calibrate -> reference -> export -> precision -> passes -> build -> validate
-> quality -> package.

Each stage is one module; this file only calls them in order, times them, and assembles the
report. Everything that can be checked without loading weights (model files, recipe, options,
output path, the lock) is checked first, before any output exists. Nothing is written at the
output path until every stage has succeeded (or, for an accuracy failure, the complete build is
kept at `<out>.failed` for inspection). With a cache directory, stages whose inputs are unchanged
are restored instead of recomputed (compiler/driver/cache.py says what each key covers).

Memory: the PyTorch model is used only up to the export. The reference stage computes everything
validate and quality compare against (decode logits, held-out log-probabilities, greedy
continuations) first, and the model is dropped after the export, so it is never resident beside the
graph's own weights or the onnxruntime session (at 1B, 4.9 GB each in FP32). validate and quality
share one onnxruntime session.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
import time
from pathlib import Path
from typing import Callable

import onnx_ir as ir

from passes import NEEDS_CALIBRATION, PassContext, needs_plugins

from compiler import __version__
from compiler.engine.backend import get_backend
from compiler.engine.engine_build import build_engine, build_engine_isolated
from compiler.driver.cache import StageCache, stage_keys
from compiler.frontend.calibrate import calibrate
from compiler.frontend.corpus import default_calibration_text, default_eval_text, read_text_file
from compiler.frontend.default_model import cache_root, default_model_dir
from compiler.errors import AccuracyError, BadInputError, OutputWriteError, UnsupportedModelError
from compiler.frontend.export import export_onnx
from compiler.driver.interrupt import checkpoint
from compiler.frontend.load import check_model_files, load_model, read_spec
from compiler.driver.lock import OutputLock
from compiler.report.manifest import write_manifest
from compiler.runtime.memory import own_peak_rss_bytes, release_freed_memory
from compiler.driver.staged_output import StagedOutput
from compiler.frontend.tokenizer_files import copy_tokenizer
from compiler.report.report_json import tool_versions, write_report
from compiler.measure.pass_check import describe_divergence, first_divergent
from compiler.frontend.run_passes import run_passes
from compiler.report.card import write_card
from compiler.measure.precision_search import SAFER, Evaluator, SearchResult, quant_entry, search_budget
from compiler.measure.quality import QUALITY_WINDOW, QualityReference, quality_reference, score
from compiler.measure.sizes import weight_footprint
from compiler.driver.preflight import check_max_seq, check_output_path, check_output_writable
from compiler.recipe import load_recipe, parse_recipe
from compiler.runtime.runner import Runner
from compiler.runtime.executor import io_from_model, io_from_onnx
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.frontend.safe_paths import model_directory, output_path
from compiler.serving.triton_repo import unservable_reason, write_repository
from compiler.engine.engine_build import BuildOptions, EngineArtifact
from compiler.graph_io import ExportedGraph, TensorInfo
from compiler.frontend.run_passes import PassRecord
from compiler.serving.triton_repo import ServingSpec
from compiler.measure.validate import ValidationResult
from compiler.measure.validate import DEFAULT_PROMPT, DecodeReference, compare, decode_reference, rejudge
from compiler.measure.verdict import decide

EXTERNAL_DATA_THRESHOLD = 256 << 20  # weights beside the graph above this: protobuf's 2 GiB cap, and an
# inline save builds the whole proto in memory (+2x the graph at the end of the passes: 1B INT4, 360M)

STAGES = ("load", "calibrate", "reference", "export", "precision", "passes", "build", "validate", "quality", "package")
CACHED_STAGES = ("export", "passes", "build", "validate")
# OSErrors that mean "the disk/filesystem could not take the output", not a bug in llmc.
# (Permissions are checked before the build by a probe write; an EACCES later is not guessed at.)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}


@dataclasses.dataclass
class BuildRequest:
    model: Path | None = None
    recipe: str = "fp16"
    output: Path | None = None
    options: BuildOptions = dataclasses.field(default_factory=BuildOptions)
    prompt: str = DEFAULT_PROMPT
    decode_steps: int = 16
    timing_cache: Path | None = None
    cache_dir: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    calib_data: Path | None = None  # plain text / JSONL; default: the shipped calibration sample
    eval_data: Path | None = None  # held-out text for perplexity / KL; default: the shipped held-out sample
    measure_quality: bool | None = None  # None: only for recipes that quantize or set max_ppl_delta
    triton_cpu_fallback: bool = False  # add llm_onnx to the Triton repository
    check_passes: bool = False  # run the graph before/after every pass (compiler/measure/pass_check.py)
    max_ppl_delta: float | None = None  # search the per-matmul precision for this budget (precision_search.py)
    promote_to: str = "int8"  # the format the search promotes sensitive matmuls to before FP16


class Progress:
    """Callbacks the CLI implements (rich spinners); the default prints nothing."""

    def stage_start(self, index: int, name: str) -> None: ...
    def stage_end(self, index: int, name: str, seconds: float, detail: str = "") -> None: ...
    def pass_done(self, record: PassRecord) -> None: ...
    def step(self, what: str, done: int, total: int) -> None: ...
    def note(self, text: str) -> None: ...


class CheckedProgress(Progress):
    """Every progress callback is a safe point to stop at (compiler/driver/interrupt.py): stage boundaries,
    between passes, the calibration and sensitivity loops."""

    def __init__(self, inner: Progress):
        self.inner = inner

    def _call(self, method, *args):
        checkpoint()
        method(*args)
        checkpoint()

    def stage_start(self, index, name):
        self._call(self.inner.stage_start, index, name)

    def stage_end(self, index, name, seconds, detail=""):
        self._call(self.inner.stage_end, index, name, seconds, detail)

    def pass_done(self, record):
        self._call(self.inner.pass_done, record)

    def step(self, what, done, total):
        self._call(self.inner.step, what, done, total)

    def note(self, text):
        self._call(self.inner.note, text)


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


def export_cached(loaded, cache: StageCache, key: str | None, hit: Path | None, scratch: Path) -> ExportedGraph:
    """The export stage: the stored graph when `hit` (cache.get's entry for `key`) is given, else
    `loaded()` exported and stored under `key`. One path for `llmc build` and `llmc analyze`."""
    if hit is not None:
        model = ir.load(hit / "model.onnx")
        return ExportedGraph(model=model, io=io_from_model(model))
    return export_to_cache(loaded(), cache, key, scratch)


def export_to_cache(loaded, cache: StageCache, key: str | None, scratch: Path) -> ExportedGraph:
    """Export, and store the ONNX under `key` when the cache is enabled (`scratch` is a temporary dir)."""
    graph = _export(loaded)
    if cache.enabled:
        scratch.mkdir()
        try:
            _save_onnx(graph.model, scratch / "model.onnx")
            cache.put("export", key, _onnx_files(scratch), {"seconds": graph.seconds})
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return graph


def _passes(exported, recipe, ctx, on_pass, check=False):
    try:
        return run_passes(exported, recipe, ctx, on_pass, check=check)
    except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
        raise UnsupportedModelError(f"recipe '{recipe.name}' cannot be applied to this graph: {exc}") from exc


def _save_onnx(model: ir.Model, path: Path) -> list[Path]:
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=path.name + ".data")
        return [path, path.with_name(path.name + ".data")]
    ir.save(model, path)
    return [path]


def _onnx_files(folder: Path) -> dict[str, Path]:
    return {p.name: p for p in (folder / "model.onnx", folder / "model.onnx.data") if p.is_file()}


def _restore(entry: Path, names, dest: Path) -> list[Path]:
    out = []
    for name in names:
        if (entry / name).is_file():
            shutil.copyfile(entry / name, dest / name)
            out.append(dest / name)
    return out


def _engine_from_json(data: dict, plan: Path, onnx_path: Path) -> EngineArtifact:
    return EngineArtifact(plan_path=plan, onnx_path=onnx_path, backend=data["backend"],
                          backend_version=data["backend_version"],
                          tensors=[TensorInfo(t["name"], t["dtype"], tuple(t["shape"]), t["is_input"]) for t in data["tensors"]],
                          layer_types=data["layer_types"], seconds=0.0, timing_cache=data["timing_cache"],
                          builder_peak_rss_bytes=data.get("builder_peak_rss_bytes"))


def run_build(request: BuildRequest, progress: Progress | None = None) -> dict:
    """Run every stage; returns the report (also written as report.json). Raises LlmcError subclasses."""
    progress = CheckedProgress(progress or Progress())
    timings: dict[str, float] = {}
    backend = get_backend()
    recipe = load_recipe(request.recipe)
    if request.max_ppl_delta is not None:
        _check_budget_request(request, recipe)
    plugins = needs_plugins(recipe.passes)
    if plugins:  # before any export: TensorRT-RTX's parser would abort the process on the plugin node
        backend.require_plugins(f"recipe '{recipe.name}' (llmc::PagedAttention plugin node)")
    model_path = model_directory(Path(request.model) if request.model else default_model_dir())
    # Fail fast, before any output exists: bad dir, unsupported arch, broken files, options, output path.
    spec = read_spec(model_path, request.trust_remote_code)
    check_model_files(model_path, request.allow_pickle)
    check_max_seq(spec, request.options, plugins)
    texts = _texts(request, recipe)
    output = output_path(Path(request.output) if request.output else Path("artifacts") / model_path.name)
    check_output_path(output, model_path)
    check_output_writable(output)
    timing_cache = request.timing_cache or cache_root() / "timing" / f"{backend.name}-{backend.version}.cache"
    cache = StageCache(request.cache_dir)
    keys = stage_keys(cache, model_path, recipe, request, backend, calibration_text=texts.calibration,
                      eval_text=texts.evaluation)
    hits = {name: cache.get(name, keys[name]) if keys else None for name in CACHED_STAGES}
    if request.check_passes and hits["passes"] and not _cached_records_checked(hits["passes"]):
        hits["passes"] = None  # --check-passes: re-run the passes (same output bytes) to measure each one

    def stage(index: int, name: str, fn: Callable | None, detail: Callable = lambda r: "", why_skipped: str = ""):
        if fn is None:
            progress.stage_end(index, name, 0.0, f"skipped: {why_skipped}")
            return None
        progress.stage_start(index, name)
        start = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - start
        text = detail(result)
        if hits.get(name):
            text = f"cached {keys[name][:12]}" + (f", {text}" if text else "")
        progress.stage_end(index, name, timings[name], text)
        return result

    with OutputLock(output), StagedOutput(output) as out:
        try:
            return _run_stages(request, progress, stage, out, output, model_path, recipe, backend, timing_cache,
                               cache, keys, hits, timings, texts)
        except OSError as exc:
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise OutputWriteError(
                f"could not write the build ({exc.strerror}: {exc.filename or out.path}); "
                f"free disk space or fix the filesystem and rebuild; {output} was left as it was"
            ) from exc


@dataclasses.dataclass
class References:
    """The reference stage's output: the PyTorch side of validate and quality (None: not needed)."""

    decode: DecodeReference | None  # None when validation is cached
    quality: QualityReference | None  # None when the build measures no quality


@dataclasses.dataclass
class _Texts:
    calibration: str | None  # None: no pass of the recipe calibrates
    evaluation: str | None  # None: no quality stage


def _texts(request: BuildRequest, recipe) -> _Texts:
    """Read --calib-data / --eval-data up front (bad files fail before any work), or the built-in samples."""
    calibrate_ = any(p in NEEDS_CALIBRATION for p in recipe.passes)
    quality = request.max_ppl_delta is not None or (request.measure_quality if request.measure_quality is not None
                                                     else recipe.quantizes or recipe.quality_limits)
    calib = (read_text_file(request.calib_data, "--calib-data") if request.calib_data
             else default_calibration_text()) if calibrate_ else None
    evaluation = (read_text_file(request.eval_data, "--eval-data") if request.eval_data
                  else default_eval_text()) if quality else None
    return _Texts(calib, evaluation)


def _run_stages(request, progress, stage, out, output, model_path, recipe, backend, timing_cache, cache, keys, hits,
                timings, texts: _Texts) -> dict:
    loaded_box: list = []

    def loaded():
        if not loaded_box:
            loaded_box.append(load_model(model_path, request.allow_pickle, request.trust_remote_code))
            check_validation_fits(loaded_box[0], request)
        return loaded_box[0]

    # The PyTorch model is needed only to export, calibrate, validate or measure quality.
    needs_model = (hits["export"] is None or hits["validate"] is None or texts.evaluation is not None
                   or (texts.calibration is not None and hits["passes"] is None))
    if needs_model:
        stage(0, "load", loaded, lambda m: f"{m.spec.architecture}, {m.num_parameters / 1e6:.2f}M params")
    else:
        progress.stage_end(0, "load", 0.0, "skipped: export and validation are cached")
        timings["load"] = 0.0
    calibration = stage(
        1, "calibrate",
        (lambda: calibrate(loaded(), texts.calibration, on_progress=lambda d, t: progress.step("calibrate", d, t)))
        if texts.calibration is not None and hits["passes"] is None else None,
        lambda c: f"{c.tokens} tokens, {len(c.activations)} linear layers",
        why_skipped="passes are cached" if texts.calibration is not None else "no pass of this recipe calibrates")

    def do_reference() -> References:
        decode = None if hits["validate"] else decode_reference(
            loaded(), request.prompt, request.decode_steps, max_positions=request.options.max_seq)
        quality_ref = None if texts.evaluation is None else quality_reference(
            loaded(), texts.evaluation, request.options.max_seq, window=QUALITY_WINDOW)
        return References(decode, quality_ref)

    refs = stage(2, "reference", do_reference if hits["validate"] is None or texts.evaluation is not None else None,
                 lambda r: ", ".join(([f"{r.decode.decode_steps + 1} decode steps"] if r.decode else [])
                                     + ([f"{r.quality.held.targets.size} held-out tokens"] if r.quality else [])),
                 why_skipped="no quality to measure and validation is cached")

    def do_export() -> ExportedGraph:
        return export_cached(loaded, cache, keys.get("export"), hits["export"], out.path / ".export")

    ctx = PassContext(max_positions=request.options.max_seq,
                      activations=calibration.activations if calibration else None,
                      sliding_window=_spec_window(model_path, request))
    def do_precision() -> SearchResult:
        evaluator = Evaluator(exported, recipe, ctx, refs.quality.held, loaded_box[0].tokenizer.pad_token_id,
                              request.promote_to)
        progress.note(f"searching {len(evaluator.units)} matmuls: {evaluator.aggressive.label} -> "
                      f"{evaluator.safer.label} -> fp16 for held-out perplexity delta <= {request.max_ppl_delta:.2%}")
        found = search_budget(
            evaluator, request.max_ppl_delta,
            on_probe=lambda what, p: progress.note(f"probe {what}: perplexity {p.ppl_delta:+.3%}, "
                                                   f"{p.weight_bytes / 1e6:.3f} MB weights"),
            on_progress=lambda d, t: progress.step("sensitivity", d, t))
        if not found.fits:
            raise AccuracyError(_budget_miss(found, recipe.name))
        return found

    def search_detail(found: SearchResult) -> str:
        return (f"{found.promotions} promotions, {len(found.probes)} graphs measured, perplexity "
                f"{found.final.ppl_delta:+.2%}, {found.final.weight_bytes / 1e6:.3f} MB weights")

    def do_passes() -> list[PassRecord]:
        if hits["passes"]:
            _restore(hits["passes"], ("model.onnx", "model.onnx.data"), out.path)
            return [PassRecord(**r) for r in json.loads((hits["passes"] / "meta.json").read_text())["records"]]
        final, records = _passes(exported, recipe, ctx, progress.pass_done, check=request.check_passes)
        _save_onnx(final.model, out.path / "model.onnx")
        files = _onnx_files(out.path) | ({"recipe.yaml": out.path / "recipe.yaml"} if search is not None else {})
        cache.put("passes", keys.get("passes", ""), files,
                  {"records": [dataclasses.asdict(r) for r in records], "search": search})
        return records

    exported = None
    if hits["passes"]:  # the export is only the passes' input: with passes cached it is not even read
        progress.stage_end(3, "export", 0.0, "skipped: passes are cached")
        timings["export"] = 0.0
    else:
        exported = stage(3, "export", do_export, lambda g: f"{len(g.model.graph)} nodes")
    if loaded_box:  # the model's last user was the export; the graph's initializers still view its
        # tensors, so they are freed as the passes replace them (cast-fp16, quantization)
        loaded_box[0] = dataclasses.replace(loaded_box[0], model=None)
        release_freed_memory()
    search = None
    if request.max_ppl_delta is None:
        progress.stage_end(4, "precision", 0.0, "skipped: no --max-ppl-delta")
    elif hits["passes"]:
        progress.stage_end(4, "precision", 0.0, "skipped: passes are cached")
        search = json.loads((hits["passes"] / "meta.json").read_text())["search"]
    else:
        found = stage(4, "precision", do_precision, search_detail)
        search = found.report()
    if search is not None:  # the build runs the chosen recipe, and keeps it to reproduce the build
        text = (hits["passes"] / "recipe.yaml").read_text() if hits["passes"] else found.recipe_text
        (out.path / "recipe.yaml").write_text(text)
        search["base_recipe"] = recipe.name
        recipe = parse_recipe(text, output / "recipe.yaml")

    records = stage(5, "passes", do_passes, lambda r: f"{len(r)} passes")
    # The graph is on disk now; what follows reads model.onnx. Dropping the in-memory graph and the
    # calibration sample frees the model's bytes again (2.5 GB + 1.3 GB on a 1B model) before the
    # engine build and onnxruntime load their own copies.
    if calibration is not None:
        calibration = dataclasses.replace(calibration, activations={})
    if exported is not None:  # the graph (and the model's last tensors) are garbage now, in cycles
        exported = ctx = None
        release_freed_memory()
    onnx_files = sorted(_onnx_files(out.path).values())

    def do_build() -> EngineArtifact:
        plan, onnx_path = out.path / "model.plan", out.path / "model.onnx"
        if hits["build"]:
            _restore(hits["build"], ("model.plan",), out.path)
            return _engine_from_json(json.loads((hits["build"] / "meta.json").read_text()), plan, onnx_path)
        big = (out.path / "model.onnx.data").exists()  # weights over EXTERNAL_DATA_THRESHOLD: build in a child
        engine = (build_engine_isolated if big else build_engine)(onnx_path, plan, request.options, backend,
                                                                  timing_cache)
        meta = {"backend": engine.backend, "backend_version": engine.backend_version,
                "tensors": [dataclasses.asdict(t) for t in engine.tensors], "layer_types": engine.layer_types,
                "timing_cache": engine.timing_cache, "builder_peak_rss_bytes": engine.builder_peak_rss_bytes}
        cache.put("build", keys.get("build", ""), {"model.plan": plan}, meta)
        return engine

    engine = stage(6, "build", do_build,
                   lambda e: f"{e.backend} {e.backend_version}, {e.plan_path.stat().st_size / 1e6:.2f} MB")
    if not hits["build"]:
        release_freed_memory()  # an in-process build's working memory, before onnxruntime loads the graph

    session: list[OnnxRuntimeExecutor] = []  # one onnxruntime session for validate and quality

    def executor() -> OnnxRuntimeExecutor:
        if not session:
            session.append(OnnxRuntimeExecutor(out.path / "model.onnx", arena=False))
        return session[0]

    def do_validate() -> ValidationResult:
        if hits["validate"]:
            data = json.loads((hits["validate"] / "meta.json").read_text())["result"]
            return rejudge(ValidationResult(**{**data, "tolerance": recipe.tolerance}), recipe.tolerance)
        result = compare(refs.decode, executor(), recipe.tolerance)
        cache.put("validate", keys.get("validate", ""), {},
                  {"result": dataclasses.asdict(result), "parameters": loaded_box[0].num_parameters})
        return result

    result = stage(7, "validate", do_validate,
                   lambda v: f"max err {v.max_abs_error:.3g}, agreement {v.greedy_agreement:.0%}")
    quality = stage(
        8, "quality",
        (lambda: score(refs.quality, Runner(executor(), loaded_box[0].tokenizer.pad_token_id)))
        if texts.evaluation is not None else None,
        lambda q: f"perplexity {q.reference_perplexity:.3f} -> {q.compiled_perplexity:.3f} "
                  f"({q.ppl_delta:+.2%}), KL {q.kl_mean:.4f}, agreement {q.greedy_agreement:.1%}",
        why_skipped="the recipe does not quantize (use --measure-quality)")
    if session:
        session.clear()  # the FP32 session weights go before packaging
        release_freed_memory()
    verdict = decide(result, quality, recipe)  # compiler/measure/verdict.py: which figures decide pass / fail
    failures, passed = verdict.failures, verdict.passed
    pass_check_warning = _pass_check_warning(records) if request.check_passes else None
    footprint = weight_footprint(ir.load(out.path / "model.onnx"))
    spec = loaded_box[0].spec if loaded_box else read_spec(model_path, request.trust_remote_code)
    if loaded_box:
        parameters = loaded_box[0].num_parameters
    else:  # validation came from the cache, which recorded the count when it loaded the model
        parameters = json.loads((hits["validate"] / "meta.json").read_text()).get("parameters")
    versions = tool_versions()
    backend_info = {"name": backend.name, "version": backend.version, "supports_plugins": backend.supports_plugins,
                    "timing_cache": engine.timing_cache, "builder_peak_rss_bytes": engine.builder_peak_rss_bytes}
    report = {
        "status": "pass" if passed else "fail",
        "llmc_version": __version__,
        "model": {"name": model_path.name, "path": model_path, "architecture": spec.architecture, "spec": spec,
                  "parameters": parameters},
        "recipe": {"name": recipe.name, "source": recipe.source, "sha256": recipe.sha256, "passes": recipe.passes,
                   "pass_options": recipe.pass_options, "tolerance": recipe.tolerance,
                   "max_ppl_delta": recipe.max_ppl_delta, "max_kl": recipe.max_kl,
                   "min_heldout_agreement": recipe.min_heldout_agreement},
        "options": request.options,
        "versions": versions,
        "backend": backend_info,
        "timings_s": timings,
        "passes": records,
        "engine": {"layer_types": engine.layer_types, "io": engine.tensors},
        "sizes_bytes": {},
        "numerics": result,
        "quality": quality,
        "calibration": None if calibration is None else {
            "tokens": calibration.tokens, "sequences": calibration.sequences,
            "source": str(request.calib_data) if request.calib_data else "built-in sample"},
        "eval_data": None if texts.evaluation is None else (str(request.eval_data) if request.eval_data
                                                             else "built-in held-out sample"),
        "weights": footprint,
        "precision": _precision_map(records),
        "coverage": {r.name: r.details["coverage"]["summary"] for r in records if r.details.get("coverage")},
        "precision_search": search,
        "failures": failures,
        "verdict_basis": verdict.basis,
        "triton_model": "triton/llm",
        "cache": {"dir": cache.root,
                  "stages": {s: {"hit": hits[s] is not None, "key": keys[s]} for s in CACHED_STAGES}} if keys else None,
        "warnings": (_serving_warnings(backend) + ([pass_check_warning] if pass_check_warning else [])
                     + verdict.warnings),
    }

    def package():
        copy_tokenizer(model_path, out.path / "tokenizer")
        tok = _tokenizer_ids(model_path)
        serving = ServingSpec(
            max_batch=request.options.max_batch, max_seq=request.options.max_seq,
            io=io_from_onnx(out.path / "model.onnx"), tokenizer_dir=out.path / "tokenizer",
            onnx_files=tuple(onnx_files), pad_token_id=tok[0], stop_token_ids=tok[1],
            cpu_fallback=request.triton_cpu_fallback)
        unservable = unservable_reason(engine)  # a paged pool or FP8 tensors: nothing Triton can declare
        if unservable:
            report["triton_models"] = []
            report["triton_model"] = None
            report["warnings"].append(f"no Triton repository was written: {unservable}")
        else:
            report["triton_models"] = sorted(write_repository(out.path / "triton", engine, serving))
        report["sizes_bytes"] = {p.name: p.stat().st_size for p in [*onnx_files, engine.plan_path]}
        write_report(out.path / "report.json", report)
        return report

    stage(9, "package", package)
    report["timings_s"]["total"] = sum(timings.values())
    # Peak resident memory of each process, for sizing a runner: this one (all stages but the engine
    # build; under `llmc build` that is the build's, in-process callers see their own) and the builder child.
    report["memory"] = {"llmc_process_peak_rss_bytes": own_peak_rss_bytes(),
                        "builder_peak_rss_bytes": engine.builder_peak_rss_bytes}
    write_report(out.path / "report.json", report)
    write_card(out.path)  # report.md (+ plots), rendered from report.json alone
    logits = next((t.dtype for t in engine.tensors if t.name == "logits"), None)
    write_manifest(out.path, versions={"llmc": __version__, **versions}, backend=backend_info, build={
        "model": model_path.name, "model_sha256": keys.get("model_sha256"), "architecture": spec.architecture,
        "recipe": recipe.name, "recipe_sha256": recipe.sha256, "passes": list(recipe.passes),
        "max_batch": request.options.max_batch, "max_seq": request.options.max_seq, "dtype": logits,
        "prompt": request.prompt, "decode_steps": request.decode_steps,
    })
    if not passed:
        failed = out.commit(output.with_name(output.name + ".failed"))
        raise AccuracyError(
            f"accuracy outside recipe '{recipe.name}' limits: {'; '.join(failures)}; "
            + (f"{describe_divergence(records)}; " if describe_divergence(records) else "")
            + f"the rejected build is in {failed} (report.json); try a less aggressive recipe "
            f"({_safer_recipe(recipe.name)})"
        )
    report["output"] = str(out.commit())
    return report



def _check_budget_request(request: BuildRequest, recipe) -> None:
    """--max-ppl-delta needs a uniform quantizing recipe and a sane budget: checked before any work."""
    quant_entry(recipe)
    if not 0 <= request.max_ppl_delta < 10:
        raise BadInputError(f"--max-ppl-delta {request.max_ppl_delta} is not a relative perplexity increase "
                            "(write 2% or 0.02)")
    if request.promote_to not in SAFER:
        raise BadInputError(f"--promote-to must be one of {', '.join(SAFER)}, got {request.promote_to!r}")


def _budget_miss(found: SearchResult, recipe_name: str) -> str:
    start, final = found.probes[0], found.final
    return (f"no weight precision meets --max-ppl-delta {found.budget:.2%}: every matmul in {recipe_name} measures "
            f"{start.ppl_delta:+.3%} ({start.weight_bytes} weight bytes) and even all-FP16 weights measure "
            f"{final.ppl_delta:+.3%} ({final.weight_bytes} bytes); raise the budget (FP16 arithmetic alone "
            "costs this much on this text)")


def _spec_window(model_path: Path, request: BuildRequest) -> int:
    return read_spec(model_path, request.trust_remote_code).sliding_window or 0


def _tokenizer_ids(model_path: Path) -> tuple[int, tuple[int, ...]]:
    """(pad id, stop ids) from the model's tokenizer, for the Triton generate model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return tok.pad_token_id or 0, tuple(t for t in [tok.eos_token_id] if t is not None)


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
    return "fp16"


# --- per-pass differential check (--check-passes) ------------------------------------------------

def _cached_records_checked(entry: Path) -> bool:
    """Whether a cached passes stage recorded per-pass checks (a build without --check-passes did not)."""
    records = json.loads((entry / "meta.json").read_text())["records"]
    return all(r.get("check") for r in records)


def _pass_check_warning(records: list[PassRecord]) -> str | None:
    found = first_divergent(records)
    return None if found is None else describe_divergence(records)
