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
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable

from compiler.driver.build import plan, prepare, run_stages
from compiler.driver.lock import OutputLock
from compiler.stages.request import BuildRequest, Progress
from compiler.driver.staged_output import StagedOutput
from compiler.engine.engine_build import BuildOptions
from compiler.frontend.default_model import default_model_dir
from compiler.measure.precision_search import quant_entry
from compiler.recipe import load_recipe
from compiler.stages.calibrate import Calibrate
from compiler.stages.export import Export
from compiler.stages.load import Load
from compiler.stages.sensitivity import Sensitivity

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


class _Notes(Progress):
    def __init__(self, note: Callable[[str], None]):
        self.note = note

    def stage_end(self, index, name, seconds, detail=""):
        self.note(f"{name}: {detail}" if detail else f"{name}: done in {seconds:.1f} s")

    def step(self, what, done, total):
        self.note(f"{what} {done}/{total}")


def run_analyze(request: AnalyzeRequest, note: Callable[[str], None] = lambda text: None) -> dict:
    """`[Load(validates=False), Calibrate(), Export(), Sensitivity(by)]`: the build's first stages (the export
    from the same stage cache), then the sensitivity measurements, into one staged output directory."""
    recipe = load_recipe(request.recipe)
    quant_entry(recipe)  # a recipe without a (single) weight quantizer has nothing to analyze
    model_path = (Path(request.model) if request.model else default_model_dir()).expanduser().resolve()
    output = (Path(request.output) if request.output
              else Path("artifacts") / f"{model_path.name}-sensitivity-{recipe.name}").resolve()
    build = BuildRequest(model=model_path, recipe=request.recipe, output=output,
                         options=BuildOptions(max_seq=request.max_seq), calib_data=request.calib_data,
                         eval_data=request.eval_data, measure_quality=True, allow_pickle=request.allow_pickle,
                         trust_remote_code=request.trust_remote_code, cache_dir=request.cache_dir)
    stages = [Load(validates=False), Calibrate(), Export(), Sensitivity(request.by, render_markdown)]
    start = time.perf_counter()
    state = prepare(build, _Notes(note))
    with OutputLock(state.output), StagedOutput(state.output) as out:
        state.staging = out.path
        run_stages(stages, state, plan(stages, state))
        report = state.analysis | {"seconds": time.perf_counter() - start}
        report["output"] = str(out.commit())
    return report


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
