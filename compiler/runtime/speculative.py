"""Speculative decoding: the target verifies a proposer's k tokens (plus one of its own) per step.

Why it needs no new graph: llmc's graph already takes several new tokens per sequence against its
KV cache (compiler/runtime/runner.py). A verify step feeds row b its last token and its k_b proposals at
positions n_b-1 .. n_b-1+k_b; the logits at index i are the target's next-token scores after
proposal i-1. Tokens past the first rejection leave their K/V in slots beyond the sequence's new
length; the graph attends to slot j only for queries at positions >= j, and the row's next feed
starts at its new length, writing those slots before any query can see them, so no rollback is needed.

The rules, so that the output is the target's own (Leviathan et al. 2023, "Fast Inference from
Transformers via Speculative Decoding", Algorithm 1; Chen et al. 2023):
- greedy: keep the longest prefix of proposals equal to the target's argmax, then the target's
  argmax after it (a correction, or a bonus token when all k were kept) — plain greedy's tokens;
- sampling: accept proposal x with probability min(1, p(x)/q(x)), else draw from the normalised
  (p - q)+ and stop; if all k were kept draw a bonus from p. Each emitted token is then distributed
  exactly as p, the distribution plain sampling draws from (runner.distribution).

k is fixed (`num_draft_tokens`); per step it is cut so that no row writes past the cache capacity or
proposes more tokens than it may still emit, which makes the last steps near the capacity plain decoding.
Rows of a batch accept different counts: each keeps its own position.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import numpy as np

from compiler.runtime.proposers import Proposal, Proposer
from compiler.runtime.runner import Generation, Runner, Sampling, distribution, pick


@dataclasses.dataclass
class SpeculativeGeneration(Generation):
    """`steps` counts target forward passes (prefill + verify steps), as plain Generation.steps does."""

    proposer: str = ""
    num_draft_tokens: int = 0
    proposed: int = 0  # proposal tokens the target scored
    accepted: int = 0  # of them, kept in the output
    verify_steps: int = 0
    row_steps: int = 0  # (row, verify step) pairs in which the row was still generating
    accepted_per_row: list[int] = dataclasses.field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def accepted_per_step(self) -> float:
        """Mean accepted proposal tokens per sequence per verify step (each also emits one target token)."""
        return self.accepted / self.row_steps if self.row_steps else 0.0

    @property
    def target_steps_per_token(self) -> float:
        return self.steps / self.new_tokens if self.new_tokens else float("nan")


def accept_probability(p_x: float, q_x: float) -> float:
    """min(1, p/q): the chance of keeping a token the proposer drew with probability q_x."""
    return 1.0 if p_x >= q_x else p_x / q_x


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """normalised (p - q)+: where a rejected token's replacement is drawn from."""
    r = np.maximum(p - q, 0.0)
    total = r.sum()
    return r / total if total > 0 else p  # p == q: rejection has probability 0; any draw is exact


def verify_greedy(proposed: list[int], logits: np.ndarray) -> tuple[int, list[int]]:
    """(accepted count, emitted tokens) for one row; logits [k+1, vocab] from the verify step."""
    best = np.argmax(logits[: len(proposed) + 1], axis=-1)
    accepted = 0
    while accepted < len(proposed) and proposed[accepted] == best[accepted]:
        accepted += 1
    return accepted, [*proposed[:accepted], int(best[accepted])]


def verify_sampled(proposal: Proposal, logits: np.ndarray, sampling: Sampling,
                   rng: np.random.Generator) -> tuple[int, list[int]]:
    """The rejection rule for one row: (accepted count, emitted tokens), each distributed as the target's p."""
    for i, x in enumerate(proposal.tokens):
        p = distribution(logits[i], sampling)
        if proposal.probs is None:
            q = np.zeros_like(p)
            q[x] = 1.0
        else:
            q = proposal.probs[i]
        if rng.random() < accept_probability(p[x], q[x]):
            continue
        r = residual(p, q)
        return i, [*proposal.tokens[:i], int(rng.choice(r.size, p=r))]
    k = len(proposal.tokens)
    return k, [*proposal.tokens, pick(logits[k], sampling, rng)]


