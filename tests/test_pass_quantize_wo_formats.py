"""quantize-int8-wo and quantize-fp8-wo, tested three ways: DQ+MatMul shape, onnxruntime semantics, TensorRT DEQUANTIZE layers."""

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from passes import QuantizeFp8WoPass, QuantizeInt8WoPass
from passes.quantize_fp8_wo import E4M3_MAX, quantize_per_channel_fp8
from passes.quantize_int8_wo import quantize_per_channel_int8
from passes.weight_quant import matching_matmuls
from helpers import build_with_backend, op_counts, run_onnx, save

FORMATS = {"int8": (QuantizeInt8WoPass, ir.DataType.INT8), "fp8": (QuantizeFp8WoPass, ir.DataType.FLOAT8E4M3FN)}


def test_int8_per_channel_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((64, 40)) * 0.05).astype(np.float16)
    w[:, 3] = 0  # an all-zero channel must not divide by zero
    qw = quantize_per_channel_int8(w)
    assert qw.q.dtype == np.int8 and qw.scale.shape == (40,) and qw.axis == 1
    assert np.abs(qw.q.astype(np.int32)).max() == 127
    err = np.abs(qw.dequantize().astype(np.float32) - w.astype(np.float32))
    assert (err <= qw.scale.astype(np.float32)[None] * 0.51 + np.abs(w.astype(np.float32)) * 1e-3 + 1e-7).all()
    assert (qw.dequantize()[:, 3] == 0).all()


def test_fp8_per_channel_relative_error_is_e4m3s():
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((64, 40)) * 0.05).astype(np.float16)
    qw = quantize_per_channel_fp8(w)
    assert qw.q.dtype == ml_dtypes.float8_e4m3fn and qw.scale.shape == (40,)
    assert np.abs(qw.q.astype(np.float32)).max() == pytest.approx(E4M3_MAX, rel=1e-3)  # each channel's max -> 448
    w32, dq = w.astype(np.float32), qw.dequantize().astype(np.float32)
    normal = np.abs(w32) > 2 ** -6 * qw.scale.astype(np.float32)[None] * 4  # away from E4M3's subnormals
    assert (np.abs(dq - w32)[normal] <= np.abs(w32)[normal] * 2 ** -4 + 1e-4).all()  # 3 mantissa bits: <= 1/16 relative


@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_shape_after(final_fp16_llama, llama, fmt):
    cls, dtype = FORMATS[fmt]
    model = ir.load(final_fp16_llama)
    counts = op_counts(model)
    pass_ = cls()
    assert pass_(model).modified
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 7 * llama.spec.num_layers == counts["MatMul"] - 1 == len(pass_.quantized)
    assert len(model.graph) == sum(counts.values()) + len(dqs)  # one DQ per weight, nothing else added
    for dq in dqs:
        q, scale = dq.inputs[:2]
        assert q.dtype == dtype and scale.dtype == ir.DataType.FLOAT16 and len(dq.inputs) == 2
        assert dq.attributes["axis"].as_int() == 1 and scale.shape[0] == q.shape[1]
        assert "block_size" not in dq.attributes
    # No float weight left on a quantized MatMul; lm_head kept in FP16.
    assert not [t for t in matching_matmuls(model) if t.skipped is None]
    lm_head = next(n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name == "logits")
    assert lm_head.inputs[1].dtype == ir.DataType.FLOAT16
    assert sorted(pass_.quantized)[0] == "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("fmt", FORMATS)
def test_onnxruntime_matches_dequantized_weights(final_fp16_llama, tmp_path, fmt):
    """ORT(after) == ORT(before with each weight replaced by its dequantized value), and close to FP16."""
    cls, _ = FORMATS[fmt]
    quantized = ir.load(final_fp16_llama)
    cls()(quantized)
    reference = ir.load(final_fp16_llama)
    for node in quantized.graph:
        if node.op_type == "DequantizeLinear":
            name = node.outputs[0].name.removesuffix(".dequantized")
            q, scale = (v.const_value.numpy() for v in node.inputs[:2])
            dq = (q.astype(np.float32) * scale.astype(np.float32)[None]).astype(np.float16)
            reference.graph.initializers[name].const_value = ir.tensor(dq, name=name)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 512, (2, 5)), "position_ids": np.tile(np.arange(5), (2, 1))}
    for v in reference.graph.inputs[2:]:
        feeds[v.name] = np.zeros([2 if not isinstance(d, int) else d for d in v.shape], np.float16)
    got = run_onnx(save(quantized, tmp_path / "q.onnx"), feeds)["logits"]
    want = run_onnx(save(reference, tmp_path / "ref.onnx"), feeds)["logits"]
    fp16 = run_onnx(final_fp16_llama, feeds)["logits"]
    np.testing.assert_allclose(got, want, atol=2e-3)
    # And an 8-bit weight stays near the FP16 graph (logits of this random model span about +-3).
    assert np.abs(got - fp16).max() < (0.1 if fmt == "int8" else 0.5)  # E4M3: up to 1/16 relative per weight
    # Each quantized weight went from 2 bytes to 1 (plus one FP16 scale per output channel).
    params = sum(n.inputs[0].const_value.size for n in quantized.graph if n.op_type == "DequantizeLinear")
    saved = final_fp16_llama.stat().st_size - (tmp_path / "q.onnx").stat().st_size
    assert 0.8 * params < saved <= params  # (scales and names take the rest)


@pytest.mark.parametrize("fmt", FORMATS)
def test_backend_builds_dequantize_layers(final_fp16_llama, tmp_path, fmt):
    cls, _ = FORMATS[fmt]
    model = ir.load(final_fp16_llama)
    cls()(model)
    engine = build_with_backend(save(model, tmp_path / "q.onnx"), tmp_path, max_seq=128)
    assert engine.layer_types.get("DEQUANTIZE") == op_counts(model)["DequantizeLinear"]


def test_targets_and_exclude_select_by_module_name(final_fp16_llama, llama):
    model = ir.load(final_fp16_llama)
    pass_ = QuantizeInt8WoPass(targets=["model.layers.*.mlp.*"], exclude=["model.layers.0.*"])
    pass_(model)
    assert sorted(pass_.quantized) == sorted(f"model.layers.{i}.mlp.{p}" for i in range(1, llama.spec.num_layers)
                                             for p in ("gate_proj", "up_proj", "down_proj"))
    with pytest.raises(TypeError, match="lists"):
        QuantizeInt8WoPass(targets="model.layers.*")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("quantize", [quantize_per_channel_int8, quantize_per_channel_fp8], ids=["int8", "fp8"])
def test_a_zero_channel_gets_a_positive_scale_in_the_weights_dtype(quantize, dtype):
    """An all-zero output channel is quantized without computing 0 / 0 (numpy's errors raise here) to
    zeros with a positive finite scale; every scale has the weight's dtype, which is the DequantizeLinear's
    output type (FP16 in an FP16 graph, where the MatMul needs FP16)."""
    w = (np.random.default_rng(2).standard_normal((32, 6)) * 0.05).astype(dtype)
    w[:, 2] = 0
    with np.errstate(all="raise"):
        qw = quantize(w)
    scale = qw.scale
    assert scale.dtype == dtype and np.isfinite(scale).all() and (scale > 0).all()
    assert (qw.q[:, 2].astype(np.float32) == 0).all() and (qw.dequantize()[:, 2] == 0).all()
    assert qw.dequantize().dtype == dtype
