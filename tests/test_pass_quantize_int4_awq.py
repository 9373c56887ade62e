"""quantize-int4-awq, tested three ways on the trained model: graph shape (no node added beyond the
DQs, scales folded), onnxruntime (the folding alone is exact; with quantization it beats RTN,
see test_quality.py), and TensorRT(-RTX) parse + build."""

import warnings

import numpy as np
import onnx_ir as ir
import pytest

from passes import PassContext, QuantizeInt4AwqPass, make_pass
from passes.weight_quant import matching_matmuls
from helpers import build_with_backend, held_out_ids, op_counts, run_onnx, save, trained_feeds


@pytest.fixture(autouse=True)
def fresh_search_memo():
    """Each test computes its own searches: the module-level memo (kept for the precision search's
    repeated groups) would otherwise hand a test the results an earlier test computed, so a broken search
    could pass here on another test's numbers (mutation testing found 50 such survivors)."""
    import passes.quantize_int4_awq as awq

    awq._MEMO.clear()
    yield
    awq._MEMO.clear()



def test_graph_shape_after(trained_fp16, trained_calibration, trained):
    model = ir.load(trained_fp16)
    before = op_counts(model)
    gammas = {n.inputs[1].name: n.inputs[1].const_value.numpy().copy() for n in model.graph
              if n.op_type == "RMSNormalization"}
    pass_ = QuantizeInt4AwqPass(trained_calibration.activations, block_size=128)
    assert pass_(model).modified
    layers = trained.spec.num_layers
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 7 * layers and not pass_.fallbacks and not [t for t in matching_matmuls(model) if t.skipped is None]
    assert len(model.graph) == sum(before.values()) + len(dqs)  # the scales were folded, not inserted
    for dq in dqs:
        assert dq.inputs[0].dtype == ir.DataType.INT4 and dq.attributes["block_size"].as_int() == 128
    # A norm absorbed 1/s exactly when its group's search chose alpha > 0 (alpha = 0 is s = 1); the
    # final norm feeds lm_head, which is not quantized, and never changes.
    changed = {name for name, g in gammas.items()
               if not np.array_equal(g, model.graph.initializers[name].const_value.numpy())}
    expected = {f"model.model.layers.{i}.{norm}.weight" for i in range(layers)
                for norm, proj in (("input_layernorm", "self_attn.q_proj"), ("post_attention_layernorm", "mlp.gate_proj"))
                if pass_.search_log[f"model.layers.{i}.{proj}"]["alpha"] > 0}
    assert changed == expected and len(expected) >= layers
    # The search chose a non-trivial alpha for most groups (alpha = 0 is plain RTN).
    alphas = [v["alpha"] for v in pass_.search_log.values()]
    assert sum(a > 0 for a in alphas) >= len(alphas) // 2
    assert all(v["loss_awq"] <= v["loss_rtn"] for v in pass_.search_log.values())


def test_scale_folding_alone_preserves_outputs(trained_fp16, trained_calibration, trained, tmp_path):
    """Apply AWQ's scaling and folding without quantizing: the function is unchanged (FP16 rounding aside)."""
    model = ir.load(trained_fp16)
    pass_ = QuantizeInt4AwqPass(trained_calibration.activations, block_size=128)
    pass_.prepare(model, pass_.plan(model)[0])
    assert pass_.search_log
    ids = held_out_ids(trained)
    got = run_onnx(save(model, tmp_path / "scaled.onnx"), trained_feeds(model, ids))["logits"]
    want = run_onnx(trained_fp16, trained_feeds(model, ids))["logits"]
    assert np.abs(got - want).max() < 0.08  # logits span ~[-15, 15]; FP16 rounding of rescaled weights
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.97


def test_backend_builds_dequantize_layers(trained_quantized, tmp_path):
    path = trained_quantized("quantize-int4-awq", block_size=128)
    engine = build_with_backend(path, tmp_path, max_seq=256)
    assert engine.layer_types.get("DEQUANTIZE") == op_counts(ir.load(path))["DequantizeLinear"]


