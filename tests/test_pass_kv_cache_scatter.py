"""kv-cache-scatter, tested three ways: TensorScatter instead of Concat, onnxruntime unchanged, KV_CACHE_UPDATE in TensorRT."""

import numpy as np
import onnx_ir as ir
import pytest

from passes import CastFp16Pass, CleanupPass, GqaNativeAttentionPass, KvCacheScatterPass, Rotary2DCachePass
from helpers import build_with_backend, feeds_with_past, op_counts, run_onnx, save

CAP = 32


@pytest.fixture()
def before(fresh_llama_model):
    for p in (CleanupPass(), Rotary2DCachePass(CAP), GqaNativeAttentionPass()):
        p(fresh_llama_model)
    return fresh_llama_model


def _fixed(feeds, io, cap=CAP):
    """The same state as a Concat-graph feed, laid into fixed-capacity buffers (unused slots random)."""
    rng = np.random.default_rng(5)
    out = {"input_ids": feeds["input_ids"], "position_ids": feeds["position_ids"]}
    for name in io.past_names:
        b, h, p, d = feeds[name].shape
        buf = rng.standard_normal((b, h, cap, d)).astype(feeds[name].dtype) * 30  # garbage must be masked
        buf[:, :, :p] = feeds[name]
        out[name] = buf
    return out


def test_graph_shape_after(before, llama_export):
    _, io = llama_export
    assert KvCacheScatterPass(CAP)(before).modified
    counts = op_counts(before)
    assert counts["TensorScatter"] == 2 * io.num_layers
    assert counts["Attention"] == io.num_layers
    for out in before.graph.outputs[1:]:
        assert out.producer().op_type == "TensorScatter"  # no Concat on the cache path
        assert list(out.shape)[1:] == [io.num_kv_heads, CAP, io.head_dim]
    for node in before.graph:
        if node.op_type == "Attention":
            assert node.inputs[1].producer().op_type == "TensorScatter"
    names = [v.name for v in before.graph.inputs]
    assert names == ["input_ids", "position_ids", *io.past_names]  # attention_mask is gone
    assert before.opset_imports[""] == 24


def test_onnxruntime_before_vs_after_with_ragged_positions(before, llama_export, tmp_path):
    _, io = llama_export
    ref_path = save(before, tmp_path / "before.onnx")
    KvCacheScatterPass(CAP)(before)
    after_path = save(before, tmp_path / "after.onnx")
    # Row 0 has 6 cached tokens, row 1 has 2: each row's Concat run is the reference for that row.
    for past in (6, 2):
        feeds = feeds_with_past(io, np.float32, batch=1, seq=3, past=past, seed=past)
        ref = run_onnx(ref_path, feeds)
        got = run_onnx(after_path, _fixed(feeds, io))
        np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
        for present in io.present_names:
            np.testing.assert_array_equal(got[present][:, :, : past + 3], ref[present])
    # Both rows in one batch, each at its own positions.
    a = feeds_with_past(io, np.float32, batch=1, seq=1, past=6, seed=1)
    b = feeds_with_past(io, np.float32, batch=1, seq=1, past=2, seed=2)
    fa, fb = _fixed(a, io), _fixed(b, io)
    batch = {k: np.concatenate([fa[k], fb[k]]) for k in fa}
    got = run_onnx(after_path, batch)
    np.testing.assert_allclose(got["logits"][0], run_onnx(ref_path, a)["logits"][0], atol=1e-5)
    np.testing.assert_allclose(got["logits"][1], run_onnx(ref_path, b)["logits"][0], atol=1e-5)


def test_backend_builds_kv_cache_update_and_attention(before, llama_export, tmp_path):
    _, io = llama_export
    KvCacheScatterPass(CAP)(before)
    CastFp16Pass()(before)
    engine = build_with_backend(save(before, tmp_path / "m.onnx"), tmp_path, max_seq=CAP)
    assert engine.layer_types.get("KV_CACHE_UPDATE") == 2 * io.num_layers
    assert engine.layer_types.get("ATTENTION_INPUT") == io.num_layers
    assert "SOFTMAX" not in engine.layer_types
    assert engine.layer_types.get("CONCATENATION", 0) < 2 * io.num_layers  # only shape arithmetic is left
    cache = [t for t in engine.tensors if t.name.startswith("past_key_values")]
    assert all(t.shape == (-1, io.num_kv_heads, CAP, io.head_dim) for t in cache)


def test_requires_gqa_native_attention_first(fresh_llama_model):
    CleanupPass()(fresh_llama_model)
    with pytest.raises(ir.passes.PreconditionError, match="gqa-native-attention"):
        KvCacheScatterPass(CAP)(fresh_llama_model)
