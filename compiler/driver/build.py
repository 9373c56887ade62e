"""`llmc build` end to end: a plain list of stages run in order over one BuildState.

Everything that can be checked without loading weights (model files, recipe, options, output path,
the lock) is checked first, before any output exists; then every stage's cache hit or skip reason
is decided (`llmc build --plan` prints them), then the stages run. Nothing is written at the output
path until every stage has succeeded (an accuracy failure keeps the complete build at `<out>.failed`).

The memory plan is data: a heavy state field (compiler/stages/state.py) is dropped right after the
last stage that reads it, and freed memory is handed back to the OS after each stage that ran.
"""

from __future__ import annotations

import dataclasses
import errno
import time
from pathlib import Path

from passes import needs_calibration, needs_plugins

from compiler import __version__
from compiler.driver.cache import StageCache, stage_key
from compiler.driver.lock import OutputLock
from compiler.driver.preflight import check_max_seq, check_output_path, check_output_writable
from compiler.driver.interrupt import CheckedProgress
from compiler.stages.request import BuildRequest, Progress
from compiler.driver.staged_output import StagedOutput
from compiler.stages.state import BuildState, Texts, heavy_fields
from compiler.engine.backend import get_backend
from compiler.errors import AccuracyError, BadInputError, OutputWriteError
from compiler.frontend.corpus import default_calibration_text, default_eval_text, read_text_file
from compiler.frontend.default_model import cache_root, default_model_dir, draft_dir
from compiler.frontend.load import check_model_files, read_spec
from compiler.frontend.tokenizer_files import check_same_vocabulary, vocabulary
from compiler.host.paths import model_directory, output_path
from compiler.measure.pass_check import describe_divergence
from compiler.measure.precision_search import SAFER, quant_entry
from compiler.recipe import load_recipe
from compiler.report.card import write_card
from compiler.report.manifest import write_manifest
from compiler.report.report_json import tool_versions, write_report
from compiler.host.memory import own_peak_rss_bytes, release_freed_memory
from compiler.stages.base import Stage
from compiler.stages.calibrate import Calibrate
from compiler.stages.draft import Draft, draft_request
from compiler.stages.engine import Engine
from compiler.stages.export import Export
from compiler.stages.load import Load
from compiler.stages.package import Package
from compiler.stages.passes import Passes
from compiler.stages.precision import Precision
from compiler.stages.quality import Quality
from compiler.stages.reference import Reference
from compiler.stages.validate import Validate

BUILD: list[Stage] = [Load(), Calibrate(), Reference(), Export(), Precision(), Passes(), Engine(), Validate(),
                      Quality(), Draft(), Package()]
STAGES = tuple(s.name for s in BUILD)
# A part of another build (the draft): every stage, but no Triton repository (only the outer artifact is served).
PART: list[Stage] = [*BUILD[:-1], Package(repository=False)]
# OSErrors that mean "the disk/filesystem could not take the output", not a bug in llmc.
# (Permissions are checked before the build by a probe write; an EACCES later is not guessed at.)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EFBIG}
# report.json's key order (keys are the stages' sections plus the driver's own)
REPORT_ORDER = ("status", "llmc_version", "model", "recipe", "options", "versions", "backend", "timings_s", "passes",
                "engine", "sizes_bytes", "numerics", "quality", "calibration", "eval_data", "weights", "precision",
                "coverage", "precision_search", "draft", "speculation", "failures", "verdict_basis", "triton_model", "cache", "warnings",
                "triton_models")


def check_budget_request(request: BuildRequest, recipe) -> None:
    """--max-ppl-delta needs a uniform quantizing recipe and a sane budget: checked before any work."""
    quant_entry(recipe)
    if not 0 <= request.max_ppl_delta < 10:
        raise BadInputError(f"--max-ppl-delta {request.max_ppl_delta} is not a relative perplexity increase "
                            "(write 2% or 0.02)")
    if request.promote_to not in SAFER:
        raise BadInputError(f"--promote-to must be one of {', '.join(SAFER)}, got {request.promote_to!r}")


