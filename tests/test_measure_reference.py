"""The PyTorch side of validation and quality (compiler/measure/validate.py, quality.py) on the shipped
trained model, in-process: no export, seconds per run.

Each reference is checked against an independent computation: the model run over the whole
sequence without a cache (reference_decode uses Hugging Face's cache; reference_greedy a padded
batch) and float64 numpy log-softmax (the held-out log-probabilities). `validate` and
`measure_quality` run end to end with the compiled graph's executor replaced by `FullForward`, the
same or a perturbed PyTorch model re-run over every sequence's whole prefix: what is checked is
their wiring (what each step is given and what comes back), the ONNX side has its own tests
(tests/test_validate.py, tests/test_quality.py, on exported graphs; minutes). Fast enough for
mutation testing (benchmarks/mutation_summary.md) to run for every mutant of those functions.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from compiler.errors import BadInputError
from compiler.frontend.calibrate import tokenize_windows
from compiler.frontend.corpus import default_eval_text
from compiler.graph_io import GraphIO
from compiler.recipe import Tolerance

# Measured on the trained model (benchmarks/reference_bounds.py, benchmarks/NOTES.md, 2026-12-04): max
# |cached - uncached logits| 4.8e-6 (the first test's prompt), max |held-out log-probability - float64|
# 2.1e-6. Bounds about 4x those (float32 summation order differs between machines' kernels).
CACHE_ATOL = 2e-5
LOGP_ATOL = 8e-6


def _full_logits(model, ids: list[int]) -> np.ndarray:
    """[len(ids), vocab] float64: one forward over the whole sequence, no cache."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].double().numpy()


