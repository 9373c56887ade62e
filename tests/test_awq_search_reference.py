"""AWQ's two searches against a float64 numpy brute force written from the paper's definitions
(Lin et al. 2023, section 3.2): the alpha whose scales minimise ||X W - (X / s) Q(diag(s) W)||^2, and
per (block, output channel) the clip ratio minimising that block's output error. The pass's tests
check that AWQ beats RTN end to end; these check that the searches choose what they say they choose,
so a search that picks the wrong grid point (or scores the wrong thing) fails here, not only as a
worse perplexity somewhere else."""

import numpy as np
import pytest
import torch

from helpers import norm_matmul_graph
from passes import quantize_int4_awq as awq


@pytest.fixture(autouse=True)
def fresh_search_memo():
    awq._MEMO.clear()
    yield
    awq._MEMO.clear()


def _fake_quant64(w, block, clip=None):
    k, n = w.shape
    blocks = w.reshape(k // block, block, n)
    scale = np.abs(blocks).max(axis=1, keepdims=True) / 7
    if clip is not None:
        scale = scale * clip[:, None, :]
    scale = np.where(scale == 0, 1.0, scale)
    return (np.clip(np.round(blocks / scale), -8, 7) * scale).reshape(k, n)


def _problem(seed, t=96, k=128, n=48):
    """Activations with a few outlier channels (what AWQ is for) and a weight with one all-zero block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g)
    x[:, torch.randperm(k, generator=g)[:6]] *= 25
    w = torch.randn(k, n, generator=g) * 0.02
    w[32:64, 5] = 0
    return x, w


def test_fake_quant_is_symmetric_int4_rtn():
    x, w = _problem(0)
    clip = torch.rand(w.shape[0] // 32, w.shape[1], generator=torch.Generator().manual_seed(1)) * 0.35 + 0.65
    for c in (None, clip):
        got = awq._fake_quant(w, 32, c).numpy()
        want = _fake_quant64(w.numpy().astype(np.float64), 32, None if c is None else c.numpy().astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    levels = np.unique(np.round(awq._fake_quant(w, 32).numpy()[:32, 0] / (np.abs(w.numpy()[:32, 0]).max() / 7)))
    assert levels.min() >= -8 and levels.max() <= 7 and len(levels) > 8  # a real 4-bit grid, not a copy of w
    assert not awq._fake_quant(w, 32)[32:64, 5].any()  # an all-zero block stays zero (scale 1, not 0/0)


def test_search_clip_picks_each_blocks_best_ratio():
    x, w = _problem(2)
    got = awq.search_clip(x, w, 32).numpy()
    x64, w64 = x.numpy().astype(np.float64), w.numpy().astype(np.float64)
    nb, n = w.shape[0] // 32, w.shape[1]
    want = np.ones((nb, n))
    for b in range(nb):
        rows = slice(b * 32, (b + 1) * 32)
        errors = []
        for ratio in awq.CLIP_GRID:
            dq = _fake_quant64(w64[rows], 32, np.full((1, n), ratio))
            errors.append(((x64[:, rows] @ (dq - w64[rows])) ** 2).sum(axis=0))
        errors = np.array(errors)  # [ratios, n]
        best = errors.min(axis=0)
        # float32 vs float64 may swap near-ties: accept any ratio within 1e-4 of the best error
        chosen = np.abs(np.array(awq.CLIP_GRID)[:, None] - got[b][None, :]).argmin(axis=0)
        np.testing.assert_allclose(np.array(awq.CLIP_GRID)[chosen], got[b], atol=1e-6)  # a grid point
        assert (errors[chosen, np.arange(n)] <= best * (1 + 1e-4) + 1e-12).all(), b
        want[b] = np.array(awq.CLIP_GRID)[errors.argmin(axis=0)]
    assert (got < 1).any() and (got == 1).any()  # the brute force clips some blocks and not others
    assert np.mean(np.isclose(got, want, atol=1e-6)) > 0.95


@pytest.mark.parametrize("duo", [False, True])
def test_search_scales_picks_the_alpha_with_the_least_output_error(duo):
    """duo: AutoAWQ's duo scaling, s = mean|x|^a / mean_block_normalised|w|^(1-a); a = 0 stays RTN (s = 1)."""
    x, w = _problem(3)
    s, alpha, loss0, loss = awq.search_scales(x, w, 32, duo=duo)
    x64, w64 = x.numpy().astype(np.float64), w.numpy().astype(np.float64)
    mean_abs = np.maximum(np.abs(x64).mean(axis=0), 1e-8)
    ref = x64 @ w64
    blocks = np.abs(w64).reshape(-1, 32, w64.shape[1])
    w_mean = (blocks / (blocks.max(axis=1, keepdims=True) + 1e-6)).reshape(w64.shape).mean(axis=1)

    def scales(a):
        v = mean_abs ** a / (w_mean ** (1 - a) + 1e-4) if duo and a > 0 else mean_abs ** a
        return np.maximum(v / np.sqrt(v.max() * v.min()), 1e-4)

    def error(a):
        v = scales(a)
        return (((x64 / v) @ _fake_quant64(w64 * v[:, None], 32) - ref) ** 2).sum() / ref.size

    errors = {a: error(a) for a in awq.ALPHA_GRID}
    assert 0.0 < alpha < 1.0  # an interior optimum: the grid's ends would not test the comparison
    assert errors[alpha] <= min(errors.values()) * (1 + 1e-4)
    assert loss == pytest.approx(errors[alpha], rel=1e-3) and loss0 == pytest.approx(errors[0.0], rel=1e-3)
    assert loss < loss0 * 0.9  # outlier channels: scaling helps, as the paper says it should
    np.testing.assert_allclose(s.numpy(), scales(alpha), rtol=1e-5)


def test_search_clip_scales_a_block_whose_range_is_exactly_seven():
    """A block whose max |w| is 7 has base scale exactly 1: it is clipped like any other block, and a
    block of zeros keeps ratio 1 (ties keep the larger ratio: the range is only shrunk when that helps)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(64, 32, generator=g)
    w = torch.randn(32, 8, generator=g) * 1.5
    w[:, 0] = w[:, 0] / w[:, 0].abs().max() * 7  # base scale max|w| / 7 == 1 exactly
    w[:, 1] = 0
    got = awq.search_clip(x, w, 32).numpy()[0]
    x64, w64 = x.numpy().astype(np.float64), w.numpy().astype(np.float64)
    errors = [((x64 @ (_fake_quant64(w64, 32, np.full((1, 8), r)) - w64)) ** 2).sum(axis=0) for r in awq.CLIP_GRID]
    best = np.array(awq.CLIP_GRID)[np.argmin(errors, axis=0)]
    assert best[0] < 1 and got[0] == pytest.approx(best[0])
    assert got[1] == 1.0


def test_memo_returns_a_stored_result_and_evicts_the_least_recently_used(monkeypatch):
    """Equal (function, block, activations, weight) contents return the stored result without a call;
    the memo holds _MEMO_ENTRIES results and drops the least recently used one first."""
    monkeypatch.setattr(awq, "_MEMO_ENTRIES", 2)
    calls = []

    def fn(x, w, block):
        calls.append(block)
        return (float(x.sum()), float(w.sum()), block)

    x, w = torch.ones(4, 8), torch.ones(8, 2)
    first = awq._memoized(fn, x, w, 32)
    assert awq._memoized(fn, x.clone(), w.clone(), 32) is first and calls == [32]  # by content
    awq._memoized(fn, x, w * 2, 32)  # a different weight: a new call
    awq._memoized(fn, x, w, 64)  # a different block: a new call; 3 entries > 2, the oldest (x, w, 32) goes ...
    assert calls == [32, 32, 64]
    awq._memoized(fn, x, w * 2, 32)  # ... while the later two stay; this one is now the most recently used
    assert calls == [32, 32, 64]
    assert awq._memoized(fn, x, w, 32) == first and calls == [32, 32, 64, 32]  # evicted: recomputed
    awq._memoized(fn, x, w * 2, 32)  # held: the least recently used, (x, w, 64), went for (x, w, 32)
    assert calls == [32, 32, 64, 32]
    awq._memoized(fn, x, w, 64)
    assert calls == [32, 32, 64, 32, 64]


def test_options_are_checked_and_kept():
    from passes.quant_coverage import DEFAULT_MIN_COVERAGE
    from passes.weight_quant import DEFAULT_TARGETS

    p = awq.QuantizeInt4AwqPass({})
    assert (p.block, p.clip, p.targets, p.exclude, p.include_lm_head) == (128, True, DEFAULT_TARGETS, (), False)
    assert p.min_coverage == DEFAULT_MIN_COVERAGE and p.fallbacks == [] and p.search_log == {}
    p = awq.QuantizeInt4AwqPass({"a": 1}, block_size=64, clip=False, include_lm_head=True, min_coverage=0.5,
                                targets=["model.layers.1.*"], exclude=["*.o_proj"])
    assert p.block == 64 and p.clip is False and p.activations == {"a": 1}
    assert (p.include_lm_head, p.min_coverage, p.targets, p.exclude) == (True, 0.5, ("model.layers.1.*",), ("*.o_proj",))
    with pytest.raises(ValueError, match=r"clip must be true or false \(got 'auto'\)"):
        awq.QuantizeInt4AwqPass({}, clip="auto")
    with pytest.raises(ValueError, match="block_size must be one of"):
        awq.QuantizeInt4AwqPass({}, block_size=48)


def test_quantize_clips_the_scaled_input_of_a_searched_target():
    """A target with calibration input x and folded scales s: the clip search sees x / s (the input the
    quantized weight will meet); without s it sees x; without clipping (or without an input) it is RTN."""
    from types import SimpleNamespace

    from passes.quantize_int4_rtn import quantize_blockwise

    x, w32 = _problem(5, t=64, k=128, n=32)
    w = w32.numpy().astype(np.float16)
    s = torch.linspace(0.5, 2.0, 128)
    p = awq.QuantizeInt4AwqPass({"src": x.numpy()}, block_size=64, clip=True)
    p._inputs = {"scaled": ("src", s), "plain": ("src", None)}
    scales = []
    for name, x_seen in (("scaled", x / s), ("plain", x)):
        qw = p.quantize(w, SimpleNamespace(name=name, block=64))
        q, scale = quantize_blockwise(w, 64, awq.search_clip(x_seen, torch.from_numpy(w.astype(np.float32)), 64).numpy())
        assert (qw.block_size, qw.axis) == (64, 0) and np.array_equal(qw.q, q) and np.array_equal(qw.scale, scale), name
        scales.append(scale)
    assert not np.array_equal(*scales)  # x / s and x lead to different clips, so the two cases say something
    rtn_q, rtn_scale = quantize_blockwise(w, 64)
    for name, pass_ in (("unseen", p), ("scaled", awq.QuantizeInt4AwqPass({"src": x.numpy()}, block_size=64, clip=False))):
        pass_._inputs = p._inputs
        qw = pass_.quantize(w, SimpleNamespace(name=name, block=64))
        assert np.array_equal(qw.q, rtn_q) and np.array_equal(qw.scale, rtn_scale), name
    assert not np.array_equal(p.quantize(w, SimpleNamespace(name="scaled", block=64)).scale, rtn_scale)  # it did clip


@pytest.mark.parametrize("sibling", [False, True])
def test_a_group_is_folded_only_when_no_other_node_reads_its_input(sibling):
    """The group's input also read by a MatMul outside the targets: folding 1/s into the norm would scale
    that reader's input too, so the norm keeps its weight and the group is clipped without scales."""
    model, gamma, activations = norm_matmul_graph(sibling=sibling)
    before = gamma.const_value.numpy().copy()
    p = awq.QuantizeInt4AwqPass(activations, block_size=64)
    p(model)
    assert p.quantized == ["model.layers.0.self_attn.q_proj"]
    folded = not np.array_equal(gamma.const_value.numpy(), before)
    assert folded is (not sibling)
    assert ("model.layers.0.self_attn.q_proj" in p.search_log) is (not sibling)
    # the scaled weight keeps the graph's float type, so the DequantizeLinear's scale and output do too
    assert model.graph.initializers["q.w.scale"].const_value.numpy().dtype == np.float32


def test_made_from_the_build_context_with_the_recipe_options():
    from passes import PassContext, make_pass

    acts = {"model.layers.0.self_attn.q_proj": np.zeros((4, 64), np.float32)}
    p = make_pass("quantize-int4-awq", PassContext(max_positions=256, activations=acts), {"block_size": 64, "clip": False})
    assert p.activations is acts and p.block == 64 and p.clip is False


def test_without_activations_the_message_names_the_calibrate_stage():
    import onnx_ir as ir

    model, _, _ = norm_matmul_graph()
    with pytest.raises(ir.passes.PreconditionError) as info:
        awq.QuantizeInt4AwqPass(None)(model)
    assert str(info.value.__cause__) == "quantize-int4-awq needs calibration activations (the driver runs the calibrate stage)"


def test_f32_copies_so_the_callers_in_place_scaling_leaves_the_weight_alone():
    for array in (np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(12, dtype=np.float16).reshape(3, 4)):
        before = array.copy()
        t = awq._f32(array)
        t.mul_(2)
        assert t.dtype == torch.float32 and np.array_equal(array, before)


def test_activations_are_searched_in_float32():
    p = awq.QuantizeInt4AwqPass({"a": np.ones((4, 8), np.float16)})
    assert p._activation("a").dtype == torch.float32


def _threads_seen(monkeypatch, big_weight=None):
    """Runs the pass on _group_graph with torch's thread setting replaced by a counter (the process starts
    at 3): returns the count each search and each float32 weight copy ran under, and the count after.
    A counter, not real threads: raising torch's thread count in a forked test process (mutation runs)
    can hang OpenMP."""
    state = {"n": 3}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: state.update(n=n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: state["n"])
    searches, copies = [], []
    real, real_f32 = awq.search_clip, awq._f32
    monkeypatch.setattr(awq, "search_clip", lambda *a: searches.append(state["n"]) or real(*a))
    monkeypatch.setattr(awq, "_f32", lambda a: copies.append(state["n"]) or real_f32(a))
    if big_weight is not None:
        monkeypatch.setattr(awq, "BIG_WEIGHT", big_weight)
    model, _, activations = norm_matmul_graph()
    awq.QuantizeInt4AwqPass(activations, block_size=64, clip=True)(model)
    return searches, copies, state["n"]


def test_big_weights_search_on_every_thread(monkeypatch):
    """From BIG_WEIGHT elements (a 1B model's projections) the searches are GEMM-bound: every thread the
    process had; the rest of the pass stays on one."""
    searches, copies, after = _threads_seen(monkeypatch, big_weight=64 * 32)  # exactly this weight: inclusive
    assert searches == [3] and set(copies) == {1} and after == 3


def test_small_weights_search_on_one_thread_and_the_count_comes_back(monkeypatch):
    """On small weights the searches are thousands of tiny tensor ops: one thread (NOTES: 15 s vs 161 s);
    torch's own setting is restored after the pass."""
    searches, copies, after = _threads_seen(monkeypatch)
    assert searches == [1] and len(copies) >= 2 and set(copies) == {1} and after == 3
