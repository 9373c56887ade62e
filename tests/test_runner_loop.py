"""The generation loop's bookkeeping (positions, padding, stop tokens, sampling), over a scripted executor.

Why a scripted executor beside tests/test_runner.py's real graphs: its next token is a known
function of every token a sequence holds at slots <= the query's position (the graph's mask), so a
plain Python loop is an independent reference for each step, and a wrong position, a pad token
read as a real one or a missed stop changes the tokens. It runs in milliseconds, which is what lets
mutation testing (benchmarks/mutation_summary.md) run this file for every mutant of compiler/runtime/runner.py.
"""

import time

import numpy as np
import pytest

from compiler.runtime.runner import Generation, Runner, Sampling, pick
from compiler.graph_io import GraphIO

VOCAB = 13
PAD = 0


def next_token(tokens: list[int]) -> int:
    """The scripted model: depends on every token and on how many there are."""
    return (7 * sum(tokens) + 3 * len(tokens) + 1) % VOCAB


class ScriptedExecutor:
    """A linear KV cache of tokens: step writes each token at its position's slot, then each query
    'attends' to the slots <= its position (what the compiled graph's mask does)."""

    name = "scripted"

    def __init__(self, capacity: int | None = 32, delay: float = 0.0):
        self.io = GraphIO(num_layers=1, num_kv_heads=1, head_dim=1, vocab_size=VOCAB, capacity=capacity)
        self.steps: list[tuple[np.ndarray, np.ndarray]] = []
        self.delay = delay  # seconds per step: a model that takes time, for the timing fields

    def start(self, batch: int) -> None:
        self.cache = np.full((batch, self.io.capacity), -1, np.int64)  # -1: never written

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        assert input_ids.shape == position_ids.shape and input_ids.dtype == position_ids.dtype == np.int64
        self.steps.append((input_ids.copy(), position_ids.copy()))
        batch, width = input_ids.shape
        assert batch == self.cache.shape[0], "batch differs from the one the cache was started for"
        time.sleep(self.delay)
        self.cache[np.arange(batch)[:, None], position_ids] = input_ids
        logits = np.zeros((batch, width, VOCAB), np.float32)
        for b in range(batch):
            for t in range(width):
                seen = self.cache[b, : position_ids[b, t] + 1]
                assert (seen >= 0).all(), f"sequence {b} attends to a slot never written"
                logits[b, t, next_token(seen.tolist())] = 1.0
        return logits


def reference(prompt: list[int], new: int, stop: tuple[int, ...] = ()) -> list[int]:
    tokens, out = list(prompt), []
    while len(out) < new:
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if out[-1] in stop:
            break
    return out


PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5]]  # right-padded to 5 for prefill


def test_greedy_batch_of_unequal_prompts_equals_the_reference():
    ex = ScriptedExecutor()
    got = Runner(ex, pad_token_id=PAD).generate(PROMPTS, 6)
    assert got.tokens == [reference(p, 6) for p in PROMPTS]
    assert got.steps == 6 and got.new_tokens == 18
    prefill_ids, prefill_pos = ex.steps[0]
    assert prefill_ids.tolist() == [[3, 1, 4, 1, 5], [9, 2, PAD, PAD, PAD], [6, 5, 3, 5, PAD]]
    assert prefill_pos.tolist() == [list(range(5))] * 3
    # decode: each sequence one token at its own next position
    assert [pos[:, 0].tolist() for _, pos in ex.steps[1:]] == [[5 + i, 2 + i, 4 + i] for i in range(5)]
    assert len(ex.steps) == 6  # the last new token is returned, never fed back


def test_a_stop_token_as_the_first_new_token_ends_that_sequence():
    """The first token comes from prefill, not from the decode loop: a stop there ends the sequence too."""
    first = [reference(p, 1)[0] for p in PROMPTS]
    stop = first[1]
    assert stop not in (first[0], first[2])  # only the second sequence stops at once
    ex = ScriptedExecutor()
    got = Runner(ex, pad_token_id=PAD).generate(PROMPTS, 6, stop_tokens=(stop,))
    assert got.tokens[1] == [stop]
    assert got.tokens == [reference(p, 6, (stop,)) for p in PROMPTS]
    assert all(ids[1, 0] == PAD for ids, _ in ex.steps[1:])  # a stopped sequence is fed the pad token


def test_every_sequence_stopping_at_the_first_token_runs_no_decode_step():
    first = [reference(p, 1)[0] for p in PROMPTS]
    ex = ScriptedExecutor()
    got = Runner(ex).generate(PROMPTS, 6, stop_tokens=tuple(first))
    assert got.tokens == [[t] for t in first] and got.steps == 1
    assert len(ex.steps) == 1


def test_stream_marks_stopped_sequences_with_none():
    stop = reference(PROMPTS[0], 3)[2]  # the first sequence stops at its third token
    full = [reference(p, 5, (stop,)) for p in PROMPTS]
    steps = list(Runner(ScriptedExecutor()).stream(PROMPTS, 5, stop_tokens=(stop,)))
    assert len(steps) == max(len(t) for t in full)
    for b, tokens in enumerate(full):
        column = [s[b] for s in steps]
        assert column == tokens + [None] * (len(steps) - len(tokens))