def read_texts(request: BuildRequest, recipe) -> Texts:
    """--calib-data / --eval-data read up front (bad files fail before any work), or the built-in samples."""
    quality = request.max_ppl_delta is not None or (request.measure_quality if request.measure_quality is not None
                                                     else recipe.quantizes or recipe.quality_limits)
    calib = (read_text_file(request.calib_data, "--calib-data") if request.calib_data
             else default_calibration_text()) if needs_calibration(recipe.passes) else None
    evaluation = (read_text_file(request.eval_data, "--eval-data") if request.eval_data
                  else default_eval_text()) if quality else None
    return Texts(calib, evaluation)


def prepare(request: BuildRequest, progress: Progress, staging: Path | None = None,
            check_output: bool = True) -> BuildState:
    """Every check that needs no weights, and the state the stages start from. `check_output` False:
    a part of another build (the draft), written into that build's staging directory."""
    backend = get_backend()
    recipe = load_recipe(request.recipe)
    if request.max_ppl_delta is None and recipe.promote is not None:  # the recipe searches its own budget
        request = dataclasses.replace(request, max_ppl_delta=recipe.max_ppl_delta, promote_to=recipe.promote,
                                      budget_from_recipe=True)
    if request.max_ppl_delta is not None:
        check_budget_request(request, recipe)
    plugins = needs_plugins(recipe.passes)
    if plugins:  # before any export: TensorRT-RTX's parser would abort the process on the plugin node
        backend.require_plugins(f"recipe '{recipe.name}' (llmc::PagedAttention plugin node)")
    model_path, spec = _check_model(Path(request.model) if request.model else default_model_dir(), request, plugins)
    if request.draft:  # the draft is built last: everything about it is checked now
        draft_path, draft_spec = _check_model(draft_dir(request.draft), request, plugins)
        check_same_vocabulary(vocabulary(model_path), vocabulary(draft_path), draft_path)
        if draft_spec.vocab_size != spec.vocab_size:  # the proposer compares logits over the same ids
            raise BadInputError(f"{draft_path}'s logits cover {draft_spec.vocab_size} ids, the target's "
                                f"{spec.vocab_size}: use a draft with the target's vocabulary size")
    texts = read_texts(request, recipe)
    output = staging
    if check_output:
        output = output_path(Path(request.output) if request.output else Path("artifacts") / model_path.name)
        check_output_path(output, model_path)
        check_output_writable(output)
    timing_cache = request.timing_cache or cache_root() / "timing" / f"{backend.name}-{backend.version}.cache"
    return BuildState(request=request, recipe=recipe, model_path=model_path, output=output, spec=spec,
                      backend=backend, timing_cache=timing_cache, texts=texts, cache=StageCache(request.cache_dir),
                      staging=staging, progress=progress, build_part=build_part)


def _check_model(path: Path, request: BuildRequest, plugins: bool):
    model_path = model_directory(path)
    spec = read_spec(model_path, request.trust_remote_code)
    check_model_files(model_path, request.allow_pickle)
    check_max_seq(spec, request.options, plugins)
    return model_path, spec


def build_part(request: BuildRequest, staging: Path, progress: Progress) -> BuildState:
    """Build `request`'s model with the whole stage list into `staging` (a subdirectory of another
    build's staged output) and write its report there; returns its state (its verdict decided)."""
    staging.mkdir()
    state = prepare(request, progress, staging=staging, check_output=False)
    run_stages(PART, state, plan(PART, state))
    write_manifest_for(state, write_reports(PART, state), staging)  # `llmc inspect ART/draft` verifies it too
    return state


