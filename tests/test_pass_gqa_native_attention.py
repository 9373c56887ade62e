"""gqa-native-attention, tested three ways: no K/V repetition, onnxruntime unchanged, native attention in TensorRT."""

import numpy as np
import onnx_ir as ir
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


# --- a synthetic Attention fed by repeated K/V heads, in both repetition layouts -----------------

B, HEADS, KV_HEADS, SEQ, PAST, DIM = 1, 4, 2, 3, 5, 8


def repeated_kv_attention(axis: int, repeat_value: bool = True, heads: int | str = HEADS,
                          kv_heads: int | str = KV_HEADS, mask: bool = True):
    """Attention(q, repeat(k), repeat(v), mask) with K/V heads repeated through Unsqueeze(axis) -> Expand -> Reshape.

    axis 2 is HF's repeat_kv ([k0, k0, k1, k1]: q head h reads kv head h // n_rep, as ONNX Attention
    groups them); axis 1 is tile-style repetition ([k0, k1, k0, k1]: q head h reads kv head h % Hkv),
    which the same three ops express and native GQA cannot. repeat_value=False feeds V with all the
    query's heads (no repetition); `heads` / `kv_heads` a string declares that head count symbolic.
    What the rewrite must carry over is all non-default here: the additive mask (itself reshaped;
    mask=False: none), scale 0.3, and the Reshapes' allowzero attribute.
    """
    from onnx import TensorProto, helper

    n_rep = HEADS // KV_HEADS
    unsqueezed = [B, KV_HEADS, 1, PAST, DIM] if axis == 2 else [B, 1, KV_HEADS, PAST, DIM]
    expanded = [B, KV_HEADS, n_rep, PAST, DIM] if axis == 2 else [B, n_rep, KV_HEADS, PAST, DIM]
    nodes, shapes = [], []
    for name in ("key", "value") if repeat_value else ("key",):
        nodes += [helper.make_node("Unsqueeze", [name, "axes"], [f"{name}_unsqueezed"]),
                  helper.make_node("Expand", [f"{name}_unsqueezed", "expanded"], [f"{name}_expanded"]),
                  helper.make_node("Reshape", [f"{name}_expanded", "heads"], [f"{name}_repeated"], allowzero=0)]
        shapes += [helper.make_tensor_value_info(f"{name}_unsqueezed", TensorProto.FLOAT, unsqueezed),
                   helper.make_tensor_value_info(f"{name}_expanded", TensorProto.FLOAT, expanded),
                   helper.make_tensor_value_info(f"{name}_repeated", TensorProto.FLOAT, [B, heads, PAST, DIM])]
    if mask:
        nodes.append(helper.make_node("Reshape", ["mask_flat", "mask_shape"], ["mask"]))
    value = "value_repeated" if repeat_value else "value"
    nodes.append(helper.make_node("Attention", ["query", "key_repeated", value] + ["mask"] * mask, ["out"],
                                  name="attention", scale=0.3))
    constants = [helper.make_tensor("axes", TensorProto.INT64, [1], [axis]),
                 helper.make_tensor("expanded", TensorProto.INT64, [5], expanded),
                 helper.make_tensor("heads", TensorProto.INT64, [4], [B, HEADS, PAST, DIM]),
                 helper.make_tensor("mask_shape", TensorProto.INT64, [2], [SEQ, PAST])]
    inputs = [helper.make_tensor_value_info("query", TensorProto.FLOAT, [B, heads, SEQ, DIM]),
              helper.make_tensor_value_info("key", TensorProto.FLOAT, [B, kv_heads, PAST, DIM]),
              helper.make_tensor_value_info("value", TensorProto.FLOAT, [B, kv_heads if repeat_value else heads, PAST, DIM])]
    inputs += [helper.make_tensor_value_info("mask_flat", TensorProto.FLOAT, [SEQ * PAST])] * mask
    graph = helper.make_graph(nodes, "repeated_kv", inputs,
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, [B, heads, SEQ, DIM])],
                              constants, value_info=shapes)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def _run(model) -> np.ndarray:
    """onnxruntime on a graph that is not a whole LM (the executor needs cache inputs and logits)."""
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {k: v for k, v in _attention_feeds().items() if k in {i.name for i in model.graph.inputs}}
    if model.graph.inputs[2].shape[1] == HEADS:  # V not repeated: all the query's heads
        distinct = np.arange(1, HEADS + 1, dtype=np.float32)[None, :, None, None]  # every head its own V
        feeds["value"] = np.repeat(feeds["value"], HEADS // KV_HEADS, axis=1) * distinct
    return session.run(["out"], feeds)[0]


def _attention_feeds():
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((SEQ, PAST)) < 0.3, -1e4, rng.standard_normal((SEQ, PAST)))  # blocked + biased
    mask[:, 0] = 0  # every query sees something
    return {"query": rng.standard_normal((B, HEADS, SEQ, DIM)).astype(np.float32),
            "key": rng.standard_normal((B, KV_HEADS, PAST, DIM)).astype(np.float32),
            "value": rng.standard_normal((B, KV_HEADS, PAST, DIM)).astype(np.float32),
            "mask_flat": mask.reshape(-1).astype(np.float32)}