def test_pad_token_none_means_zero():
    assert Runner(ScriptedExecutor()).pad == 0
    assert Runner(ScriptedExecutor(), pad_token_id=None).pad == 0
    assert Runner(ScriptedExecutor(), pad_token_id=5).pad == 5


def test_capacity_is_checked_for_the_positions_actually_written():
    ex = ScriptedExecutor(capacity=8)
    assert Runner(ex).generate([[1, 2, 3]], 6).tokens == [reference([1, 2, 3], 6)]  # slots 0..7
    with pytest.raises(ValueError, match="9 positions needed but the cache holds 8"):
        Runner(ex).generate([[1, 2, 3, 4]], 6)
    with pytest.raises(ValueError, match="^empty prompt$"):
        Runner(ex).generate([[1], []], 2)
    with pytest.raises(ValueError, match=r"^max_new_tokens must be >= 1 \(got 0\)$"):
        Runner(ex).generate([[1]], 0)
    assert Runner(ex).generate([[1], [2, 3]], 1).tokens == [reference([1], 1), reference([2, 3], 1)]
    with pytest.raises(ValueError, match="^graph has a Concat-grown cache: rebuild with a recipe that runs kv-cache-scatter$"):
        Runner(ScriptedExecutor(capacity=None)).generate([[1]], 2)
    with pytest.raises(ValueError, match="9 positions needed"):
        Runner(ex).teacher_forced([1, 2, 3, 4], [5, 6, 7, 8, 9])


def test_teacher_forced_feeds_the_forced_tokens_at_their_positions():
    prompt, forced = [2, 7, 1], [4, 4, 9]
    ex = ScriptedExecutor(capacity=6)
    steps = Runner(ex).teacher_forced(prompt, forced)
    assert len(steps) == 4 and steps[0].shape == (3, VOCAB) and all(s.shape == (1, VOCAB) for s in steps[1:])
    assert [int(s[-1].argmax()) for s in steps] == [next_token(prompt + forced[:i]) for i in range(4)]
    assert [pos.tolist() for _, pos in ex.steps] == [[[0, 1, 2]], [[3]], [[4]], [[5]]]


def test_pick_greedy_top_k_and_temperature():
    logits = np.array([0.0, 2.0, 1.0, 3.0, -1.0], np.float32)
    rng = np.random.default_rng(0)
    assert pick(logits, Sampling(), rng) == 3
    assert pick(logits, Sampling(temperature=-1.0), rng) == 3  # temperature <= 0 is greedy
    draws = [pick(logits, Sampling(temperature=1.0, top_k=2), rng) for _ in range(400)]
    assert set(draws) == {1, 3}  # only the two largest
    share = draws.count(3) / len(draws)  # softmax of (3, 2): 0.731
    assert abs(share - 1 / (1 + np.exp(-1.0))) < 0.07
    hot = [pick(logits, Sampling(temperature=100.0, top_k=0), rng) for _ in range(500)]
    assert set(hot) == set(range(5))  # top_k 0: no truncation; a high temperature flattens
    cold = [pick(logits, Sampling(temperature=0.05, top_k=5), rng) for _ in range(50)]
    assert set(cold) == {3}  # top_k = vocab keeps everything; a low temperature sharpens to the max
    hot_top1 = [pick(logits, Sampling(temperature=100.0, top_k=1), rng) for _ in range(50)]
    assert set(hot_top1) == {3}  # top-1 is greedy at any temperature
    large = np.array([1000.0, 999.0, -5.0], np.float32)  # softmax is shifted by the max: no overflow
    draws = [pick(large, Sampling(temperature=1.0), rng) for _ in range(200)]
    assert set(draws) == {0, 1} and draws.count(0) > draws.count(1)


def test_sampling_is_seeded():
    def run(seed):
        return Runner(ScriptedExecutor()).generate(PROMPTS, 5, Sampling(temperature=1.0, seed=seed)).tokens

    assert run(1) == run(1) and run(1) != run(2)


def test_time_to_first_token_is_prefill_and_decode_time_the_rest():
    delay = 0.05  # per executor step: prefill, then 4 decode steps for 5 tokens
    got = Runner(ScriptedExecutor(delay=delay)).generate([[1, 2]], 5)
    assert got.steps == 5
    assert delay <= got.time_to_first_token_s < 4 * delay + 1  # one step, with slack for a loaded machine
    assert 4 * delay <= got.decode_s < 4 * delay + 2
    assert got.decode_tokens_per_s == pytest.approx(4 / got.decode_s)


def test_decode_rate_counts_tokens_after_the_first():
    g = Generation(tokens=[[1, 2, 3], [4]], time_to_first_token_s=0.1, decode_s=0.5, steps=3)
    assert g.new_tokens == 4 and g.decode_tokens_per_s == pytest.approx(2 / 0.5)
    assert np.isnan(Generation([[1]], 0.1, 0.0, 1).decode_tokens_per_s)
