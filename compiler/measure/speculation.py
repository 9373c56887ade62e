"""The build's proof that speculative decoding with its draft changes nothing: greedy output with the
draft proposing equals plain greedy output of the target, token for token, on the same prompts.

Why a build check and not only a test: the failure users fear with speculation is silent (a verifier
or cache-rollback bug that changes the text), and it depends on the pair of graphs a build produced.
Both graphs run in onnxruntime, the executor of every numerics claim here. The figures that say
whether the draft pays (acceptance, accepted tokens per target step) come from the same runs.

A difference is excused only at a near-tie: where the target itself ranks the two tokens within
NEAR_TIE logits (a verify step scores k+1 positions at once, so its GEMMs have other shapes and
FP16 activations can round the other way: FP16's spacing at |logit| 16-32 is 0.016-0.031).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

NEAR_TIE = 0.05


@dataclasses.dataclass
class SpeculationCheck:
    proposer: str
    num_draft_tokens: int
    fixed_k: bool
    prompts: int
    new_tokens: int  # over all prompts
    identical: bool  # speculative tokens == plain greedy tokens for every prompt
    divergences: list[dict]  # per differing prompt, its first difference and the target's margin there
    acceptance_rate: float
    accepted_per_target_step: float
    target_steps: int  # speculative: target graph calls
    plain_steps: int  # plain greedy: target graph calls for the same tokens
    plain_seconds: float
    speculative_seconds: float

    @property
    def failures(self) -> list[str]:
        return unexcused(self.divergences)


def unexcused(divergences: list[dict]) -> list[str]:
    """The differences no near-tie explains: each is a verification bug."""
    return [f"speculative greedy output differs from plain greedy at prompt {d['prompt']}, new token "
            f"{d['position']} ({d['speculative']} instead of {d['plain']}; the target's logits differ by "
            f"{d['margin']:.3g} there, more than a near-tie's {NEAR_TIE}): a verification bug"
            for d in divergences if not abs(d["margin"]) <= NEAR_TIE]


def check_speculation(target_onnx: Path, draft_onnx: Path, prompts: list[list[int]], new_tokens: int,
                      num_draft_tokens: int, pad_token_id: int, stop_tokens: tuple[int, ...] = ()) -> SpeculationCheck:
    from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
    from compiler.runtime.proposers import DraftProposer
    from compiler.runtime.runner import Runner
    from compiler.runtime.speculative import SpeculativeRunner

    target = OnnxRuntimeExecutor(target_onnx, arena=False)
    draft = OnnxRuntimeExecutor(draft_onnx, arena=False)
    plain_runner = Runner(target, pad_token_id)
    plain_runner.prefill([prompts[0][:1]])  # warm both sessions up, so neither timing pays for it
    Runner(draft, pad_token_id).prefill([prompts[0][:1]])
    start = time.perf_counter()
    plain = plain_runner.generate(prompts, new_tokens, stop_tokens=stop_tokens)
    plain_seconds = time.perf_counter() - start
    speculative = SpeculativeRunner(plain_runner, DraftProposer(draft, pad_token_id), num_draft_tokens)
    start = time.perf_counter()
    spec = speculative.generate(prompts, new_tokens, stop_tokens=stop_tokens)
    spec_seconds = time.perf_counter() - start
    return SpeculationCheck(
        proposer="draft", num_draft_tokens=num_draft_tokens, fixed_k=True, prompts=len(prompts),
        new_tokens=sum(len(t) for t in spec.tokens), identical=plain.tokens == spec.tokens,
        divergences=divergences(plain_runner, prompts, plain.tokens, spec.tokens),
        acceptance_rate=spec.acceptance_rate, accepted_per_target_step=spec.accepted_per_step,
        target_steps=spec.steps, plain_steps=plain.steps, plain_seconds=plain_seconds,
        speculative_seconds=spec_seconds)


def divergences(runner, prompts, plain: list[list[int]], spec: list[list[int]]) -> list[dict]:
    """Each prompt's first difference between the two outputs, with the target's own preference for
    its plain token there (its logit minus the speculative token's, from one fresh prefill)."""
    out = []
    for b, (p, s) in enumerate(zip(plain, spec)):
        i = next((i for i, (x, y) in enumerate(zip(p, s)) if x != y), None)
        if i is None:
            if len(p) != len(s):  # same tokens, but one stopped early: nothing excuses that
                out.append({"prompt": b, "position": min(len(p), len(s)), "plain": None, "speculative": None,
                            "margin": float("inf")})
            continue
        logits = runner.prefill([prompts[b] + p[:i]])[0]
        out.append({"prompt": b, "position": i, "plain": int(p[i]), "speculative": int(s[i]),
                    "margin": float(np.float64(logits[p[i]]) - np.float64(logits[s[i]]))})
    return out
