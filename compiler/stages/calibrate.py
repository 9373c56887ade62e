"""Calibrate: the activations entering each linear layer, for the passes that need them (AWQ)."""

from __future__ import annotations

import dataclasses

from compiler.stages.state import BuildState
from compiler.frontend.calibrate import calibrate
from compiler.stages.base import Stage


class Calibrate(Stage):
    name = "calibrate"
    reads = ("loaded",)
    writes = ("calibration", "activations")

    def skip_reason(self, state: BuildState) -> str | None:
        if state.texts.calibration is None:
            return "no pass of this recipe calibrates"
        if state.hits.get("passes"):
            return "passes are cached"
        return None

    def run(self, state: BuildState) -> None:
        found = calibrate(state.loaded, state.texts.calibration,
                          on_progress=lambda d, t: state.progress.step("calibrate", d, t))
        state.activations = found.activations
        state.calibration = dataclasses.replace(found, activations={})  # the summary the report keeps

    def detail(self, state: BuildState) -> str:
        return f"{state.calibration.tokens} tokens, {len(state.activations)} linear layers"

    def report(self, state: BuildState) -> dict:
        c, r = state.calibration, state.request
        return {"calibration": None if c is None else {
            "tokens": c.tokens, "sequences": c.sequences,
            "source": str(r.calib_data) if r.calib_data else "built-in sample"}}