@pytest.mark.parametrize("mask", [True, False], ids=["mask", "no-mask"])
def test_repeat_kv_layout_is_rewritten_with_the_same_outputs(mask):
    """The control for the next tests: the synthetic graph in HF's layout is one the rule does rewrite."""
    model = repeated_kv_attention(axis=2, mask=mask)
    ref = _run(model)
    assert GqaNativeAttentionPass()(model).modified
    assert [n.op_type for n in model.graph] == ["Reshape", "Attention"][not mask:]  # the mask's Reshape stays
    attention = model.graph.node(int(mask))
    assert [v.name if v is not None else None for v in attention.inputs] == ["query", "key", "value", "mask"][:3 + mask]
    assert attention.attributes["scale"].as_float() == pytest.approx(0.3)
    np.testing.assert_allclose(_run(model), ref, atol=1e-6, rtol=1e-6)  # same grouping: measured 0.0


def test_tile_style_repetition_is_refused_not_regrouped():
    """Tile-style K/V repetition matches Unsqueeze -> Expand -> Reshape too, but feeding Attention the
    un-repeated heads would regroup the query heads (h % Hkv -> h // n_rep): different outputs. The rule
    refuses it (Unsqueeze axis != 2), and the pass's postcondition then fails loudly: the driver turns
    that into 'recipe cannot be applied' (exit 3), never into a silently different model."""
    from passes.gqa_native_attention import rules

    model = repeated_kv_attention(axis=1)
    ref = _run(model)
    ops = [n.op_type for n in model.graph]
    assert rules().apply_to_model(model) == 0, "tile-style repetition was rewritten to native GQA"
    with pytest.raises(ir.passes.PostconditionError, match="attention: K/V still come through a Reshape"):
        GqaNativeAttentionPass()(model)
    assert [n.op_type for n in model.graph] == ops
    np.testing.assert_array_equal(_run(model), ref)


@pytest.mark.parametrize("case", ["value-not-repeated", "symbolic-heads", "symbolic-kv-heads"])
def test_repetition_it_cannot_prove_is_refused(case):
    """K repeated as repeat_kv does, but V fed with every head (nothing to un-repeat), or a head count
    that is not static (no proof that q heads are a multiple of K's): refused, and the postcondition
    names the K input still coming through a Reshape."""
    from passes.gqa_native_attention import rules

    model = repeated_kv_attention(axis=2, repeat_value=case != "value-not-repeated",
                                  heads="heads" if case == "symbolic-heads" else HEADS,
                                  kv_heads="kv_heads" if case == "symbolic-kv-heads" else KV_HEADS)
    ref = _run(model)
    assert rules().apply_to_model(model) == 0
    with pytest.raises(ir.passes.PostconditionError, match="attention: K/V still come through a Reshape"):
        GqaNativeAttentionPass()(model)
    np.testing.assert_array_equal(_run(model), ref)
