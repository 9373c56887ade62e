"""The generation loop: prefill, then decode step by step, over any executor (onnxruntime, TensorRT).

Batches of prompts with different lengths are right-padded for prefill; each sequence's tokens
sit at cache slots equal to their positions, so a sequence's next token is written at its own
length and its padding is overwritten before any real query can attend to it (the graph's mask is
`slot <= position`). Greedy or temperature / top-k sampling; per-sequence stop tokens.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator

import numpy as np

from compiler.runtime.executor import Executor


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy; top_k 0 = no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (stop token included when hit)
    time_to_first_token_s: float
    decode_s: float
    steps: int

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def decode_tokens_per_s(self) -> float:
        later = self.new_tokens - len(self.tokens)  # tokens produced after the first one
        return later / self.decode_s if self.decode_s > 0 else float("nan")


def distribution(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The sampling distribution (temperature, then top-k) over the vocabulary, float64.

    One definition shared by plain sampling and speculative verification (compiler/runtime/speculative.py),
    whose rejection rule is exact only if its p is the distribution plain sampling draws from."""
    scaled = logits.astype(np.float64) / sampling.temperature
    if 0 < sampling.top_k < scaled.size:
        cutoff = np.partition(scaled, -sampling.top_k)[-sampling.top_k]
        scaled = np.where(scaled >= cutoff, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    return probs / probs.sum()


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    probs = distribution(logits, sampling)
    return int(rng.choice(probs.size, p=probs))


class Runner:
    def __init__(self, executor: Executor, pad_token_id: int | None = 0):
        self.executor = executor
        self.io = executor.io
        self.pad = pad_token_id or 0

    def _check_fits(self, longest: int) -> None:
        if self.io.capacity is None:
            raise ValueError("graph has a Concat-grown cache: rebuild with a recipe that runs kv-cache-scatter")
        if longest > self.io.capacity:
            raise ValueError(f"{longest} positions needed but the cache holds {self.io.capacity} (--max-seq)")

    def prefill(self, prompts: list[list[int]]) -> np.ndarray:
        """Right-padded prefill; returns each prompt's last-position logits [batch, vocab]."""
        lengths = [len(p) for p in prompts]
        if min(lengths) == 0:
            raise ValueError("empty prompt")
        width = max(lengths)
        ids = np.full((len(prompts), width), self.pad, np.int64)
        for row, prompt in enumerate(prompts):
            ids[row, : len(prompt)] = prompt
        positions = np.tile(np.arange(width, dtype=np.int64), (len(prompts), 1))
        self.executor.start(len(prompts))
        last = np.array(lengths, np.int64)[:, None] - 1
        if self.io.logits_positions:  # the graph computes the last position's logits only (last-position-logits)
            return self.executor.step(ids, positions, logits_at=last)[:, 0]
        return self.executor.step(ids, positions)[np.arange(len(prompts)), last[:, 0]]

    def decode(self, tokens: list[int], positions: list[int]) -> np.ndarray:
        """One token per sequence at its own position; returns logits [batch, vocab]."""
        ids = np.array(tokens, np.int64)[:, None]
        pos = np.array(positions, np.int64)[:, None]
        return self.executor.step(ids, pos)[:, 0]

    def stream(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_tokens: tuple[int, ...] = ()) -> Iterator[list[int | None]]:
        """Yield each sequence's new token per step (None once it has stopped): what servers stream."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
        # The last new token is returned, never fed back: it needs no cache slot.
        self._check_fits(max(len(p) for p in prompts) + max_new_tokens - 1)
        rng = np.random.default_rng(sampling.seed)
        logits = self.prefill(prompts)
        last = [pick(row, sampling, rng) for row in logits]
        counts = [1] * len(prompts)
        done = [t in stop_tokens for t in last]
        yield list(last)
        lengths = [len(p) for p in prompts]
        steps = 0
        while not all(done) and steps + 1 < max_new_tokens:
            positions = [lengths[b] + counts[b] - 1 for b in range(len(prompts))]
            feed = [last[b] if not done[b] else self.pad for b in range(len(prompts))]
            logits = self.decode(feed, positions)
            steps += 1
            new: list[int | None] = [None] * len(prompts)
            for b, row in enumerate(logits):
                if not done[b]:
                    last[b] = new[b] = pick(row, sampling, rng)
                    counts[b] += 1
                    done[b] = last[b] in stop_tokens
            yield new

    def generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_tokens: tuple[int, ...] = ()) -> Generation:
        out: list[list[int]] = [[] for _ in prompts]
        steps = 0
        start = time.perf_counter()
        ttft = decode_start = 0.0
        for new in self.stream(prompts, max_new_tokens, sampling, stop_tokens):
            if steps == 0:
                decode_start = time.perf_counter()
                ttft = decode_start - start
            steps += 1
            for b, token in enumerate(new):
                if token is not None:
                    out[b].append(token)
        return Generation(out, ttft, time.perf_counter() - decode_start, steps)

    def teacher_forced(self, prompt: list[int], forced: list[int]) -> list[np.ndarray]:
        """Logits for the prompt (all positions) and after each forced token: the validator's view."""
        self._check_fits(len(prompt) + len(forced))
        self.executor.start(1)
        steps = [self.executor.step(np.array([prompt]), np.arange(len(prompt))[None])[0]]
        for i, token in enumerate(forced):
            steps.append(self.executor.step(np.array([[token]]), np.array([[len(prompt) + i]]))[0])
        return steps
