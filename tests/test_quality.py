"""What each weight format costs on the trained model, measured on held-out text (compiler/measure/quality.py).

Orderings that must hold on a real model, and bounds stated as multiples of measured figures:
benchmarks/quality_bounds.json (`python benchmarks/quality_bounds.py`, the fixtures' graphs and windows;
2026-12-04): reference perplexity 20.90; deltas int8 -0.035%, fp8 +0.169%, int4-awq(128) +0.472%,
int4-rtn(128) +1.11%; int4-awq(128) greedy agreement 90.6% (116 of 128 tokens).
"""

import functools

import numpy as np
import pytest

from compiler.frontend.corpus import default_eval_text, split_corpus, default_calibration_text
from compiler.measure.quality import measure_quality
from compiler.host.scratch import SpilledArray


@pytest.fixture(scope="module")
def quality(trained, trained_fp16, trained_quantized):
    @functools.cache
    def get(name: str, block_size: int | None = None, **options):
        opts = {**options, **({} if block_size is None else {"block_size": block_size})}
        path = trained_fp16 if name == "fp16" else trained_quantized(name, **opts)
        return measure_quality(trained, path, default_eval_text(), max_windows=16, new_tokens=32, prompts=None)
    return get


def test_eval_text_is_held_out():
    train, heldout = split_corpus()
    assert default_eval_text() in heldout and default_eval_text() not in train
    assert default_calibration_text() in train and default_calibration_text() not in heldout


def test_the_trained_model_has_something_to_lose(quality, trained):
    fp16 = quality("fp16")
    assert fp16.reference_perplexity < trained.spec.vocab_size / 20  # far below uniform (1024)
    assert abs(fp16.ppl_delta) < 0.005 and fp16.kl_mean < 1e-3 and fp16.greedy_agreement >= 0.97
    assert fp16.eval_tokens == 16 * 127 and fp16.agreement_tokens == 4 * 32


def test_awq_beats_rtn_at_the_same_block_size(quality):
    """AWQ's scales (and at block 128 its clip search) beat RTN. At block 32 the clip search, fitted on 32
    weights a ratio, costs this 4-layer model perplexity (measured +0.9% against -0.1% without it) where on
    Gemma 3 270M it is what brings int4-awq inside 10% (+8.0% against +13.5%; benchmarks/NOTES.md): the
    recipe follows the real model, and this checks the scale search alone there."""
    for block, clip in ((128, True), (32, False)):
        awq, rtn = quality("quantize-int4-awq", block, clip=clip), quality("quantize-int4-rtn", block)
        assert awq.compiled_perplexity <= rtn.compiled_perplexity, block
    assert quality("quantize-int4-awq", 128, clip=True).kl_mean <= quality("quantize-int4-rtn", 128).kl_mean
    # Smaller blocks cost fewer perplexity points with RTN.
    assert quality("quantize-int4-rtn", 32).ppl_delta <= quality("quantize-int4-rtn", 128).ppl_delta


def test_8bit_formats_lose_less_than_int4(quality):
    int4 = min(quality("quantize-int4-awq", 128).ppl_delta, quality("quantize-int4-rtn", 128).ppl_delta)
    int4_kl = min(quality("quantize-int4-awq", 128).kl_mean, quality("quantize-int4-rtn", 128).kl_mean)
    for name in ("quantize-int8-wo", "quantize-fp8-wo"):
        q = quality(name)
        assert q.ppl_delta < int4 and q.kl_mean < int4_kl, name


# Twice each measured delta (benchmarks/quality_bounds.json): room for onnxruntime builds on other CPUs,
# which sum in other orders (how far that moves them is not measured here), not for a format that loses
# twice what it did. Agreement: at most 7 more of the 128 tokens than the 12 measured may differ.
MARGIN = 2


def test_stated_bounds(quality):
    assert abs(quality("quantize-int8-wo").ppl_delta) < MARGIN * 0.00035
    assert abs(quality("quantize-fp8-wo").ppl_delta) < MARGIN * 0.0017
    assert 0 < quality("quantize-int4-awq", 128).ppl_delta < MARGIN * 0.0047
    assert 0 < quality("quantize-int4-rtn", 128).ppl_delta < MARGIN * 0.0111
    assert quality("quantize-int4-awq", 128).greedy_agreement > 0.85


