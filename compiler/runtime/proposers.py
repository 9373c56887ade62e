"""Speculative-decoding proposers: cheap guesses of the next k tokens that the target then verifies.

Two kinds, as in vLLM / TensorRT-LLM / llama.cpp:
- `NgramProposer` (prompt lookup, Saxena 2023; vLLM's "ngram"): no second model; the continuation
  of the most recent earlier occurrence of the context's last n-gram. Deterministic, so the draft
  distribution q is one-hot at each proposed token.
- `DraftProposer`: a second, smaller llmc graph with the same tokenizer, run autoregressively for k
  steps (Leviathan et al. 2023, Chen et al. 2023); q is its sampling distribution at each step.

A proposal never changes what is generated, only how many target steps it takes: the verifier
(compiler/runtime/speculative.py) accepts a proposed token only where the target agrees (greedy) or by the
rejection rule that leaves the target's distribution unchanged (sampling).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from compiler.runtime.runner import Sampling, distribution
from compiler.runtime.executor import Executor


@dataclasses.dataclass
class Proposal:
    tokens: list[int]
    # [len(tokens), vocab]: the distribution each token was drawn from; None = deterministic (one-hot q)
    probs: np.ndarray | None = None


class Proposer(Protocol):
    name: str

    def start(self, prompts: list[list[int]]) -> None: ...

    def propose(self, contexts: list[list[int]], counts: list[int], sampling: Sampling,
                rng: np.random.Generator) -> list[Proposal]:
        """At most counts[b] tokens to follow contexts[b] (prompt + output so far); 0 = row not asked."""


class NgramProposer:
    """Prompt lookup: match the last n tokens (n = max_n down to min_n) at their most recent earlier
    occurrence in the context and propose the tokens that followed it there."""

    name = "ngram"

    def __init__(self, max_n: int = 3, min_n: int = 1):
        if not 1 <= min_n <= max_n:
            raise ValueError(f"n-gram sizes need 1 <= min_n <= max_n (got {min_n}, {max_n})")
        self.max_n, self.min_n = max_n, min_n

    def start(self, prompts: list[list[int]]) -> None:
        pass

    def lookup(self, context: list[int], count: int) -> list[int]:
        ids = np.asarray(context, np.int64)
        for n in range(min(self.max_n, len(context) - 1), self.min_n - 1, -1):
            # windows ids[s:s+n] for s <= len-n-1: each is followed by at least one token
            hits = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(ids[:-1], n) == ids[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1])  # the most recent earlier occurrence
                return context[start + n:start + n + count]
        return []

    def propose(self, contexts, counts, sampling, rng):
        return [Proposal(self.lookup(ctx, k) if k > 0 else []) for ctx, k in zip(contexts, counts)]


class DraftProposer:
    """A second llmc graph (same tokenizer) decoding k tokens per row ahead of the target.

    Its cache follows the target's slot rule: slot p holds the token at position p, and the graph
    attends to slots <= position. So a rejected proposal needs no undo: the draft remembers which
    tokens its slots hold, keeps the prefix they share with the accepted context, and overwrites
    the rest on its next feed. Catch-up feeds of unequal length are right-aligned (each row re-feeds
    its own last tokens at their own positions) so that no row writes past its context; re-fed
    slots get the same tokens again, which can only change the draft's rounding, never the output.
    """

    name = "draft"

    def __init__(self, executor: Executor, pad_token_id: int = 0):
        self.executor = executor
        self.capacity = executor.io.capacity
        if self.capacity is None:
            raise ValueError("the draft graph has a Concat-grown cache: rebuild it with a recipe that runs kv-cache-scatter")
        self.pad = pad_token_id
        self.cached: list[list[int]] = []  # the tokens in each row's draft-cache slots 0..len-1

    def start(self, prompts: list[list[int]]) -> None:
        self.executor.start(len(prompts))
        self.cached = [[] for _ in prompts]

    def _catch_up(self, contexts: list[list[int]], rows: list[int]) -> np.ndarray:
        """Feed each asked row the context tokens its cache lacks; its next-token logits [len(rows), vocab]."""
        batch = len(contexts)
        missing = {}
        for b in rows:
            ctx, have = contexts[b], self.cached[b]
            keep = 0
            limit = min(len(have), len(ctx) - 1)  # the last token is always fed: its logits are needed
            while keep < limit and have[keep] == ctx[keep]:
                keep += 1
            missing[b] = len(ctx) - keep
        width = max(missing.values())
        ids = np.full((batch, width), self.pad, np.int64)
        starts = np.zeros(batch, np.int64)
        last = np.zeros(batch, np.int64)
        for b in range(batch):
            if b in missing:
                ctx = contexts[b]
                starts[b] = max(len(ctx) - width, 0)  # right-aligned; from slot 0 when shorter than the feed
                window = ctx[starts[b]:]
                ids[b, :len(window)] = window
                last[b] = len(window) - 1
                self.cached[b] = list(ctx)
            else:
                self.cached[b] = []  # fed padding at slots 0.. below: nothing of it is kept
        positions = starts[:, None] + np.arange(width)[None]
        logits = self.executor.step(ids, positions)
        return logits[np.arange(batch), last][rows]

    def propose(self, contexts, counts, sampling, rng):
        rows = [b for b, k in enumerate(counts) if k > 0 and len(contexts[b]) <= self.capacity]
        out = [Proposal([]) for _ in contexts]
        if not rows:
            return out
        # one batched draft step per proposed token: the asked rows draft the same number, the most any
        # of them asked for that every one of them has slots for (token j is fed at position len + j - 1)
        steps = min(max(counts[b] for b in rows), *(self.capacity - len(contexts[b]) + 1 for b in rows))
        tokens = {b: [] for b in rows}
        probs = {b: [] for b in rows}
        logits = self._catch_up(contexts, rows)
        for j in range(steps):
            for i, b in enumerate(rows):
                if sampling.temperature > 0:
                    q = distribution(logits[i], sampling)
                    tokens[b].append(int(rng.choice(q.size, p=q)))
                    probs[b].append(q)
                else:
                    tokens[b].append(int(np.argmax(logits[i])))
            if j + 1 == steps:
                break
            ids = np.full((len(contexts), 1), self.pad, np.int64)
            positions = np.zeros((len(contexts), 1), np.int64)
            for b in range(len(contexts)):
                if b in tokens:
                    ids[b, 0] = tokens[b][-1]
                    positions[b, 0] = len(contexts[b]) + j
                    self.cached[b].append(tokens[b][-1])
                else:
                    self.cached[b] = []
            logits = self.executor.step(ids, positions)[:, 0][rows]
        for b in rows:
            k = counts[b]
            out[b] = Proposal(tokens[b][:k], np.stack(probs[b][:k]) if probs[b] else None)
        return out
