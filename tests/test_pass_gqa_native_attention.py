"""gqa-native-attention, tested three ways: no K/V repetition, onnxruntime unchanged, native attention in TensorRT."""

import numpy as np
import pytest

from passes import CastFp16Pass, CleanupPass, GqaNativeAttentionPass, Rotary2DCachePass
from helpers import build_with_backend, feeds_with_past, op_counts, run_onnx, save


@pytest.fixture()
def before(fresh_llama_model):
    CleanupPass()(fresh_llama_model)
    Rotary2DCachePass(64)(fresh_llama_model)
    return fresh_llama_model


def test_graph_shape_after(before, llama_export):
    _, io = llama_export
    expands = op_counts(before)["Expand"]
    assert GqaNativeAttentionPass()(before).modified
    attention = [n for n in before.graph if n.op_type == "Attention"]
    assert len(attention) == io.num_layers and all(len(n.outputs) == 1 for n in attention)
    for node in attention:
        for kv in node.inputs[1:3]:
            assert kv.producer().op_type == "Concat"  # straight from the cache, not Unsqueeze/Expand/Reshape
            assert kv.shape[1] == io.num_kv_heads  # fewer heads than the query: GQA inside Attention
        assert node.inputs[0].shape[1] > io.num_kv_heads
        assert node.attributes["scale"].as_float() == pytest.approx(io.head_dim ** -0.5)
    assert op_counts(before)["Expand"] == expands - 2 * io.num_layers
    assert not GqaNativeAttentionPass()(before).modified


def test_onnxruntime_before_vs_after(before, llama_export, tmp_path):
    _, io = llama_export
    feeds = feeds_with_past(io, np.float32, past=5)
    ref = run_onnx(save(before, tmp_path / "before.onnx"), feeds)
    GqaNativeAttentionPass()(before)
    got = run_onnx(save(before, tmp_path / "after.onnx"), feeds)
    for name in io.output_names:  # same math, different kernel path: 1e-5
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5, rtol=1e-5)


def test_backend_builds_native_attention_not_a_matmul_softmax_chain(before, llama_export, tmp_path):
    _, io = llama_export
    GqaNativeAttentionPass()(before)
    CastFp16Pass()(before)
    engine = build_with_backend(save(before, tmp_path / "m.onnx"), tmp_path)
    assert engine.layer_types.get("ATTENTION_INPUT") == io.num_layers
    assert "SOFTMAX" not in engine.layer_types
    assert engine.layer_types["MATRIX_MULTIPLY"] == 7 * io.num_layers + 1  # projections + lm_head only


def test_leaves_no_reference_to_the_graph(llama_export):
    """The rule set is made per run: a module-level one kept the last graph its matcher saw."""
    import gc
    import weakref

    import onnx_ir as ir

    model = ir.load(llama_export[0])
    CleanupPass()(model)
    Rotary2DCachePass(64)(model)
    assert GqaNativeAttentionPass()(model).modified
    graph = weakref.ref(model.graph)
    del model
    gc.collect()
    assert graph() is None
