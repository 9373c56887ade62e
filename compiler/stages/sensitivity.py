"""Sensitivity (`llmc analyze`): each group of matmuls quantized alone, measured on held-out text.

Writes sensitivity.json (machine-readable), sensitivity.md (tables) and PNG bar charts into the
staged output; the same measurements drive `llmc build --max-ppl-delta` (precision_search.py).
"""

from __future__ import annotations

import dataclasses
import json
import math

from compiler.stages.state import BuildState
from compiler.measure.precision_search import Evaluator, measure_sensitivity
from compiler.measure.quality import QUALITY_WINDOW, held_out
from compiler.report.sensitivity_plot import plot_sensitivity
from compiler.stages.base import Stage
from compiler.stages.precision import pass_context


class Sensitivity(Stage):
    name = "sensitivity"
    reads = ("loaded", "exported", "activations")
    writes = ("analysis",)

    def __init__(self, by: tuple[str, ...], render_markdown):
        self.by, self.render_markdown = by, render_markdown

    def run(self, state: BuildState) -> None:
        note = state.progress.note
        held = held_out(state.loaded, state.texts.evaluation, min(QUALITY_WINDOW, state.request.options.max_seq))
        ev = Evaluator(state.exported, state.recipe, pass_context(state), held, state.loaded.tokenizer.pad_token_id)
        note(f"{len(ev.units)} matmuls in {ev.aggressive.label}; measuring each group alone, the rest FP16")
        everything = ev.measure({u.name: ev.aggressive.label for u in ev.units})
        results = {by: measure_sensitivity(ev, by, lambda d, t, by=by: state.progress.step(by, d, t)) for by in self.by}
        name = state.model_path.name
        report = {
            "model": name, "recipe": state.recipe.name, "format": ev.aggressive.label,
            "reference_perplexity": math.exp(held.reference_nll), "eval_tokens": int(held.targets.size),
            "all_quantized": everything.summary(),
            "groups": {by: [dataclasses.asdict(s) for s in rows] for by, rows in results.items()},
        }
        plots = {}
        for by, rows in report["groups"].items():
            if plot_sensitivity(rows, state.staging / f"sensitivity-{by}.png",
                                f"{name}: {ev.aggressive.label} one {by} at a time"):
                plots[by] = f"sensitivity-{by}.png"
        (state.staging / "sensitivity.json").write_text(json.dumps(report, indent=1))
        (state.staging / "sensitivity.md").write_text(self.render_markdown(report, plots))
        state.analysis = report
