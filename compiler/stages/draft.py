"""Draft: a second, smaller model built into the artifact's draft/ for speculative decoding, and the
proof that decoding with it changes nothing (compiler/measure/speculation.py).

The draft is a complete llmc build of `--draft DIR` with the target's recipe and options (the same
stage list, the same stage cache), validated like any build; its report.json sits in draft/. Its
tokenizer was checked against the target's before any work (compiler/driver/build.py). Then both
graphs run greedy on the validation prompt and a few held-out prompts, plain and with the draft
proposing, and the outputs must be equal: the report's `speculation` section has the check and the
figures that say whether the draft pays.
"""

from __future__ import annotations

import dataclasses

from compiler.errors import BadInputError
from compiler.frontend.corpus import default_eval_text
from compiler.frontend.default_model import draft_dir
from compiler.measure.speculation import check_speculation
from compiler.stages.base import Stage
from compiler.stages.request import Progress
from compiler.stages.state import BuildState

CHECK_PROMPTS = 3  # held-out prompts besides the validation prompt
PROMPT_TOKENS = 24
NEW_TOKENS = 32
MIN_NEW_TOKENS = 8


class _DraftProgress(Progress):
    """The draft's stages as notes under the target's `draft` line."""

    def __init__(self, outer: Progress):
        self.outer = outer

    def stage_end(self, index, name, seconds, detail=""):
        self.outer.note(f"draft {name}: {detail}" if detail.startswith("skipped") else
                        f"draft {name}: done in {seconds:.2f} s" + (f" ({detail})" if detail else ""))

    def step(self, what, done, total):
        self.outer.step(f"draft {what}", done, total)

    def note(self, text):
        self.outer.note(f"draft: {text}")


def draft_request(request):
    """The draft's build: the target's recipe and options, no draft of its own, no precision search."""
    return dataclasses.replace(request, model=draft_dir(request.draft), draft=None, output=None, max_ppl_delta=None,
                               check_passes=False, triton_cpu_fallback=False)


def check_prompts(tokenizer, validation_prompt: str, heldout: str, capacity: int) -> tuple[list[list[int]], int]:
    """(prompts, new tokens each): the validation prompt and held-out slices that leave room in the
    cache for at least MIN_NEW_TOKENS new tokens (a short --eval-data or --max-seq gives fewer)."""
    ids = tokenizer(heldout).input_ids
    step = max(PROMPT_TOKENS, len(ids) // (CHECK_PROMPTS + 1))
    candidates = [tokenizer(validation_prompt).input_ids] + [ids[i * step:i * step + PROMPT_TOKENS]
                                                             for i in range(CHECK_PROMPTS)]
    prompts = [p for p in candidates if len(p) >= 2 and len(p) + MIN_NEW_TOKENS - 1 <= capacity]
    return prompts, min(NEW_TOKENS, capacity + 1 - max((len(p) for p in prompts), default=capacity))


class Draft(Stage):
    name = "draft"
    writes = ("draft", "speculation", "draft_failures")

    def skip_reason(self, state: BuildState) -> str | None:
        return None if state.request.draft else "no --draft"

    def run(self, state: BuildState) -> None:
        from transformers import AutoTokenizer

        r = state.request
        part = state.build_part(draft_request(r), state.staging / "draft", _DraftProgress(state.progress))
        state.draft = {"model": str(part.model_path), "architecture": part.spec.architecture,
                       "parameters": part.parameters, "status": "pass" if part.verdict.passed else "fail",
                       "failures": part.verdict.failures, "report": "draft/report.json"}
        tokenizer = AutoTokenizer.from_pretrained(state.model_path, local_files_only=True)
        stops = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
        prompts, new_tokens = check_prompts(tokenizer, r.prompt, state.texts.evaluation or default_eval_text(),
                                            r.options.max_seq)
        if not prompts:
            raise BadInputError(f"--max-seq {r.options.max_seq} leaves no room to check speculative decoding "
                                f"({MIN_NEW_TOKENS} new tokens after a prompt): raise --max-seq")
        state.speculation = check_speculation(state.staging / "model.onnx", state.staging / "draft" / "model.onnx",
                                              prompts, new_tokens, r.num_draft_tokens, tokenizer.pad_token_id or 0,
                                              stops)
        # A speculation mismatch fails the build (the output changed). The draft's own accuracy does not:
        # greedy output is the target's whatever the draft proposes; a worse draft only lowers acceptance.
        state.draft_failures = state.speculation.failures

    def detail(self, state: BuildState) -> str:
        s = state.speculation
        same = "identical to plain greedy" if s.identical else "DIFFERS from plain greedy"
        return (f"draft {state.draft['status']}; speculation {same} on {s.prompts} prompts, acceptance "
                f"{s.acceptance_rate:.1%}, {s.accepted_per_target_step:.2f} accepted per target step, "
                f"{s.target_steps} target steps vs {s.plain_steps}")

    def warnings(self, state: BuildState) -> list[str]:
        if state.draft is None:
            return []
        near_ties = len(state.speculation.divergences) - len(state.speculation.failures)
        return [f"the draft ({state.draft['model']}) is outside its recipe's limits: {f} (speculation stays exact; "
                "acceptance may suffer)" for f in state.draft["failures"]] + (
            [f"speculative greedy output differed from plain greedy on {near_ties} prompt(s), each at a near-tie "
             "of the target's own logits (report.json speculation.divergences)"] if near_ties else [])

    def report(self, state: BuildState) -> dict:
        if state.draft is None:
            return {}
        return {"draft": state.draft, "speculation": dataclasses.asdict(state.speculation)}
