"""`llmc analyze`: where a quantization recipe loses accuracy, per decoder layer and per projection.

Why: before trusting (or tuning) an INT4 build, an engineer wants to see which layers it hurts.
Each group (one decoder layer's matmuls, or one matmul, or lm_head) is quantized alone in the
recipe's format with everything else FP16, and the graph is measured like the quality stage does
(onnxruntime vs the PyTorch FP32 reference on held-out text: KL and perplexity delta). The same
measurements drive `llmc build --max-ppl-delta` (compiler/measure/precision_search.py).

Writes sensitivity.json (machine-readable), sensitivity.md (tables) and PNG bar charts, all at
once into the output directory (nothing is left half-written).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from passes import NEEDS_CALIBRATION, PassContext

from compiler.driver.cache import StageCache, export_key
from compiler.frontend.calibrate import calibrate
from compiler.frontend.corpus import default_calibration_text, default_eval_text, read_text_file
from compiler.frontend.default_model import default_model_dir
from compiler.driver.run import export_cached
from compiler.frontend.load import check_model_files, load_model, read_spec
from compiler.driver.lock import OutputLock
from compiler.driver.staged_output import StagedOutput
from compiler.measure.precision_search import Evaluator, Sensitivity, measure_sensitivity, quant_entry
from compiler.driver.preflight import check_output_path, check_output_writable
from compiler.measure.quality import QUALITY_WINDOW, held_out
from compiler.recipe import load_recipe
from compiler.report.sensitivity_plot import plot_sensitivity
from compiler.graph_io import ExportedGraph

GRANULARITIES = ("layer", "matmul")


@dataclasses.dataclass
class AnalyzeRequest:
    model: Path | None = None
    recipe: str = "int4-awq"
    output: Path | None = None
    by: tuple[str, ...] = GRANULARITIES
    max_seq: int = 256
    calib_data: Path | None = None
    eval_data: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    cache_dir: Path | None = None  # the build's stage cache: the export is reused / stored there


def run_analyze(request: AnalyzeRequest, note: Callable[[str], None] = lambda text: None) -> dict:
    recipe = load_recipe(request.recipe)
    quant_entry(recipe)  # a recipe without a (single) weight quantizer has nothing to analyze
    model_path = (Path(request.model) if request.model else default_model_dir()).expanduser().resolve()
    read_spec(model_path, request.trust_remote_code)
    check_model_files(model_path, request.allow_pickle)
    eval_text = read_text_file(request.eval_data, "--eval-data") if request.eval_data else default_eval_text()
    needs_calibration = any(p in NEEDS_CALIBRATION for p in recipe.passes)
    calib_text = (read_text_file(request.calib_data, "--calib-data") if request.calib_data
                  else default_calibration_text()) if needs_calibration else None
    output = (Path(request.output) if request.output
              else Path("artifacts") / f"{model_path.name}-sensitivity-{recipe.name}").resolve()
    check_output_path(output, model_path)
    check_output_writable(output)
    start = time.perf_counter()
    with OutputLock(output), StagedOutput(output) as out:
        loaded = load_model(model_path, request.allow_pickle, request.trust_remote_code)
        note(f"loaded {loaded.spec.architecture}, {loaded.num_parameters / 1e6:.2f}M params")
        activations = calibrate(loaded, calib_text).activations if calib_text is not None else None
        exported = _export(loaded, model_path, request, out.path / ".export", note)
        held = held_out(loaded, eval_text, min(QUALITY_WINDOW, request.max_seq))
        ctx = PassContext(max_positions=request.max_seq, activations=activations)
        ev = Evaluator(exported, recipe, ctx, held, loaded.tokenizer.pad_token_id)
        note(f"{len(ev.units)} matmuls in {ev.aggressive.label}; measuring each group alone, the rest FP16")
        everything = ev.measure({u.name: ev.aggressive.label for u in ev.units})
        results: dict[str, list[Sensitivity]] = {}
        for by in request.by:
            results[by] = measure_sensitivity(ev, by, lambda d, t, by=by: note(f"{by} {d}/{t}"))
        report = {
            "model": model_path.name, "recipe": recipe.name, "format": ev.aggressive.label,
            "reference_perplexity": math.exp(held.reference_nll),
            "eval_tokens": int(held.targets.size),
            "all_quantized": everything.summary(),
            "groups": {by: [dataclasses.asdict(s) for s in rows] for by, rows in results.items()},
            "seconds": time.perf_counter() - start,
        }
        plots = {}
        for by, rows in report["groups"].items():
            name = f"sensitivity-{by}.png"
            if plot_sensitivity(rows, out.path / name, f"{model_path.name}: {ev.aggressive.label} one {by} at a time"):
                plots[by] = name
        (out.path / "sensitivity.json").write_text(json.dumps(report, indent=1))
        (out.path / "sensitivity.md").write_text(render_markdown(report, plots))
        report["output"] = str(out.commit())
    return report


def _export(loaded, model_path: Path, request: AnalyzeRequest, scratch: Path, note) -> ExportedGraph:
    """The build's export stage: from the stage cache when it holds this model's export, else exported
    (and stored there when a cache is given)."""
    cache = StageCache(request.cache_dir)
    key = export_key(cache, model_path, request.trust_remote_code) if cache.enabled else None
    entry = cache.get("export", key) if key else None
    if entry is not None:
        note(f"export: cached {key[:12]}")
    return export_cached(lambda: loaded, cache, key, entry, scratch)


def render_markdown(report: dict, plots: dict[str, str]) -> str:
    everything = report["all_quantized"]
    lines = [f"# Sensitivity of {report['model']} to {report['format']} ({report['recipe']})", "",
             f"Each group is quantized alone (everything else FP16) and measured with onnxruntime against the "
             f"PyTorch FP32 reference on {report['eval_tokens']} held-out tokens (reference perplexity "
             f"{report['reference_perplexity']:.3f}). All groups at once: perplexity {everything['ppl_delta']:+.3%}, "
             f"KL {everything['kl_mean']:.5f}, {everything['weight_bytes']} weight bytes.", ""]
    for by, rows in report["groups"].items():
        lines += [f"## Per {by}", "", "| group | KL | perplexity delta | bytes saved | KL per MB saved |",
                  "|---|---|---|---|---|"]
        for r in sorted(rows, key=lambda r: -r["kl_mean"]):
            per_mb = r["kl_mean"] / max(r["bytes_saved"], 1) * 1e6
            lines.append(f"| {r['group']} | {r['kl_mean']:.5f} | {r['ppl_delta']:+.3%} | {r['bytes_saved']} | {per_mb:.4f} |")
        lines.append("")
        if by == "matmul":
            lines += _projection_matrix(rows)
        if by in plots:
            lines += [f"![sensitivity per {by}]({plots[by]})", ""]
    return "\n".join(lines)


def _projection_matrix(rows: list[dict]) -> list[str]:
    """KL by layer (rows) and projection (columns): the pattern at a glance."""
    from compiler.measure.precision_search import Unit

    grid: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        unit = Unit(r["group"], 0, 0)
        if unit.layer == unit.name:  # lm_head: its own row in the table above
            continue
        grid[unit.layer][unit.projection] = r["kl_mean"]
    columns = sorted({c for row in grid.values() for c in row})
    out = ["KL by layer and projection:", "", "| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for layer, row in grid.items():
        out.append(f"| {layer} | " + " | ".join(f"{row[c]:.5f}" if c in row else "" for c in columns) + " |")
    return out + [""]
