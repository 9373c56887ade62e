"""quantize-int4-awq, tested three ways on the trained model: graph shape (no node added beyond the
DQs, scales folded), onnxruntime (the folding alone is exact; with quantization it beats RTN,
see test_quality.py), and TensorRT(-RTX) parse + build."""

import numpy as np
import onnx_ir as ir
import pytest

from passes import PassContext, QuantizeInt4AwqPass, make_pass
from passes.weight_quant import select_targets
from helpers import build_with_backend, op_counts, run_onnx, save


def _feeds(model: ir.Model, ids: np.ndarray) -> dict:
    feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))}
    for v in model.graph.inputs[2:]:
        feeds[v.name] = np.zeros([ids.shape[0] if not isinstance(d, int) else d for d in v.shape], np.float16)
    return feeds


def _text_ids(trained, n=2, seq=48):
    from compiler.corpus import default_eval_text

    ids = trained.tokenizer(default_eval_text()).input_ids
    return np.array([ids[i * seq:(i + 1) * seq] for i in range(n)], np.int64)


def test_graph_shape_after(trained_fp16, trained_calibration, trained):
    model = ir.load(trained_fp16)
    before = op_counts(model)
    gammas = {n.inputs[1].name: n.inputs[1].const_value.numpy().copy() for n in model.graph
              if n.op_type == "RMSNormalization"}
    pass_ = QuantizeInt4AwqPass(trained_calibration.activations, block_size=128)
    assert pass_(model).modified
    layers = trained.spec.num_layers
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 7 * layers and not pass_.fallbacks and not select_targets(model)
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
    pass_.prepare(model, select_targets(model, k_multiple=128))
    assert pass_.search_log
    ids = _text_ids(trained)
    got = run_onnx(save(model, tmp_path / "scaled.onnx"), _feeds(model, ids))["logits"]
    want = run_onnx(trained_fp16, _feeds(model, ids))["logits"]
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
