"""residual-fp32, tested three ways: the stream's dtypes after it, onnxruntime against PyTorch where the
all-FP16 graph overflows, TensorRT-RTX parse + build.

The tiny Gemma 3's post-branch norms are scaled up (Gemma's norm: x * (1 + w)) until its residual sum
exceeds FP16's 65504 while every branch output stays inside it: Gemma 3 270M's situation (|hidden|
~1e5, branch outputs <= 3.3e4) at tiny size. The test asserts both facts of the PyTorch model first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from helpers import build_with_backend, op_counts, save
from passes.residual_fp32 import MARK, ResidualFp32Pass, residual_stream

CAP = 32
LAYERS = 3
BRANCH_SCALE = 9000.0  # 1 + w of the post-attention / post-feedforward norms
F16_MAX = 65504.0


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(model dir, loaded model, PyTorch max |residual|, max |branch output|) of the scaled tiny Gemma 3."""
    import torch

    from compiler.frontend.default_model import make_tiny_model
    from compiler.frontend.load import load_model

    root = tmp_path_factory.mktemp("residual")
    loaded = load_model(make_tiny_model(root / "base", "gemma3", num_layers=LAYERS, seed=11))
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                norm.weight.add_(BRANCH_SCALE - 1)
    loaded.model.save_pretrained(root / "scaled")
    loaded.tokenizer.save_pretrained(root / "scaled")
    loaded = load_model(root / "scaled")
    seen = {"stream": 0.0, "branch": 0.0}
    hooks = [loaded.model.model.norm.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("stream", max(seen["stream"], args[0].abs().max().item())))]
    for layer in loaded.model.model.layers:
        for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
            hooks.append(norm.register_forward_hook(
                lambda m, args, out: seen.__setitem__("branch", max(seen["branch"], out.abs().max().item()))))
    ids = _ids(loaded)
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    for hook in hooks:
        hook.remove()
    return root / "scaled", loaded, ids, logits, seen


def _ids(loaded) -> np.ndarray:
    return np.random.default_rng(3).integers(0, loaded.spec.vocab_size, (2, 12)).astype(np.int64)


@pytest.fixture(scope="module")
def fp16_graph(gemma, exported):
    """The fp16 recipe's graph up to cast-fp16 (residual-fp32 not yet applied)."""
    from passes import PassContext, make_pass

    model_dir, loaded, *_ = gemma
    model = ir.load(exported(model_dir, loaded))
    for name in ("cleanup", "rotary-2d-cache", "gqa-native-attention", "kv-cache-scatter", "cast-fp16"):
        make_pass(name, PassContext(max_positions=CAP))(model)
    return model


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _prefill(path, loaded, ids) -> np.ndarray:
    from compiler.runtime.onnx_executor import OnnxRuntimeExecutor

    feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(ids.shape[1], dtype=np.int64), (ids.shape[0], 1))}
    spec = loaded.spec
    for i in range(spec.num_layers):
        for t in ("key", "value"):
            feeds[f"past_key_values.{i}.{t}"] = np.zeros((ids.shape[0], spec.num_kv_heads, CAP, spec.head_dim), np.float16)
    return OnnxRuntimeExecutor(path).run(feeds)["logits"].astype(np.float32)


def test_the_scaled_model_overflows_fp16_only_in_its_residual_sum(gemma):
    *_, seen = gemma
    assert seen["stream"] > 1.2 * F16_MAX and seen["branch"] < 0.9 * F16_MAX


def test_graph_shape_after(fp16_graph):
    model = _copy(fp16_graph)
    assert model.graph.metadata_props.get(MARK) == "1"  # the export marked Gemma 3
    before = op_counts(model)
    assert ResidualFp32Pass()(model).modified
    after = op_counts(model)
    stream = residual_stream(model.graph)
    assert len(stream) == 2 * LAYERS + 1 and all(v.dtype == ir.DataType.FLOAT for v in stream)
    # Casts: each branch into its Add, the embedding once, and each norm that reads the stream back to FP16.
    assert after["Cast"] - before["Cast"] == 2 * LAYERS + 1 + (2 * LAYERS + 1)
    assert {k: v for k, v in after.items() if k != "Cast"} == {k: v for k, v in before.items() if k != "Cast"}
    norms = {u.node for v in stream for u in v.uses() if u.node.op_type == "RMSNormalization"}
    assert len(norms) == 2 * LAYERS + 1
    for norm in norms:
        assert norm.inputs[1].dtype == norm.outputs[0].dtype == ir.DataType.FLOAT
        assert all(u.node.op_type == "Cast" for u in norm.outputs[0].uses())
    mms = [n for n in model.graph if n.op_type in ("MatMul", "Attention")]
    assert all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in mms)  # the heavy ops stay FP16


def test_unmarked_graph_is_left_alone(fp16_graph):
    model = _copy(fp16_graph)
    del model.graph.metadata_props[MARK]
    before = op_counts(model)
    assert not ResidualFp32Pass()(model).modified and op_counts(model) == before