def plan(stages: list[Stage], state: BuildState) -> dict[str, str]:
    """Decide, before any work, each stage's cache key and hit, and what is skipped and why.

    Keys chain: a stage's key covers its own inputs plus the key of the stage it `chains_on`, so a
    change invalidates exactly the stages after the first one it touches. Returns name -> what
    happens ("run", "cached <key>", "skipped: <why>")."""
    if state.cache.enabled:
        for stage in stages:
            if stage.cached:
                chained = state.keys.get(stage.chains_on) if stage.chains_on else None
                state.keys[stage.name] = stage_key(stage.name, stage.key_inputs(state), chained)
                entry = state.cache.get(stage.name, state.keys[stage.name])
                state.hits[stage.name] = entry if entry is not None and stage.cache_valid(state, entry) else None
                if state.hits[stage.name] is not None:
                    state.cache.pinned.add(entry)
    outcome = {}
    for stage in reversed(stages):  # later stages first: Load runs only if a stage that runs reads the model
        if stage.unread_reason:  # it only feeds others: it runs if a stage that runs reads what it writes
            readers = [s for s in stages if set(s.reads) & set(stage.writes) and outcome.get(s.name) == "run"]
            outcome[stage.name] = "run" if readers else f"skipped: {stage.unread_reason}"
            continue
        why = stage.skip_reason(state)
        hit = state.hits.get(stage.name)
        outcome[stage.name] = f"skipped: {why}" if why else (f"cached {state.keys[stage.name][:12]}" if hit else "run")
    return {s.name: outcome[s.name] for s in stages}


def run_stages(stages: list[Stage], state: BuildState, outcome: dict[str, str]) -> None:
    """Run, restore or skip each stage in order; drop each heavy field after its last reader."""
    progress = state.progress
    last_reader = {f: max((i for i, s in enumerate(stages) if f in s.reads and outcome[s.name] == "run"), default=-1)
                   for f in heavy_fields()}
    for index, stage in enumerate(stages):
        what = outcome[stage.name]
        if what.startswith("skipped"):
            progress.stage_end(index, stage.name, 0.0, what)
            state.timings[stage.name] = 0.0
        else:
            progress.stage_start(index, stage.name)
            start = time.perf_counter()
            hit = state.hits.get(stage.name)
            if hit:
                stage.restore(state, hit)
            else:
                stage.run(state)
                if stage.cached and state.cache.enabled:
                    _store(stage, state)
            state.timings[stage.name] = time.perf_counter() - start
            detail = stage.detail(state)
            if hit:
                detail = f"cached {state.keys[stage.name][:12]}" + (f", {detail}" if detail else "")
            progress.stage_end(index, stage.name, state.timings[stage.name], detail)
        dropped = [f for f, last in last_reader.items() if last <= index and getattr(state, f) is not None]
        for field in dropped:
            setattr(state, field, None)
        if dropped or what == "run":
            release_freed_memory()


def _store(stage: Stage, state: BuildState) -> None:
    import shutil

    scratch = state.staging / f".{stage.name}-cache"
    scratch.mkdir()
    try:
        files, meta = stage.save(state, scratch)
        state.cache.put(stage.name, state.keys[stage.name], files, meta)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def assemble_report(stages: list[Stage], state: BuildState) -> dict:
    sections = {"llmc_version": __version__, "options": state.request.options, "versions": tool_versions(),
                "timings_s": state.timings, "recipe": recipe_section(state.recipe), "warnings": []}
    for stage in stages:
        sections.update(stage.report(state))
        sections["warnings"] += stage.warnings(state)
    if state.cache.enabled:
        sections["cache"] = {"dir": state.cache.root, "stages": {
            s.name: {"hit": state.hits.get(s.name) is not None, "key": state.keys[s.name]} for s in stages if s.cached}}
    else:
        sections["cache"] = None
    ordered = {k: sections.pop(k) for k in REPORT_ORDER if k in sections}
    return ordered | sections


def recipe_section(recipe) -> dict:
    return {"name": recipe.name, "source": recipe.source, "sha256": recipe.sha256, "passes": recipe.passes,
            "pass_options": recipe.pass_options, "tolerance": recipe.tolerance, "max_ppl_delta": recipe.max_ppl_delta,
            "max_kl": recipe.max_kl, "min_heldout_agreement": recipe.min_heldout_agreement}