def test_size_against_the_floor(trained_fp16, trained_quantized):
    import onnx_ir as ir

    from compiler.measure.sizes import weight_footprint

    fp16 = weight_footprint(ir.load(trained_fp16))
    graph_bytes = trained_fp16.stat().st_size - fp16["floor_bytes"]  # protobuf + node metadata, not weights
    assert 0 < graph_bytes < 0.1 * fp16["floor_bytes"]
    for name, bits in (("quantize-int4-awq", 4), ("quantize-int8-wo", 8)):
        path = trained_quantized(name) if name != "quantize-int4-awq" else trained_quantized(name, block_size=128)
        fp = weight_footprint(ir.load(path))
        assert fp["parameters"] == fp16["parameters"]
        quantized = fp["by_dtype"]["int4" if bits == 4 else "int8"]["elements"]
        # floor = quantized params x bits/8 + FP16 for the rest + FP16 scales
        rest = fp16["parameters"] - quantized
        assert fp["floor_bytes"] >= quantized * bits // 8 + rest * 2
        # ONNX stores the packed int4 / int8 values: the file is its floor plus the same graph overhead
        # as the FP16 file (28 DequantizeLinear nodes and their names add a few KB).
        overhead = path.stat().st_size - fp["floor_bytes"]
        assert abs(overhead - graph_bytes) < 16_000, (overhead, graph_bytes)