def test_onnxruntime_fp16_overflow_fixed(gemma, fp16_graph, tmp_path):
    """All-FP16: the residual sum overflows (non-finite or far-off logits). With the pass: PyTorch's
    logits within FP16 rounding of the branches (1% of the logit range)."""
    _, loaded, ids, want, _ = gemma
    plain = _prefill(save(_copy(fp16_graph), tmp_path / "plain.onnx"), loaded, ids)
    fixed_model = _copy(fp16_graph)
    ResidualFp32Pass()(fixed_model)
    fixed = _prefill(save(fixed_model, tmp_path / "fixed.onnx"), loaded, ids)
    scale = np.abs(want).max()
    assert not np.isfinite(plain).all() or np.abs(plain - want).max() > 0.1 * scale
    assert np.isfinite(fixed).all()
    assert np.abs(fixed - want).max() < 0.01 * scale
    assert (fixed.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_backend_builds_mixed_precision_stream(fp16_graph, tmp_path):
    model = _copy(fp16_graph)
    ResidualFp32Pass()(model)
    engine = build_with_backend(save(model, tmp_path / "m.onnx"), tmp_path, max_seq=CAP)
    assert engine.layer_types.get("ATTENTION_INPUT") == LAYERS
    assert engine.layer_types.get("KV_CACHE_UPDATE") == 2 * LAYERS


# --- a synthetic two-block stream (seconds, no export): the branches the exported Gemma does not reach ---

HID = 8


def _synthetic_stream():
    """h0 (an FP16 graph input: an embedding with no producer) -> norm_a(h0, shared scale) -> MatMul -> h1 =
    h0 + branch -> norm_b(h1, shared scale) -> MatMul -> h2 = h1 + branch; h1 also read by an output `aux`
    (a reader that is neither Add nor norm); final_norm(h2, own scale) -> lm_head -> logits. The branch
    weights make |h2| ~7.9e4: over FP16's range, while every branch output (<= 3.9e4) stays inside."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    f16 = np.float16
    inits = [numpy_helper.from_array(np.ones(HID, f16), "shared_scale"),
             numpy_helper.from_array(np.full(HID, 0.5, f16), "final_scale"),
             numpy_helper.from_array(np.eye(HID, dtype=f16) * f16(22000), "w_a"),  # each branch ~ +22000 x
             numpy_helper.from_array(np.eye(HID, dtype=f16) * f16(22000), "w_b"),  # the normed stream, same sign
             numpy_helper.from_array((rng.standard_normal((HID, 16)) * 0.1).astype(f16), "lm_head")]
    nodes = [helper.make_node("RMSNormalization", ["h0", "shared_scale"], ["n_a"], name="norm_a", axis=-1),
             helper.make_node("MatMul", ["n_a", "w_a"], ["b_a"], name="mlp_a"),
             helper.make_node("Add", ["h0", "b_a"], ["h1"], name="add_a"),
             helper.make_node("RMSNormalization", ["h1", "shared_scale"], ["n_b"], name="norm_b", axis=-1),
             helper.make_node("MatMul", ["n_b", "w_b"], ["b_b"], name="mlp_b"),
             helper.make_node("Add", ["h1", "b_b"], ["h2"], name="add_b"),
             helper.make_node("Identity", ["h1"], ["aux"], name="aux"),
             helper.make_node("RMSNormalization", ["h2", "final_scale"], ["n_f"], name="final_norm", axis=-1),
             helper.make_node("MatMul", ["n_f", "lm_head"], ["logits"], name="lm_head")]
    h = TensorProto.FLOAT16
    graph = helper.make_graph(nodes, "stream", [helper.make_tensor_value_info("h0", h, [2, HID])],
                              [helper.make_tensor_value_info("logits", h, [2, 16]),
                               helper.make_tensor_value_info("aux", h, [2, HID])], inits,
                              value_info=[helper.make_tensor_value_info(v, h, [2, HID]) for v in ("h1", "h2")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))
    model.graph.metadata_props[MARK] = "1"
    return model


def _run_fp16(model, h0):
    import onnxruntime

    proto = ir.serde.serialize_model(model).SerializeToString()
    return onnxruntime.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"h0": h0})


def _reference(model, h0):
    """The same graph in float64 numpy (RMSNorm epsilon 1e-5, ONNX's default)."""
    w = {k: v.const_value.numpy().astype(np.float64) for k, v in model.graph.initializers.items()}

    def norm(x, scale):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * scale

    b_a = norm(h0, w["shared_scale"]) @ w["w_a"]
    b_b = norm(h0 + b_a, w["shared_scale"]) @ w["w_b"]
    return norm(h0 + b_a + b_b, w["final_scale"]) @ w["lm_head"], h0 + b_a, h0 + b_a + b_b, max(abs(b_a).max(), abs(b_b).max())


def test_synthetic_stream_converts_every_kind_of_reader_and_only_marked_graphs():
    from passes.residual_fp32 import mark

    h0 = (np.random.default_rng(6).standard_normal((2, HID)) * 100).astype(np.float16)
    logits_ref, h1_ref, h2_ref, branch = _reference(_synthetic_stream(), h0.astype(np.float64))
    assert branch < F16_MAX and np.abs(h1_ref).max() < F16_MAX < np.abs(h2_ref).max()  # only the last sum overflows
    # (onnxruntime fuses Add + RMSNormalization and sums in FP32 itself, so the all-FP16 graph does not
    # overflow here; test_onnxruntime_fp16_overflow_fixed shows the overflow on the exported Gemma.)

    model = _synthetic_stream()
    assert ResidualFp32Pass()(model).modified is True
    stream = residual_stream(model.graph)
    assert [v.name for v in stream] == ["h2", "h1", "residual_fp32.embedding"]
    assert all(v.dtype == ir.DataType.FLOAT for v in stream)
    first = model.graph.node(0)
    assert first.op_type == "Cast" and first.inputs[0].name == "h0"  # the input is widened once, first
    norms = {n.name: n for n in model.graph if n.op_type == "RMSNormalization"}
    for name in ("norm_a", "norm_b"):  # the shared scale is Cast for each norm, the FP16 initializer kept
        scale = norms[name].inputs[1]
        assert scale.producer().op_type == "Cast" and scale.name == f"{name}.scale_fp32" and scale.dtype == ir.DataType.FLOAT
    assert model.graph.initializers["shared_scale"].dtype == ir.DataType.FLOAT16
    final_scale = norms["final_norm"].inputs[1]  # used once: widened in place
    assert final_scale.is_initializer() and final_scale.const_value.numpy().dtype == np.float32
    for norm in norms.values():
        (reader,) = [u.node for u in norm.outputs[0].uses()]
        assert reader.op_type == "Cast" and reader.outputs[0].dtype == ir.DataType.FLOAT16
        assert reader.outputs[0].shape == norm.outputs[0].shape
    aux = next(n for n in model.graph if n.name == "aux").inputs[0]
    assert aux.producer().op_type == "Cast" and aux.dtype == ir.DataType.FLOAT16 and aux.shape == ir.Shape([2, HID])
    logits, h1 = _run_fp16(model, h0)
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits, logits_ref, rtol=2e-2, atol=0.5)  # FP16 matmuls and norm outputs
    np.testing.assert_allclose(h1, h1_ref, rtol=2e-3)
    assert ResidualFp32Pass()(model).modified is False  # converted already

    unmarked = _synthetic_stream()
    del unmarked.graph.metadata_props[MARK]
    assert ResidualFp32Pass()(unmarked).modified is False and ResidualFp32Pass(always=True)(unmarked).modified is True
    for arch, marked in (("Gemma3ForCausalLM", True), ("LlamaForCausalLM", False)):
        fresh = _synthetic_stream()
        del fresh.graph.metadata_props[MARK]
        mark(fresh, arch)
        assert (fresh.graph.metadata_props.get(MARK) == "1") is marked


def test_synthetic_postcondition_names_the_fp16_stream_values():
    with pytest.raises(ir.passes.PostconditionError, match=r"^residual stream values still FP16: \['h2', 'h1', 'h0'\]$"):
        ResidualFp32Pass().ensures(_synthetic_stream())
    unmarked = _synthetic_stream()
    del unmarked.graph.metadata_props[MARK]
    ResidualFp32Pass().ensures(unmarked)  # an unmarked graph is left FP16 on purpose
    with pytest.raises(ir.passes.PostconditionError, match="still FP16"):
        ResidualFp32Pass(always=True).ensures(unmarked)


def test_synthetic_graphs_it_cannot_read_are_refused_by_name():
    no_norm = _synthetic_stream()
    head = next(n for n in no_norm.graph if n.name == "lm_head")
    head.replace_input_with(0, next(n for n in no_norm.graph if n.name == "add_b").outputs[0])  # no final norm
    message = r"^no RMSNormalization found before the logits \(not a decoder graph\?\)$"
    with pytest.raises(ir.passes.PreconditionError, match=message):
        residual_stream(no_norm.graph)
    no_logits = _synthetic_stream()
    no_logits.graph.outputs[0].name = "scores"
    with pytest.raises(ir.passes.PreconditionError, match=message):
        residual_stream(no_logits.graph)
    ambiguous = _synthetic_stream()
    add_b = next(n for n in ambiguous.graph if n.name == "add_b")
    extra = ir.node("Identity", [add_b.inputs[1]], name="also_reads_the_branch")  # a second use of the branch
    ambiguous.graph.append(extra)
    ambiguous.graph.outputs.append(extra.outputs[0])
    with pytest.raises(ir.passes.PreconditionError,
                       match=r"^add_b: cannot tell the residual operand from the branch \(2 operands have other uses\)$"):
        residual_stream(ambiguous.graph)
