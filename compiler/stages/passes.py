"""Passes: the recipe's graph rewrites over the export, the result saved as the artifact's model.onnx."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from passes import PassContext, pass_class

from compiler.stages.state import BuildState
from compiler.frontend.onnx_files import onnx_files, save_onnx
from compiler.frontend.run_passes import PassRecord, run_passes
from compiler.measure.pass_check import PassChecker, describe_divergence, first_divergent
from compiler.stages.base import Stage, read_meta, restore_files
from compiler.stages.precision import adopt_searched_recipe, pass_context


def _digest(text: str | None) -> str | None:
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def precision_map(records: list[PassRecord]) -> dict[str, str]:
    """HF module name -> weight format, from what each quantization pass reports it touched."""
    out = {}
    for r in records:
        fmt = pass_class(r.name).weight_format or r.name
        for module in r.details.get("quantized", []):
            out[module] = fmt
    return out


class Passes(Stage):
    name = "passes"
    reads = ("exported", "activations")
    writes = ("records",)
    cached = True
    chains_on = "export"

    def key_inputs(self, state: BuildState) -> dict:
        r, recipe = state.request, state.recipe
        inputs = {"passes": recipe.passes, "context": dataclasses.asdict(PassContext(max_positions=r.options.max_seq)),
                  "options": [dict(o) for o in recipe.pass_options], "calibration": _digest(state.texts.calibration)}
        if r.max_ppl_delta is not None:  # the passes then run the search's answer, which depends on these too
            inputs |= {"max_ppl_delta": r.max_ppl_delta, "promote_to": r.promote_to,
                       "eval": _digest(state.texts.evaluation or "")}
        return inputs

    def cache_valid(self, state: BuildState, entry: Path) -> bool:
        # --check-passes: re-run the passes (same output bytes) unless the entry measured each one
        return not state.request.check_passes or all(r.get("check") for r in read_meta(entry)["records"])

    def run(self, state: BuildState) -> None:
        final, state.records = run_passes(state.exported, state.recipe, pass_context(state),
                                          state.progress.pass_done,
                                          checker=PassChecker if state.request.check_passes else None)
        save_onnx(final.model, state.staging / "model.onnx")

    def save(self, state: BuildState, scratch: Path) -> tuple[dict[str, Path], dict]:
        files = onnx_files(state.staging)
        if state.search is not None:
            files["recipe.yaml"] = state.staging / "recipe.yaml"
        return files, {"records": [dataclasses.asdict(r) for r in state.records], "search": state.search}

    def restore(self, state: BuildState, entry: Path) -> None:
        restore_files(entry, ("model.onnx", "model.onnx.data"), state.staging)
        meta = read_meta(entry)
        state.records = [PassRecord(**r) for r in meta["records"]]
        if meta["search"] is not None:
            adopt_searched_recipe(state, (entry / "recipe.yaml").read_text(), meta["search"])

    def detail(self, state: BuildState) -> str:
        return f"{len(state.records)} passes"

    def report(self, state: BuildState) -> dict:
        records = state.records or []
        return {"passes": records, "precision": precision_map(records),
                "coverage": {r.name: r.details["coverage"]["summary"] for r in records if r.details.get("coverage")}}

    def warnings(self, state: BuildState) -> list[str]:
        if state.request.check_passes and first_divergent(state.records) is not None:
            return [describe_divergence(state.records)]
        return []
