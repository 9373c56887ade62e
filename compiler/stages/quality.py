"""Quality: what the compiled graph costs on held-out text, in user terms (compiler/measure/quality.py)."""

from __future__ import annotations

from compiler.stages.state import BuildState
from compiler.measure.quality import score
from compiler.runtime.runner import Runner
from compiler.stages.base import Stage, shared_session


class Quality(Stage):
    name = "quality"
    reads = ("quality_reference", "session", "pad_token_id")
    writes = ("quality", "session")

    def skip_reason(self, state: BuildState) -> str | None:
        return "the recipe does not quantize (use --measure-quality)" if state.texts.evaluation is None else None

    def run(self, state: BuildState) -> None:
        state.quality = score(state.quality_reference, Runner(shared_session(state), state.pad_token_id))

    def detail(self, state: BuildState) -> str:
        q = state.quality
        return (f"perplexity {q.reference_perplexity:.3f} -> {q.compiled_perplexity:.3f} "
                f"({q.ppl_delta:+.2%}), KL {q.kl_mean:.4f}, agreement {q.greedy_agreement:.1%}")

    def report(self, state: BuildState) -> dict:
        r = state.request
        return {"quality": state.quality,
                "eval_data": None if state.texts.evaluation is None else (
                    str(r.eval_data) if r.eval_data else "built-in held-out sample")}