def run_build(request: BuildRequest, progress: Progress | None = None, stages: list[Stage] | None = None) -> dict:
    """Run every stage; returns the report (also written as report.json). Raises LlmcError subclasses."""
    stages = BUILD if stages is None else stages
    state = prepare(request, CheckedProgress(progress or Progress()))
    with OutputLock(state.output), StagedOutput(state.output) as out:
        state.staging = out.path
        try:
            run_stages(stages, state, plan(stages, state))
            return _finish(stages, state, out)
        except OSError as exc:
            if exc.errno not in WRITE_ERRNOS:
                raise
            raise OutputWriteError(
                f"could not write the build ({exc.strerror}: {exc.filename or out.path}); "
                f"free disk space or fix the filesystem and rebuild; {state.output} was left as it was"
            ) from exc


def plan_build(request: BuildRequest) -> list[tuple[str, str]]:
    """`llmc build --plan`: each stage and what would happen to it, after the same checks as a build;
    with --draft, the draft's own stages follow its line as `draft/<stage>` (its cache hits included)."""
    state = prepare(request, Progress())
    outcome = plan(BUILD, state)
    rows = []
    for stage in BUILD:
        rows.append((stage.name, outcome[stage.name]))
        if stage.name == "draft" and outcome["draft"] == "run":
            part = prepare(draft_request(request), Progress(), staging=Path("draft"), check_output=False)  # nothing written
            rows += [(f"draft/{name}", what) for name, what in plan(PART, part).items()]
    return rows


def write_reports(stages: list[Stage], state: BuildState) -> dict:
    """report.json and the accuracy card into the staging directory; returns the report."""
    report = assemble_report(stages, state)
    state.timings["total"] = sum(state.timings.values())
    # Peak resident memory of each process, for sizing a runner: this one (all stages but the engine
    # build; under `llmc build` that is the build's, in-process callers see their own) and the builder child.
    report["memory"] = {"llmc_process_peak_rss_bytes": own_peak_rss_bytes(),
                        "builder_peak_rss_bytes": state.engine.builder_peak_rss_bytes}
    write_report(state.staging / "report.json", report)
    write_card(state.staging)  # report.md (+ plots), rendered from report.json alone
    return report


def _finish(stages: list[Stage], state: BuildState, out: StagedOutput) -> dict:
    report = write_reports(stages, state)
    recipe = state.recipe
    write_manifest_for(state, report, out.path)
    if not state.verdict.passed:
        failed = out.commit(state.output.with_name(state.output.name + ".failed"))
        divergence = describe_divergence(state.records)
        raise AccuracyError(
            f"accuracy outside recipe '{recipe.name}' limits: {'; '.join(state.verdict.failures)}; "
            + (f"{divergence}; " if divergence else "")
            + f"the rejected build is in {failed} (report.json); try a less aggressive recipe "
            f"({_safer_recipe(recipe.name)})"
        )
    report["output"] = str(out.commit())
    return report


def write_manifest_for(state: BuildState, report: dict, directory: Path) -> None:
    """manifest.json: every file's hash plus what was built from what (`llmc inspect` verifies it)."""
    r, recipe = state.request, state.recipe
    logits = next((t.dtype for t in state.engine.tensors if t.name == "logits"), None)
    model_sha = state.cache.dir_digest(state.model_path) if state.cache.enabled else None
    write_manifest(directory, versions={"llmc": __version__, **report["versions"]}, backend=report["backend"], build={
        "model": state.model_path.name, "model_sha256": model_sha, "architecture": state.spec.architecture,
        "recipe": recipe.name, "recipe_sha256": recipe.sha256, "passes": list(recipe.passes),
        "max_batch": r.options.max_batch, "max_seq": r.options.max_seq, "dtype": logits,
        "prompt": r.prompt, "decode_steps": r.decode_steps,
    })


def _safer_recipe(name: str) -> str:
    if name.startswith("int4"):  # int4-gptq: the INT4 recipe that lost least on Gemma 3 270M (benchmarks/NOTES.md)
        return "int8-wo or fp8-wo" if name.startswith("int4-gptq") else "int4-gptq, int8-wo or fp8-wo"
    if name in ("fp8", "int8-sq"):  # W8A8: the weight-only 8-bit recipes keep activations FP16
        return "fp8-wo or int8-wo"
    return "fp16"