def test_needs_activations_and_falls_back_per_group(trained_fp16, trained_calibration):
    with pytest.raises(ir.passes.PreconditionError) as info:
        make_pass("quantize-int4-awq", PassContext(max_positions=256))(ir.load(trained_fp16))
    assert "calibration activations" in str(info.value.__cause__)
    partial = {k: v for k, v in trained_calibration.activations.items() if not k.endswith("down_proj")}
    model = ir.load(trained_fp16)
    pass_ = QuantizeInt4AwqPass(partial, block_size=128)
    pass_(model)
    assert sorted(pass_.fallbacks) == sorted(f"model.layers.{i}.mlp.down_proj" for i in range(4))
    assert len(pass_.quantized) == 28  # the fallbacks are still quantized, by RTN


@pytest.mark.parametrize("name", ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.k_proj",
                                  "model.layers.2.mlp.up_proj"])
def test_calibration_samples_rows_as_they_pass(trained, trained_calibration, name):
    """The on-the-fly sample equals 'keep every row, then every stride-th up to sample_rows', for a
    module with its own input and for modules sharing one (k_proj with q_proj, up_proj with gate_proj)."""
    import torch

    from compiler.frontend.calibrate import tokenize_windows
    from compiler.frontend.corpus import default_calibration_text

    module = dict(trained.model.named_modules())[name]
    chunks = tokenize_windows(trained.tokenizer, default_calibration_text(), 128, 16)
    rows = []
    hook = module.register_forward_hook(lambda m, a, o: rows.append(a[0].detach().reshape(-1, a[0].shape[-1]).clone()))
    try:
        with torch.no_grad():
            for i in range(0, len(chunks), 8):
                trained.model(input_ids=torch.tensor(chunks[i:i + 8]), use_cache=False)
    finally:
        hook.remove()
    stride = max(1, len(chunks) * 128 // 1024)
    assert stride > 1  # else the test would not exercise the striding
    expected = torch.cat(rows)[::stride][:1024].numpy()
    got = trained_calibration.activations[name]
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_modules_fed_one_tensor_share_one_sample_on_disk(trained_calibration):
    """q/k/v (one norm's output) and gate/up store one sample; every module is still a key; each
    read is a fresh array, so a caller that scales it in place changes nothing for the next."""
    store = trained_calibration.activations
    layers = 4
    assert len(store) == 7 * layers + 1  # every decoder Linear and lm_head
    assert store.distinct() == 4 * layers + 1  # q=k=v, gate=up, o, down per layer; lm_head
    q, k = store["model.layers.0.self_attn.q_proj"], store["model.layers.0.self_attn.k_proj"]
    assert np.array_equal(q, k) and q is not k and q.dtype == np.float32
    o = store["model.layers.0.self_attn.o_proj"]
    assert o.shape == q.shape and not np.array_equal(o, q)
    q *= 2
    assert np.array_equal(store["model.layers.0.self_attn.q_proj"], k)


def test_activation_store_falls_back_to_memory_without_a_scratch_folder(tmp_path, monkeypatch):
    from compiler.frontend.calibrate import ActivationStore
    from compiler.host.scratch import SCRATCH_ENV

    rows = np.arange(24, dtype=np.float32).reshape(4, 6)
    for folder, warns in ((tmp_path, False), (tmp_path / "missing", True)):
        monkeypatch.setenv(SCRATCH_ENV, str(folder))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            store = ActivationStore()
        assert any("stays in memory" in str(w.message) for w in caught) == warns
        store.reserve("a", 4, 6)
        store.alias("a", "a"), store.alias("b", "a")
        store.append("a", rows[:3]), store.append("a", rows[3:])
        assert np.array_equal(store["b"], rows) and "b" in store and "c" not in store
        with pytest.raises(ValueError, match="does not fit"):
            store.append("a", rows[:1])


def test_calibration_batch_sets_memory_not_the_sample(trained):
    """Windows per forward are chosen so that a forward's logits stay within LOGITS_BUDGET; the rows
    sampled are global row indices, so the sample is the same whatever the batch (GEMM rounding aside)."""
    from compiler.frontend.calibrate import LOGITS_BUDGET, calibrate, logits_batch
    from compiler.frontend.corpus import default_calibration_text

    assert logits_batch(128, 128256) == 2  # Llama-3.2: 2 x 65.7 MB of logits per forward, not 8
    assert logits_batch(128, 49152) == 5 and logits_batch(128, 1000) == 8 and logits_batch(4096, 128256) == 1
    assert all(logits_batch(128, v) * 128 * v * 4 <= LOGITS_BUDGET for v in (32000, 49152, 128256, 151936))
    one, many = (calibrate(trained, default_calibration_text(), max_windows=10, sample_rows=256, batch=b)
                 for b in (1, 4))
    assert list(one.activations) == list(many.activations)
    for name in one.activations:
        np.testing.assert_allclose(one.activations[name], many.activations[name], rtol=1e-5, atol=1e-6)


def test_calibration_windows_shrink_with_model_size():
    from compiler.frontend.calibrate import default_windows

    assert default_windows(2_000_000) == 32  # tiny and sub-400M models: the full sample
    assert default_windows(360_000_000) == 32
    assert default_windows(1_236_000_000) == 10  # a 1B model: ~1300 tokens
    assert default_windows(8_000_000_000) == 8  # never fewer than 8 windows


def test_search_rows_cap_large_weights_only():
    import torch

    from passes.quantize_int4_awq import MIN_SEARCH_ROWS, SEARCH_BUDGET, search_rows

    x = torch.arange(1024 * 4, dtype=torch.float32).reshape(1024, 4)
    assert search_rows(x, torch.zeros(512, 1024)) is x  # the trained model's largest weight: every row
    big = search_rows(x, torch.zeros(2048, 16384))  # a 1B model's gate/up group
    assert big.shape == (MIN_SEARCH_ROWS, 4) and torch.equal(big[:, 0], x[::8][:MIN_SEARCH_ROWS, 0])
    qkv = search_rows(x, torch.zeros(2048, 3072))
    assert qkv.shape[0] == SEARCH_BUDGET // (2048 * 3072) and qkv.shape[0] * 2048 * 3072 <= SEARCH_BUDGET


def test_search_columns_subsample_large_groups_only():
    import torch

    from passes.quantize_int4_awq import SCALE_SEARCH_ELEMENTS, search_columns

    small = torch.zeros(512, 1024)  # the trained model's largest group: every column
    assert search_columns(small) is small
    w = torch.arange(2048 * 16384, dtype=torch.float32).reshape(2048, 16384)  # a 1B model's gate/up group
    sub = search_columns(w)
    assert sub.shape == (2048, 4096) and sub.numel() <= SCALE_SEARCH_ELEMENTS
    assert torch.equal(sub, w[:, ::4])  # strided: every part of the group is represented
    odd = search_columns(torch.zeros(2048, 5000))
    assert odd.shape[1] <= SCALE_SEARCH_ELEMENTS // 2048 and odd.shape[1] > 2000


def test_column_chunks_cover_every_column_once():
    from passes.quantize_int4_awq import CHUNK_ELEMENTS, column_chunks

    assert column_chunks(512, 1024) == [slice(0, 1024)]  # the trained model's largest weight: one chunk
    for k, n in ((2048, 8192), (8192, 2048), (2048, 5000)):
        chunks = column_chunks(k, n)
        covered = [i for c in chunks for i in range(n)[c]]
        assert covered == list(range(n))
        assert all(k * (c.stop - c.start) <= CHUNK_ELEMENTS for c in chunks) and len(chunks) > 1


def _ramp_activations(rows, k, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    outliers = 1 + 20 * (torch.rand(k, generator=g) > 0.97)  # a few hot channels, as in real activations
    return torch.randn(rows, k, generator=g) * torch.linspace(0.1, 3, k) * outliers


def test_chunked_searches_match_one_chunk(monkeypatch):
    """Chunking is exact per column: the same clip ratios, the same alpha, the loss to float rounding."""
    import torch

    from passes import quantize_int4_awq as awq

    x = _ramp_activations(64, 256)
    w = torch.randn(256, 96, generator=torch.Generator().manual_seed(1)) * 0.02
    whole_clip, whole_scales = awq.search_clip(x, w, 32), awq.search_scales(x, w, 32)
    monkeypatch.setattr(awq, "CHUNK_ELEMENTS", 256 * 10)  # 10 columns a chunk: 10 chunks, the last short
    assert len(awq.column_chunks(256, 96)) == 10
    assert torch.equal(awq.search_clip(x, w, 32), whole_clip)
    s, alpha, loss0, loss = awq.search_scales(x, w, 32)
    assert alpha == whole_scales[1] and torch.equal(s, whole_scales[0])
    assert loss == pytest.approx(whole_scales[3], rel=1e-5) and loss0 == pytest.approx(whole_scales[2], rel=1e-5)
    assert (whole_clip < 1).any()  # the search did clip somewhere, so equality says something


def test_coarse_to_fine_alpha_matches_full_grid(monkeypatch):
    """Big groups score every 4th alpha and then the neighbours of the best: at most 12 of the 21
    quantize-dequantize rounds, and the same alpha as the whole grid on a group with outlier channels."""
    import torch

    from passes import quantize_int4_awq as awq

    x = _ramp_activations(64, 256, seed=2)
    w = torch.randn(256, 128, generator=torch.Generator().manual_seed(3)) * 0.02
    calls = []
    real = awq._fake_quant
    monkeypatch.setattr(awq, "_fake_quant", lambda *a, **k: calls.append(1) or real(*a, **k))
    full = awq.search_scales(x, w, 32)
    assert len(calls) == len(awq.ALPHA_GRID) and 0.0 < full[1] < 1.0  # an interior optimum
    calls.clear()
    monkeypatch.setattr(awq, "BIG_WEIGHT", w.numel())  # treat this group as a 1B model's
    alphas = []
    m = x.abs().mean(dim=0)
    hi, lo = int(m.argmax()), int(m.argmin())

    def spy(ws, *a, **k):  # recover alpha from the scaled weight: s_hi / s_lo = (m_hi / m_lo) ** alpha
        r = (ws[hi] / w[hi]).mean() / (ws[lo] / w[lo]).mean()
        alphas.append(round(float(torch.log(r) / torch.log(m[hi] / m[lo])) * 20))
        return real(ws, *a, **k)

    monkeypatch.setattr(awq, "_fake_quant", spy)
    coarse = awq.search_scales(x, w, 32)
    assert len(alphas) <= 12
    # every 4th grid point, then each point within 3 of the best of those (and no other)
    coarse_points = set(range(0, 21, 4))
    assert set(alphas[:6]) == coarse_points and len(alphas) == len(set(alphas))
    fine = set(alphas) - coarse_points
    i = next(c for c in coarse_points if fine == set(range(max(0, c - 3), min(21, c + 4))) - coarse_points)
    assert i >= 4  # the window is not clipped at 0: each of its points was needed
    assert coarse[1] == full[1] and torch.equal(coarse[0], full[0]) and coarse[2:] == full[2:]


@pytest.mark.parametrize("widths", [(5000,), (3000, 3000), (2048, 2048, 1000), (7, 9000, 11)])
def test_group_search_weight_is_search_columns_of_the_concatenation(widths):
    """The alpha search's weight is made per member (no FP32 concatenation of the group): the same
    columns, the same float32 values, for groups whose widths do not line up with the stride."""
    import torch

    from passes.quantize_int4_awq import group_search_weight, search_columns

    rng = np.random.default_rng(1)
    weights = [rng.standard_normal((2048, n)).astype(np.float16) for n in widths]
    expected = search_columns(torch.cat([torch.from_numpy(w.astype(np.float32)) for w in weights], dim=1))
    got = group_search_weight(weights)
    assert got.dtype == torch.float32 and got.shape == expected.shape and torch.equal(got, expected)


def test_scaling_a_weight_by_s_rounds_as_numpy_did():
    """W * s per input channel, computed in torch on a float32 copy: the FP16 bits of numpy's
    float32 product (what the pass computed before), so the scaled weights did not move."""
    import torch

    from passes.quantize_int4_awq import _f32

    rng = np.random.default_rng(2)
    w = rng.standard_normal((256, 384)).astype(np.float16)
    s = torch.from_numpy(rng.uniform(0.05, 20, 256).astype(np.float32))
    ours = _f32(w).mul_(s[:, None]).numpy().astype(np.float16)
    theirs = (w.astype(np.float32) * s.numpy()[:, None]).astype(np.float16)
    assert np.array_equal(ours.view(np.int16), theirs.view(np.int16))


def test_memo_digest_hashes_the_tensors_bytes_without_copying_them():
    """The search memo's key hashes the buffer in place: the digest of the bytes (empty, 0-d and
    transposed tensors too), and tensors that differ in one element differ in digest."""
    import hashlib

    import torch

    from passes.quantize_int4_awq import _digest

    for t in (torch.zeros(0, 3), torch.tensor(5.0), torch.arange(35.0).reshape(7, 5).t()):
        assert _digest(t) == hashlib.blake2b(t.contiguous().numpy().tobytes(), digest_size=16).digest()
    a = torch.zeros(64, 64)
    b = a.clone()
    b[63, 63] = 1e-30
    assert _digest(a) != _digest(b)