def test_window_scores_stream_batches_and_match_float64():
    """score_windows works one batch of windows at a time in float32 (memory: a 128k vocabulary made
    GB-sized float64 arrays); its perplexities and KL match a whole-array float64 computation."""
    from types import SimpleNamespace

    from compiler.measure.quality import HeldOut, score_windows

    rng = np.random.default_rng(0)
    n, w, v = 5, 7, 50  # 5 windows in batches of 2: the last batch is short
    ref_logits = rng.normal(size=(n, w, v)) * 3
    got_logits = ref_logits + rng.normal(size=(n, w, v))
    windows = rng.integers(0, v, size=(n, w))

    def logp(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    class Executor:  # the runner's executor: prefill logits of whichever windows it is given
        def start(self, batch):
            self.batch = batch

        def step(self, ids, positions):
            rows = [next(i for i in range(n) if (windows[i] == r).all()) for r in ids]
            assert len(rows) == self.batch and positions.shape == ids.shape
            return got_logits[rows].astype(np.float16)  # what an FP16 graph hands back

    ref, got = logp(ref_logits)[:, :-1], logp(got_logits.astype(np.float16).astype(np.float64))[:, :-1]
    targets = windows[:, 1:]
    spilled = SpilledArray(n, ref.shape[1:])  # what the build holds: the reference on disk
    for i in range(0, n, 2):
        spilled.append(ref[i:i + 2])
    take = lambda lp: np.take_along_axis(lp, targets[..., None], -1)[..., 0]  # noqa: E731
    ref_ppl, got_ppl = np.exp(-take(ref).mean()), np.exp(-take(got).mean())
    for store in (ref.astype(np.float32), spilled):
        held = HeldOut(windows.tolist(), store, targets, batch=2)
        scores = score_windows(held, SimpleNamespace(executor=Executor()))
        assert scores.reference_perplexity == pytest.approx(ref_ppl, rel=1e-5)
        assert scores.compiled_perplexity == pytest.approx(got_ppl, rel=1e-5)
        assert scores.ppl_delta == pytest.approx(got_ppl / ref_ppl - 1, rel=1e-4, abs=1e-6)
        assert scores.kl_mean == pytest.approx((np.exp(ref) * (ref - got)).sum(-1).mean(), rel=1e-4)
        assert scores.kl_mean > 0.1  # the two distributions differ, so the check compares something


class _Tokenizer:
    """A tokenizer whose ids are the characters' codes, optionally led by a BOS id (like Gemma's, Llama 3's)."""

    def __init__(self, bos):
        self.bos_token_id = bos

    def __call__(self, text):
        lead = [] if self.bos_token_id is None else [self.bos_token_id]
        return type("Encoding", (), {"input_ids": lead + [ord(c) for c in text]})()


def test_windows_start_with_bos_when_the_tokenizer_adds_one():
    from compiler.frontend.calibrate import tokenize_windows

    text = "abcdefghijklmnopqrstuvwxyz"
    with_bos = tokenize_windows(_Tokenizer(bos=1), text, 8, 10)
    assert [w[0] for w in with_bos] == [1, 1, 1]  # every window, not only the first
    assert all(len(w) == 8 for w in with_bos)
    assert [c for w in with_bos for c in w[1:]] == [ord(c) for c in text[:21]]  # the text once, in order
    plain = tokenize_windows(_Tokenizer(bos=None), text, 8, 10)
    assert plain == [[ord(c) for c in text[i:i + 8]] for i in (0, 8, 16)]
    # A BOS id that the tokenizer does not put first (the bundled model's) changes nothing.
    class NoLead(_Tokenizer):
        def __call__(self, text):
            return type("Encoding", (), {"input_ids": [ord(c) for c in text]})()
    assert tokenize_windows(NoLead(bos=1), text, 8, 10) == plain


# --- agreement, prompts and the score's assembly over the scripted executor (milliseconds) ------------

def test_agreement_teacher_forces_every_prompt_in_one_batch():
    """Each step feeds the reference's token (not the graph's own pick): one miss stays one miss."""
    from test_runner_loop import ScriptedExecutor, next_token

    from compiler.measure.quality import _agreement
    from compiler.runtime.runner import Runner

    prompts = [[3, 1, 4, 1], [9, 2]]
    forced = []
    for p in prompts:
        tokens = []
        for _ in range(5):
            tokens.append(next_token(p + tokens))
        forced.append(tokens)
    forced[1][1] = (forced[1][1] + 1) % 13  # the graph disagrees here, and is fed this token after it
    # teacher forcing: step i is predicted from the prompt and forced[:i], whatever the graph picked before
    expected = sum(next_token(p + f[:i]) == f[i] for p, f in zip(prompts, forced) for i in range(5))
    assert _agreement(Runner(ScriptedExecutor()), prompts, forced) == (expected, 10)
    assert 5 <= expected < 10  # the first prompt agrees throughout, the second not at step 2


def test_default_prompts_take_first_lines_spread_through_the_text():
    from compiler.measure.quality import default_prompts

    text = "\n\n".join(f"P{i} one\nP{i} two\nP{i} three" for i in range(6)) + "\n\nlast"
    assert default_prompts(text) == ["P0 one\nP0 two", "P1 one\nP1 two", "P2 one\nP2 two", "P3 one\nP3 two"]
    assert default_prompts(text, count=2) == ["P0 one\nP0 two", "P3 one\nP3 two"]
    assert default_prompts(text, count=7)[-1] == "last\n"  # a one-line paragraph: its line alone
    assert default_prompts("\n\n  \n\nonly\nline", count=3) == ["only\nline"]


def test_score_assembles_windows_and_agreement():
    from test_runner_loop import ScriptedExecutor, reference as scripted

    from compiler.measure.quality import HeldOut, QualityReference, score, score_windows
    from compiler.runtime.runner import Runner

    rng = np.random.default_rng(1)
    windows = rng.integers(0, 13, (3, 6))
    ref = np.log(rng.dirichlet(np.ones(13), (3, 5))).astype(np.float32)
    held = HeldOut(windows.tolist(), ref, windows[:, 1:], batch=2)
    runner = Runner(ScriptedExecutor())
    forced = [scripted([1, 2], 3), [0, 0, 0]]  # the first prompt agrees throughout, the second hardly
    reference = QualityReference(held, [[1, 2], [3]], forced)
    got = score(reference, runner)
    windows_only = score_windows(held, runner)
    assert (got.reference_perplexity, got.compiled_perplexity, got.ppl_delta, got.kl_mean) == (
        windows_only.reference_perplexity, windows_only.compiled_perplexity, windows_only.ppl_delta,
        windows_only.kl_mean)
    from compiler.measure.quality import _agreement

    agree, total = _agreement(runner, reference.prompt_ids, reference.forced)
    assert total == 6 and got.agreement_tokens == 6 and got.greedy_agreement == agree / 6 and 3 <= agree < 6
    assert got.eval_tokens == 15 and 0 < got.seconds < 60
