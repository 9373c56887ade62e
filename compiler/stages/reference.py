"""Reference: everything validate and quality compare against, computed while the model is loaded.

Computed before the export so the PyTorch model can be dropped right after it: the model is never
resident beside the graph's own weights or the onnxruntime session (at 1B, 4.9 GB each in FP32).
"""

from __future__ import annotations

from compiler.stages.state import BuildState
from compiler.measure.quality import QUALITY_WINDOW, quality_reference
from compiler.measure.validate import decode_reference
from compiler.stages.base import Stage


class Reference(Stage):
    name = "reference"
    reads = ("loaded",)
    writes = ("decode_reference", "quality_reference")

    def skip_reason(self, state: BuildState) -> str | None:
        if state.hits.get("validate") and state.texts.evaluation is None:
            return "no quality to measure and validation is cached"
        return None

    def run(self, state: BuildState) -> None:
        r = state.request
        if not state.hits.get("validate"):
            state.decode_reference = decode_reference(state.loaded, r.prompt, r.decode_steps,
                                                      max_positions=r.options.max_seq)
        if state.texts.evaluation is not None:
            state.quality_reference = quality_reference(state.loaded, state.texts.evaluation, r.options.max_seq,
                                                        window=QUALITY_WINDOW)

    def detail(self, state: BuildState) -> str:
        d, q = state.decode_reference, state.quality_reference
        return ", ".join(([f"{d.decode_steps + 1} decode steps"] if d else [])
                         + ([f"{q.held.targets.size} held-out tokens"] if q else []))
