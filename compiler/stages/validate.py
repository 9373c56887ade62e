"""Validate: the compiled ONNX (onnxruntime) against PyTorch's logits on one prompt (compiler/measure/validate.py).

The measurement is cached; the recipe's tolerance judges it on every build, so editing a tolerance
re-checks without recomputing anything.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compiler.stages.state import BuildState
from compiler.measure.validate import ValidationResult, compare, rejudge
from compiler.report.report_json import tool_versions
from compiler.stages.base import Stage, read_meta, shared_session


class Validate(Stage):
    name = "validate"
    reads = ("decode_reference", "session")
    writes = ("validation", "session")
    cached = True
    chains_on = "passes"

    def key_inputs(self, state: BuildState) -> dict:
        r, versions = state.request, tool_versions()
        return {"model": state.cache.dir_digest(state.model_path), "prompt": r.prompt, "decode_steps": r.decode_steps,
                "max_seq": r.options.max_seq, "onnxruntime": versions.get("onnxruntime"), "torch": versions.get("torch")}

    def run(self, state: BuildState) -> None:
        state.validation = compare(state.decode_reference, shared_session(state), state.recipe.tolerance)

    def save(self, state: BuildState, scratch: Path) -> tuple[dict[str, Path], dict]:
        return {}, {"result": dataclasses.asdict(state.validation), "parameters": state.parameters}

    def restore(self, state: BuildState, entry: Path) -> None:
        meta = read_meta(entry)
        tolerance = state.recipe.tolerance
        state.validation = rejudge(ValidationResult(**{**meta["result"], "tolerance": tolerance}), tolerance)
        if state.parameters is None:  # the model was not loaded: the entry recorded its size
            state.parameters = meta.get("parameters")

    def detail(self, state: BuildState) -> str:
        v = state.validation
        return f"max err {v.max_abs_error:.3g}, agreement {v.greedy_agreement:.0%}"

    def report(self, state: BuildState) -> dict:
        return {"numerics": state.validation}