class SpeculativeRunner:
    """Plain greedy / sampled generation, in fewer target steps when the proposer guesses well."""

    def __init__(self, target: Runner, proposer: Proposer, num_draft_tokens: int = 4):
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1 (got {num_draft_tokens})")
        self.target = target
        self.proposer = proposer
        self.k = num_draft_tokens
        self.stats = SpeculativeGeneration([], 0.0, 0.0, 0)

    def stream(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_tokens: tuple[int, ...] = ()) -> Iterator[list[list[int]]]:
        """Yield each row's new tokens per target step ([] once it has stopped)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        target = self.target
        target._check_fits(max(len(p) for p in prompts) + max_new_tokens - 1)
        capacity = target.io.capacity
        batch = len(prompts)
        stats = self.stats = SpeculativeGeneration([], 0.0, 0.0, 0, proposer=self.proposer.name,
                                                   num_draft_tokens=self.k, accepted_per_row=[0] * batch)
        rng = np.random.default_rng(sampling.seed)
        first = [pick(row, sampling, rng) for row in target.prefill(prompts)]
        contexts = [[*p, t] for p, t in zip(prompts, first)]
        emitted = [1] * batch
        done = [t in stop_tokens or max_new_tokens == 1 for t in first]
        stats.steps = 1
        yield [[t] for t in first]
        self.proposer.start(prompts)
        while not all(done):
            live = [b for b in range(batch) if not done[b]]
            starts = [len(contexts[b]) - 1 for b in range(batch)]  # the last token's position: not yet in the cache
            room = min(capacity - starts[b] for b in live)  # feed width every live row has slots for
            counts = [0 if done[b] else min(self.k, room - 1, max_new_tokens - emitted[b] - 1) for b in range(batch)]
            proposals = (self.proposer.propose(contexts, counts, sampling, rng) if max(counts) > 0
                         else [Proposal([]) for _ in range(batch)])
            width = 1 + max(len(proposals[b].tokens) for b in live)
            ids = np.full((batch, width), target.pad, np.int64)
            positions = np.tile(np.arange(width, dtype=np.int64), (batch, 1))  # stopped rows: slots 0.., unused
            for b in live:
                fed = [contexts[b][-1], *proposals[b].tokens]
                ids[b, : len(fed)] = fed
                positions[b] += starts[b]
            logits = target.executor.step(ids, positions)
            stats.steps += 1
            stats.verify_steps += 1
            new: list[list[int]] = [[] for _ in range(batch)]
            for b in live:
                proposal = proposals[b]
                if sampling.temperature > 0:
                    accepted, tokens = verify_sampled(proposal, logits[b], sampling, rng)
                else:
                    accepted, tokens = verify_greedy(proposal.tokens, logits[b])
                stop = next((i for i, t in enumerate(tokens) if t in stop_tokens), None)
                if stop is not None:
                    tokens = tokens[: stop + 1]
                    done[b] = True
                stats.proposed += len(proposal.tokens)
                stats.row_steps += 1
                kept = min(accepted, len(tokens))
                stats.accepted += kept
                stats.accepted_per_row[b] += kept
                contexts[b].extend(tokens)
                emitted[b] += len(tokens)
                done[b] = done[b] or emitted[b] >= max_new_tokens
                new[b] = tokens
            yield new

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_tokens: tuple[int, ...] = ()) -> SpeculativeGeneration:
        out: list[list[int]] = [[] for _ in prompts]
        start = time.perf_counter()
        ttft = decode_start = 0.0
        for i, new in enumerate(self.stream(prompts, max_new_tokens, sampling, stop_tokens)):
            if i == 0:
                decode_start = time.perf_counter()
                ttft = decode_start - start
            for b, tokens in enumerate(new):
                out[b].extend(tokens)
        return dataclasses.replace(self.stats, tokens=out, time_to_first_token_s=ttft,
                                   decode_s=time.perf_counter() - decode_start)
