"""Package: the verdict, the tokenizer, the Triton repository and the sizes, into the staged output.

report.json, report.md and manifest.json are written by the driver after this, from every stage's
report sections; the staged directory then becomes the output (or `<out>.failed` on a failed verdict).
"""

from __future__ import annotations

import onnx_ir as ir

from compiler.stages.state import BuildState
from compiler.frontend.onnx_files import onnx_files
from compiler.frontend.tokenizer_files import copy_tokenizer
from compiler.measure.sizes import weight_footprint
from compiler.measure.verdict import decide
from compiler.graph_io import io_from_onnx
from compiler.serving.triton_repo import ServingSpec, unservable_reason, write_repository
from compiler.stages.base import Stage


def tokenizer_ids(model_path) -> tuple[int, tuple[int, ...]]:
    """(pad id, stop ids) from the model's tokenizer, for the Triton generate model."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    return tok.pad_token_id or 0, tuple(t for t in [tok.eos_token_id] if t is not None)


class Package(Stage):
    name = "package"
    writes = ("verdict", "triton_models", "sizes_bytes", "package_warnings")

    def __init__(self, repository: bool = True):
        # False for a part of another build (the draft): only the outer artifact is served, so a Triton
        # repository inside draft/ would be files nothing reads.
        self.repository = repository

    def run(self, state: BuildState) -> None:
        state.verdict = decide(state.validation, state.quality, state.recipe)  # which figures decide pass / fail
        state.verdict.failures.extend(state.draft_failures)
        staging, r = state.staging, state.request
        state.weights = weight_footprint(ir.load(staging / "model.onnx"))
        copy_tokenizer(state.model_path, staging / "tokenizer")
        pad, stops = tokenizer_ids(state.model_path)
        files = sorted(onnx_files(staging).values())
        serving = ServingSpec(max_batch=r.options.max_batch, max_seq=r.options.max_seq,
                              io=io_from_onnx(staging / "model.onnx"), tokenizer_dir=staging / "tokenizer",
                              onnx_files=tuple(files), pad_token_id=pad, stop_token_ids=stops,
                              cpu_fallback=r.triton_cpu_fallback)
        unservable = unservable_reason(state.engine)  # a paged pool or FP8 tensors: nothing Triton can declare
        if not self.repository:
            state.triton_models = []
        elif unservable:
            state.triton_models = []
            state.package_warnings = [f"no Triton repository was written: {unservable}"]
        else:
            state.triton_models = sorted(write_repository(staging / "triton", state.engine, serving))
        state.sizes_bytes = {p.name: p.stat().st_size for p in [*files, state.engine.plan_path]}

    def report(self, state: BuildState) -> dict:
        v = state.verdict
        return {"status": "pass" if v.passed else "fail", "sizes_bytes": state.sizes_bytes, "weights": state.weights,
                "failures": v.failures, "verdict_basis": v.basis,
                "triton_model": "triton/llm" if state.triton_models else None, "triton_models": state.triton_models}

    def warnings(self, state: BuildState) -> list[str]:
        return list(state.verdict.warnings) + state.package_warnings