def _greedy(model, prompt: list[int], new: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(new):
        tokens.append(int(_full_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def _log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits - logits.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class FullForward:
    """An executor over a PyTorch model: each step writes its tokens at their positions' slots and
    returns, per query, the logits of a full forward over the slots <= its position (what the compiled
    graph's cache and mask compute). Records how it was opened (`options`)."""

    name = "full-forward"

    def __init__(self, model, capacity: int | None, vocab: int, **options):
        self.model, self.options = model, options
        self.io = GraphIO(num_layers=1, num_kv_heads=1, head_dim=1, vocab_size=vocab, capacity=capacity)

    def start(self, batch: int) -> None:
        self.slots = np.full((batch, self.io.capacity or 512), -1, np.int64)
        self.sessions = getattr(self, "sessions", []) + [-1]  # per start: the largest position fed

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        batch, width = input_ids.shape
        self.slots[np.arange(batch)[:, None], position_ids] = input_ids
        self.sessions[-1] = max(self.sessions[-1], int(position_ids.max()))
        out = np.zeros((batch, width, self.io.vocab_size), np.float32)
        for b in range(batch):
            seen = self.slots[b, : position_ids[b].max() + 1]
            assert (seen >= 0).all(), "a query attends to a slot never written"
            out[b] = _full_logits(self.model, seen.tolist())[position_ids[b]]
        return out


@pytest.fixture(scope="module")
def perturbed(trained):
    """The trained model with its lm_head moved by 10% noise: a 'compiled graph' that costs something."""
    model = copy.deepcopy(trained.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = model.lm_head.weight
        w.add_(0.1 * w.std() * torch.randn(w.shape, generator=gen))
    return model


# --- validate.py ------------------------------------------------------------------------------------

def test_reference_decode_equals_uncached_forwards_and_their_argmax(trained):
    from compiler.measure.validate import reference_decode

    prompt = [261, 277, 82, 507, 9]
    logits, tokens = reference_decode(trained, prompt, 4)
    assert len(logits) == len(tokens) == 5
    assert logits[0].shape == (5, 1024) and all(step.shape == (1, 1024) for step in logits[1:])
    expected = _greedy(trained.model, prompt, 5)
    assert tokens == expected
    np.testing.assert_allclose(logits[0], _full_logits(trained.model, prompt), atol=CACHE_ATOL, rtol=0)
    for i in range(1, 5):
        full = _full_logits(trained.model, prompt + expected[:i])
        np.testing.assert_allclose(logits[i][0], full[-1], atol=CACHE_ATOL, rtol=0)


def test_reference_greedy_decodes_each_padded_row_as_its_own_prompt(trained):
    from compiler.measure.validate import reference_greedy

    # Short prompts too: a position off by one within a row (two tokens at position 0) flips some of their
    # greedy tokens. A shift of a whole row changes nothing (RoPE sees only position differences):
    # benchmarks/mutation_summary.md lists those mutants as equivalent.
    short = np.random.default_rng(0)
    prompts = [[261, 277, 82], [5, 9, 40, 77, 300, 12, 8, 19, 44], [101], [17, 18, 19, 20, 21, 22]] + [
        short.integers(4, 1024, size=n).tolist() for n in (2, 3, 2, 4, 2, 5)]
    got = reference_greedy(trained, prompts, 8)
    assert got == [_greedy(trained.model, p, 8) for p in prompts]


def test_decode_reference_tokenizes_the_prompt_and_checks_it_fits(trained):
    from compiler.measure.validate import DEFAULT_PROMPT, decode_reference

    ids = trained.tokenizer(DEFAULT_PROMPT).input_ids
    ref = decode_reference(trained)  # the defaults: the shipped prompt, 16 decode steps
    assert (ref.prompt, ref.prompt_ids, ref.decode_steps) == (DEFAULT_PROMPT, ids, 16)
    assert ref.tokens == _greedy(trained.model, ids, 17) and len(ref.logits) == 17
    short = decode_reference(trained, "to be", decode_steps=2, max_positions=len(trained.tokenizer("to be").input_ids) + 2)
    assert short.decode_steps == 2 and len(short.tokens) == 3  # exactly filling the graph is allowed
    n = len(trained.tokenizer("to be").input_ids)
    with pytest.raises(BadInputError) as info:
        decode_reference(trained, "to be", decode_steps=2, max_positions=n + 1)
    assert str(info.value) == (f"validation needs {n} prompt + 2 decode positions but the graph covers {n + 1} "
                               "(--max-seq); shorten --prompt or raise --max-seq")
    with pytest.raises(BadInputError, match="^the validation prompt tokenizes to nothing; pass a non-empty --prompt$"):
        decode_reference(trained, "")


def test_validate_runs_the_graph_teacher_forced_on_the_reference(trained, perturbed, monkeypatch):
    import compiler.runtime.onnx_executor as onnx_executor
    from compiler.measure.validate import validate

    opened = []

    def executor(path, **options):
        opened.append((path, options))
        return FullForward(perturbed, 64, 1024, **options)

    monkeypatch.setattr(onnx_executor, "OnnxRuntimeExecutor", executor)
    tol = Tolerance(max_abs_logit_error=100.0, mean_abs_logit_error=100.0, min_greedy_agreement=0.0)
    result = validate(trained, "graph.onnx", tol, prompt="to be or not", decode_steps=3)
    assert opened == [("graph.onnx", {"arena": False})]  # the session frees its memory between runs
    ids = trained.tokenizer("to be or not").input_ids
    tokens = _greedy(trained.model, ids, 4)
    assert (result.prompt, result.prompt_tokens, result.decode_steps, result.reference_tokens) == (
        "to be or not", len(ids), 3, tokens)
    # The compiled side, independently: the perturbed model over the reference's tokens.
    got = _full_logits(perturbed, ids + tokens[:3])
    want = _full_logits(trained.model, ids + tokens[:3])
    assert result.compiled_tokens == [int(row.argmax()) for row in got[len(ids) - 1:]]
    assert result.max_abs_error == pytest.approx(np.abs(got - want).max(), abs=CACHE_ATOL)
    assert result.mean_abs_error == pytest.approx(np.abs(got - want).mean(), abs=CACHE_ATOL)
    assert result.greedy_agreement == np.mean(np.array(result.compiled_tokens) == tokens)
    assert result.tolerance == tol and result.passed and result.max_abs_error > 0.1


# --- quality.py -------------------------------------------------------------------------------------

def test_held_out_log_probabilities_equal_a_float64_log_softmax_window_by_window(trained):
    from compiler.measure.quality import held_out

    text = default_eval_text()
    held = held_out(trained, text, 16, max_windows=5, batch=2)  # 5 windows, batches of 2: a short last one
    windows = tokenize_windows(trained.tokenizer, text, 16, 5)
    assert held.windows == windows and held.batch == 2
    np.testing.assert_array_equal(held.targets, np.array(windows)[:, 1:])
    logp = held.reference_logp[0:5]
    assert logp.shape == (5, 15, 1024) and logp.dtype == np.float32
    expected = np.stack([_log_softmax64(_full_logits(trained.model, w))[:-1] for w in windows])
    np.testing.assert_allclose(logp, expected, atol=LOGP_ATOL, rtol=0)
    nll = -np.take_along_axis(expected, held.targets[..., None], -1).mean()
    assert held.reference_nll == pytest.approx(nll, rel=1e-6)


def test_quality_reference_cuts_windows_and_prompts_to_the_graph(trained):
    from compiler.measure.quality import default_prompts, held_out, quality_reference

    text = default_eval_text()
    prompts = ["to be or not to be, that is the question", "", "a"]
    ref = quality_reference(trained, text, 16, window=128, max_windows=2, batch=2, new_tokens=6, prompts=prompts)
    assert ref.window_cut is True and [len(w) for w in ref.held.windows] == [16, 16] and ref.held.batch == 2
    ids = [trained.tokenizer(p).input_ids[:10] for p in prompts]  # capacity 16 - 6 new tokens
    ids[1] = [trained.tokenizer.bos_token_id]  # an empty prompt becomes BOS
    assert len(trained.tokenizer(prompts[0]).input_ids) > 10 and ref.prompt_ids == ids
    assert ref.forced == [_greedy(trained.model, p, 6) for p in ids]
    # A graph shorter than the new tokens still gets one prompt token; a window that fits is not cut.
    tight = quality_reference(trained, text, 5, window=4, max_windows=1, new_tokens=6, prompts=prompts[:1])
    assert tight.prompt_ids == [trained.tokenizer(prompts[0]).input_ids[:1]] and tight.window_cut is False
    assert [len(w) for w in tight.held.windows] == [4] and len(tight.forced[0]) == 6
    # Default prompts: the evaluation text's; a given held-out reference is reused as it is.
    held = held_out(trained, text, 8, max_windows=1)
    reused = quality_reference(trained, text, 64, window=8, new_tokens=2, held=held)
    assert reused.held is held
    assert reused.prompt_ids == [trained.tokenizer(p).input_ids[:62] for p in default_prompts(text)]
    # A tokenizer without BOS: an empty prompt becomes token 0.
    no_bos = dataclasses.replace(trained, tokenizer=_NoBos(trained.tokenizer))
    assert quality_reference(no_bos, text, 64, window=8, new_tokens=2, prompts=[""], held=held).prompt_ids == [[0]]


class _NoBos:
    def __init__(self, tokenizer):
        self.tokenizer, self.bos_token_id, self.pad_token_id = tokenizer, None, tokenizer.pad_token_id

    def __call__(self, text):
        return self.tokenizer(text)


def test_quality_reference_defaults_are_the_builds(trained):
    """16 windows of 128 tokens (scored 4 at a time), 4 prompts x 64 greedy tokens: what report.json and the
    README state the quality stage measures."""
    from compiler.measure.quality import default_prompts, held_out, quality_reference

    text = default_eval_text()
    ref = quality_reference(trained, text, 1024)
    assert [len(w) for w in ref.held.windows] == [128] * 16 and ref.held.batch == 4 and not ref.window_cut
    assert ref.prompt_ids == [trained.tokenizer(p).input_ids for p in default_prompts(text)]
    assert [len(f) for f in ref.forced] == [64] * 4
    # The sensitivity stage calls held_out with the window alone: its defaults are the quality stage's.
    held = held_out(trained, text, 128)
    assert len(held.windows) == 16 and held.batch == 4
    np.testing.assert_array_equal(held.windows, ref.held.windows)


def test_measure_quality_scores_the_graph_against_float64_figures(trained, perturbed, monkeypatch):
    import compiler.measure.quality as quality

    opened = []

    def executor(path, **options):
        opened.append((path, options))
        return FullForward(perturbed, 24, 1024, **options)

    monkeypatch.setattr(quality, "OnnxRuntimeExecutor", executor)
    text = default_eval_text()
    result = quality.measure_quality(trained, "graph.onnx", text, max_windows=3, new_tokens=4,
                                     prompts=["to be", "the king"])
    assert opened == [("graph.onnx", {"arena": False})]
    # The graph's 24 positions (its io.capacity) cut the 128-token window.
    assert (result.window, result.windows, result.window_cut_to_max_seq, result.eval_tokens) == (24, 3, True, 69)
    windows = np.array(tokenize_windows(trained.tokenizer, text, 24, 3))
    targets = windows[:, 1:, None]
    ref = np.stack([_log_softmax64(_full_logits(trained.model, w.tolist()))[:-1] for w in windows])
    got = np.stack([_log_softmax64(_full_logits(perturbed, w.tolist()))[:-1] for w in windows])
    ref_ppl = np.exp(-np.take_along_axis(ref, targets, -1).mean())
    got_ppl = np.exp(-np.take_along_axis(got, targets, -1).mean())
    assert result.reference_perplexity == pytest.approx(ref_ppl, rel=1e-5)
    assert result.compiled_perplexity == pytest.approx(got_ppl, rel=1e-5)
    assert result.ppl_delta == pytest.approx(got_ppl / ref_ppl - 1, rel=1e-3) and result.ppl_delta > 0.01
    assert result.kl_mean == pytest.approx((np.exp(ref) * (ref - got)).sum(-1).mean(), rel=1e-3)
    agree = 0
    for prompt in ("to be", "the king"):
        ids = trained.tokenizer(prompt).input_ids
        forced = _greedy(trained.model, ids, 4)
        picks = [int(_full_logits(perturbed, ids + forced[:i])[-1].argmax()) for i in range(4)]
        agree += sum(p == f for p, f in zip(picks, forced))
    assert (result.agreement_tokens, result.greedy_agreement) == (8, agree / 8)
    assert 0 < result.seconds < 120
    # An explicit capacity wins over the graph's.
    assert quality.measure_quality(trained, "graph.onnx", text, capacity=12, max_windows=1, new_tokens=2).window == 12


def test_measure_quality_without_a_known_capacity_keeps_to_the_window(trained, monkeypatch):
    """A graph whose capacity is unknown (io.capacity None: a Concat-grown cache) gets the window as its
    capacity: no position past it is fed, windows or prompts (cut to window - new tokens). Its seconds
    count the reference side too."""
    import time

    import compiler.measure.quality as quality

    graphs = []

    def executor(path, **options):
        graphs.append(FullForward(trained.model, None, 1024, **options))
        return graphs[-1]

    reference_side = quality.quality_reference

    def slow_reference(*args, **kwargs):
        time.sleep(0.5)
        return reference_side(*args, **kwargs)

    monkeypatch.setattr(quality, "OnnxRuntimeExecutor", executor)
    monkeypatch.setattr(quality, "quality_reference", slow_reference)
    text = default_eval_text()
    long_prompt = text[:2000]
    assert len(trained.tokenizer(long_prompt).input_ids) > 128
    result = quality.measure_quality(trained, "graph.onnx", text, max_windows=1, new_tokens=3, prompts=[long_prompt],
                                     window=16)
    assert result.window == 16 and not result.window_cut_to_max_seq and result.seconds >= 0.5
    assert graphs[0].sessions == [15, 14]  # windows: positions 0..15; prompt 13 tokens + 2 forced: 0..14
    result = quality.measure_quality(trained, "graph.onnx", text, max_windows=1, new_tokens=3, prompts=[long_prompt])
    assert result.window == 128 and graphs[1].sessions == [127, 126]  # the default window, 128
    assert result.greedy_agreement == 1.0 and abs(result.ppl_delta) < 1e-5  # the same model on both sides


def test_window_sums_accumulate_in_float64():
    """score_windows' NLL and KL sums run in float64 over the float32 log-probabilities: at 16 windows x
    127 positions x a 128k vocabulary a float32 sum loses ~1e-7 relative per window, summed. Here,
    against the same float32 terms summed in float64 (a float32 accumulation misses by ~1e-8 relative)."""
    from types import SimpleNamespace

    from compiler.measure.quality import HeldOut, score_windows

    rng = np.random.default_rng(3)
    n, w, v = 3, 65, 4096
    ref32 = torch.log_softmax(torch.from_numpy(rng.normal(size=(n, w - 1, v)).astype(np.float32) * 2), dim=-1)
    got_logits = (ref32.numpy() + 0.5 * rng.normal(size=ref32.shape)).astype(np.float32)
    windows = rng.integers(0, v, size=(n, w))

    class Executor:  # the windows' logits in order, a batch of 2 at a time
        rows = iter(range(0, n, 2))

        def start(self, batch):
            pass

        def step(self, ids, positions):
            i = next(self.rows)
            pad = np.zeros((len(ids), 1, v), np.float32)  # the last position's logits are not scored
            return np.concatenate([got_logits[i:i + len(ids)], pad], axis=1)

    held = HeldOut(windows.tolist(), ref32.numpy(), windows[:, 1:], batch=2)
    scores = score_windows(held, SimpleNamespace(executor=Executor()))
    got32 = torch.log_softmax(torch.from_numpy(got_logits), dim=-1)  # the float32 terms score_windows sums
    targets = torch.from_numpy(windows[:, 1:])[..., None]
    nll = -got32.gather(-1, targets).double().sum().item() / targets.numel()
    kl = (ref32.exp() * (ref32 - got32)).double().sum().item() / targets.numel()
    assert np.log(scores.compiled_perplexity) == pytest.approx(nll, rel=1e-12)
    assert scores.kl_mean == pytest.approx(kl, rel=1e-12)
