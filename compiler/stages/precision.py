"""Precision: with --max-ppl-delta, the per-matmul weight format that meets the budget
(compiler/measure/precision_search.py); the build then runs the recipe it wrote."""

from __future__ import annotations

from passes import PassContext

from compiler.stages.state import BuildState
from compiler.errors import AccuracyError
from compiler.frontend.calibrate import tokenize_windows
from compiler.frontend.corpus import default_calibration_text
from compiler.measure.precision_search import Evaluator, SearchResult, estimate_order, search_budget
from compiler.recipe import parse_recipe
from compiler.stages.base import Stage


# Calibration windows the Fisher/Taylor estimate runs forward + backward on (taylor_sensitivity.py):
# 16 x 128 tokens. Its order only has to be good; the bisection measures the answer.
ESTIMATE_WINDOWS, ESTIMATE_WINDOW = 16, 128


def pass_context(state: BuildState) -> PassContext:
    """The build facts passes need: positions to cover, calibration sample, the attention window."""
    return PassContext(max_positions=state.request.options.max_seq, activations=state.activations,
                       sliding_window=state.spec.sliding_window or 0)


def budget_miss(found: SearchResult, recipe_name: str) -> str:
    start, final = found.probes[0], found.final
    return (f"no weight precision meets --max-ppl-delta {found.budget:.2%}: every matmul in {recipe_name} measures "
            f"{start.ppl_delta:+.3%} ({start.weight_bytes} weight bytes) and even all-FP16 weights measure "
            f"{final.ppl_delta:+.3%} ({final.weight_bytes} bytes); raise the budget (FP16 arithmetic alone "
            "costs this much on this text)")


def adopt_searched_recipe(state: BuildState, text: str, search: dict) -> None:
    """The build runs the chosen recipe, and keeps it (recipe.yaml) to reproduce the build."""
    (state.staging / "recipe.yaml").write_text(text)
    search["base_recipe"] = state.recipe.name
    state.search = search
    state.recipe = parse_recipe(text, state.output / "recipe.yaml")


class Precision(Stage):
    name = "precision"
    reads = ("loaded", "exported", "activations", "quality_reference", "pad_token_id")
    writes = ("search", "recipe")

    def skip_reason(self, state: BuildState) -> str | None:
        if state.request.max_ppl_delta is None:
            return "no --max-ppl-delta"
        if state.hits.get("passes"):
            return "passes are cached"
        return None

    def run(self, state: BuildState) -> None:
        r, progress = state.request, state.progress
        evaluator = Evaluator(state.exported, state.recipe, pass_context(state), state.quality_reference.held,
                              state.pad_token_id, r.promote_to)
        progress.note(f"searching {len(evaluator.units)} matmuls: {evaluator.aggressive.label} -> "
                      f"{evaluator.safer.label} -> fp16 for held-out perplexity delta <= {r.max_ppl_delta:.2%}")
        windows = tokenize_windows(state.loaded.tokenizer, state.texts.calibration or default_calibration_text(),
                                   ESTIMATE_WINDOW, ESTIMATE_WINDOWS)

        def estimate():
            found = estimate_order(evaluator, state.loaded.model, windows,
                                   lambda d, t: progress.step("sensitivity estimate", d, t))
            progress.note(f"estimated {len(evaluator.units)} matmuls x 2 formats in {found.seconds:.1f} s "
                          f"({len(windows)} windows, one forward + backward each)")
            return found

        found = search_budget(
            evaluator, r.max_ppl_delta,
            on_probe=lambda what, p: progress.note(f"probe {what}: perplexity {p.ppl_delta:+.3%}, "
                                                   f"{p.weight_bytes / 1e6:.3f} MB weights"),
            estimate=estimate)
        if not found.fits:
            raise AccuracyError(budget_miss(found, state.recipe.name))
        adopt_searched_recipe(state, found.recipe_text, found.report())

    def detail(self, state: BuildState) -> str:
        s = state.search
        return (f"{s['promotions']} promotions, {s['evaluations']} graphs measured, perplexity "
                f"{s['final']['ppl_delta']:+.2%}, {s['final']['weight_bytes'] / 1e6:.3f} MB weights")

    def report(self, state: BuildState) -> dict:
        return {"precision_search": state.search}
