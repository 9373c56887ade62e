"""quantize-fp8 (FP8 E4M3 weights and activations), tested three ways: graph shape (a calibrated Q/DQ
pair on each targeted MatMul's input, FP8 per-channel weight DQs), onnxruntime against a numpy
fake-quantization (ml_dtypes' E4M3 rounding, the scales recomputed here from the calibration sample),
and TensorRT(-RTX) parse + build with QUANTIZE layers in the network."""

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest

from compiler.engine.trt_logger import process_logger
from passes import PassContext, QuantizeFp8Pass, make_pass
from passes.weight_quant import matching_matmuls, module_name
from helpers import build_with_backend, held_out_ids, op_counts, run_onnx, run_small, trained_feeds

E4M3_MAX = 448.0  # OCP FP8 spec: E4M3's largest finite magnitude (1.75 x 2^8)
GROUPS_PER_LAYER = 4  # q/k/v share one input, gate/up another; o_proj and down_proj one each


def fake_quant_e4m3(x: np.ndarray, scale: float) -> np.ndarray:
    """QuantizeLinear(saturate=1) -> DequantizeLinear on an FP16 tensor, step by step in FP16 as ONNX
    defines them for that type: x / scale rounded to FP16, then to E4M3 (nearest even, clamped at
    448), then q x scale rounded to FP16. (The FP16 division matters: 68.007 becomes 68.0, a tie
    that E4M3 rounds down to 64, where the exact quotient rounds up to 72.)"""
    s16 = np.float16(scale)
    quotient = (x.astype(np.float16) / s16).astype(np.float32)
    q = np.clip(quotient, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return (q.astype(np.float32) * np.float32(s16)).astype(np.float16).astype(np.float32)


def fake_quant_weight(w_KN: np.ndarray) -> np.ndarray:
    """Per output channel: each column's max |w| maps to 448, rounded to E4M3, scale kept in w's dtype."""
    scale = (np.abs(w_KN.astype(np.float32)).max(axis=0) / E4M3_MAX).astype(w_KN.dtype).astype(np.float32)
    return (w_KN.astype(np.float32) / scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale


# -- one MatMul: the pass's arithmetic against numpy ----------------------------------------------

K, N = 64, 48


def one_matmul(w_KN: np.ndarray) -> ir.Model:
    """x[b, s, K] @ W -> y, the MatMul named as a decoder projection (the exporter's scope metadata)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape(["b", "s", K]))
    w = ir.Value(name="w", const_value=ir.tensor(w_KN, name="w"), type=ir.TensorType(ir.DataType.FLOAT16),
                 shape=ir.Shape([K, N]))
    mm = ir.node("MatMul", [x, w], name="mm")
    mm.metadata_props["pkg.torch.onnx.name_scopes"] = "['model', 'model.layers.0.mlp.down_proj', 'linear']"
    mm.outputs[0].name, mm.outputs[0].type, mm.outputs[0].shape = "y", ir.TensorType(ir.DataType.FLOAT16), ir.Shape(["b", "s", N])
    graph = ir.Graph([x], [mm.outputs[0]], nodes=[mm], initializers=[w], opset_imports={"": 23}, name="g")
    return ir.Model(graph, ir_version=11)


@pytest.fixture
def weight_and_sample():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float16)
    sample = rng.standard_normal((200, K)).astype(np.float32)
    sample[:, 5] *= 20  # an outlier channel sets the per-tensor amax
    return w, sample


def test_one_matmul_equals_numpy_fake_quantization(weight_and_sample):
    w, sample = weight_and_sample
    model = one_matmul(w)
    pass_ = QuantizeFp8Pass({"model.layers.0.mlp.down_proj": sample})
    assert pass_(model).modified and pass_.quantized == ["model.layers.0.mlp.down_proj"]
    scale = np.float16(np.abs(sample).max() / E4M3_MAX)  # FP16 graph: the scale is stored in FP16
    assert pass_.activation_scales["model.layers.0.mlp.down_proj"] == pytest.approx(float(np.abs(sample).max() / E4M3_MAX))
    x = (np.random.default_rng(1).standard_normal((2, 7, K)) * np.abs(sample).max() / 4).astype(np.float16)
    got = run_small(model, x)
    xq, wq = fake_quant_e4m3(x, float(scale)), fake_quant_weight(w)
    want = xq @ wq
    # Both operands are the same FP16 numbers on both sides; what is left is FP16 accumulation: a few
    # units of 2^-11 of the sum of |terms| (the terms cancel: a sum can be far smaller than its terms).
    bound = 4 * 2.0 ** -11 * (np.abs(xq) @ np.abs(wq))
    assert (np.abs(got - want) <= bound).all(), float(np.max(np.abs(got - want) / bound))
    # And the activation rounding is really there: without it the result is further from what the graph computes.
    unquantized = x.astype(np.float32) @ fake_quant_weight(w)
    assert np.abs(got - unquantized).max() > 10 * np.abs(got - want).max()


def test_activation_beyond_the_calibrated_range_saturates(weight_and_sample):
    """An input 10x the calibrated amax comes out as amax (E4M3's 448 x scale), not as itself: the
    calibrated scale, not the input's own range, decides what the GEMM sees."""
    w, sample = weight_and_sample
    model = one_matmul(w)
    QuantizeFp8Pass({"model.layers.0.mlp.down_proj": sample})(model)
    amax = float(np.abs(sample).max())
    scale = float(np.float16(amax / E4M3_MAX))
    x = np.zeros((1, 2, K), np.float16)
    x[0, 0, 3], x[0, 1, 3] = 10 * amax, -0.5 * amax
    got = run_small(model, x)
    w_dq = fake_quant_weight(w)
    saturated = E4M3_MAX * scale * w_dq[3]  # row 3 of W times the clipped input
    np.testing.assert_allclose(got[0, 0], saturated, rtol=2e-3, atol=1e-3)
    assert np.abs(got[0, 0] - 10 * amax * w_dq[3]).max() > 5 * np.abs(saturated).max()
    np.testing.assert_allclose(got[0, 1], fake_quant_e4m3(x[0, 1], scale) @ w_dq, rtol=2e-3, atol=1e-3)  # in range: kept


def test_one_matmul_builds_with_tensorrt(weight_and_sample):
    """TensorRT-RTX parses the FP8 Q/DQ pair and the FP8 weight DQ around the MatMul and builds an
    engine (a CPU build: nothing executes, no GPU's FP8 kernels are chosen here)."""
    trt = pytest.importorskip("tensorrt_rtx")
    w, sample = weight_and_sample
    model = one_matmul(w)
    QuantizeFp8Pass({"model.layers.0.mlp.down_proj": sample})(model)
    proto = ir.serde.serialize_model(model)
    logger = process_logger(trt)  # one per process: TensorRT keeps the first
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    assert parser.parse(proto.SerializeToString()), [str(parser.get_error(i)) for i in range(parser.num_errors)]
    layers = [network.get_layer(i) for i in range(network.num_layers)]
    quantize = [layer for layer in layers if layer.type == trt.LayerType.QUANTIZE]
    assert len(quantize) == 1 and quantize[0].get_output(0).dtype == trt.fp8  # FP8, not INT8
    dequantize = [layer for layer in layers if layer.type == trt.LayerType.DEQUANTIZE]
    assert len(dequantize) == 2
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("x", (1, 1, K), (1, 8, K), (2, 16, K))
    config.add_optimization_profile(profile)
    assert builder.build_serialized_network(network, config) is not None


def test_needs_calibration_and_checks_its_options():
    assert QuantizeFp8Pass.needs_calibration
    with pytest.raises(ValueError, match="needs calibration activations"):
        make_pass("quantize-fp8", PassContext(max_positions=64)).requires(one_matmul(np.ones((K, N), np.float16)))
    with pytest.raises(ValueError, match=r"smoothing_alpha must be a number in \[0, 1\]"):
        QuantizeFp8Pass({}, smoothing_alpha=1.5)


def test_a_target_without_a_sample_stays_weight_only(weight_and_sample):
    w, _ = weight_and_sample
    model = one_matmul(w)
    pass_ = QuantizeFp8Pass({"model.layers.1.mlp.down_proj": np.ones((4, K), np.float32)})
    pass_(model)
    assert pass_.fallbacks == ["model.layers.0.mlp.down_proj"] and pass_.quantized == ["model.layers.0.mlp.down_proj"]
    assert op_counts(model) == {"DequantizeLinear": 1, "MatMul": 1}


# -- the trained model ------------------------------------------------------------------------------


def test_graph_shape_after(trained_fp16, trained_calibration, trained):
    model = ir.load(trained_fp16)
    before = op_counts(model)
    activations = trained_calibration.activations
    pass_ = QuantizeFp8Pass(activations)
    assert pass_(model).modified and not pass_.fallbacks and not pass_.smoothed
    layers = trained.spec.num_layers
    quantizes = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(quantizes) == GROUPS_PER_LAYER * layers and len(dqs) == (7 + GROUPS_PER_LAYER) * layers
    assert len(model.graph) == sum(before.values()) + len(quantizes) + len(dqs)
    assert not [t for t in matching_matmuls(model) if t.skipped is None]
    for q in quantizes:
        x, scale, zero = q.inputs
        assert x.dtype == ir.DataType.FLOAT16 and scale.dtype == ir.DataType.FLOAT16 and scale.shape.rank() == 0
        assert zero.dtype == ir.DataType.FLOAT8E4M3FN and float(zero.const_value.numpy()) == 0
        (dq, _), = q.outputs[0].uses()
        assert dq.op_type == "DequantizeLinear" and dq.inputs[1] is scale and dq.inputs[2] is zero
        matmuls = [node for node, _ in dq.outputs[0].uses()]
        assert matmuls and all(m.op_type == "MatMul" for m in matmuls)
        for m in matmuls:
            weight_dq = m.inputs[1].producer()
            assert weight_dq.op_type == "DequantizeLinear" and weight_dq.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN
            assert weight_dq.attributes["axis"].as_int() == 1
            # The scale is this matmul's calibrated input amax / 448 in FP16, recomputed here from its sample.
            amax = float(np.abs(activations[module_name(m)]).max())
            assert float(scale.const_value.numpy()) == float(np.float16(amax / E4M3_MAX))
    assert sorted(pass_.activation_scales) == sorted(pass_.quantized)


def test_onnxruntime_close_to_fp16_and_to_weight_only(trained_fp16, trained_quantized, trained):
    """The activation quantization costs a bounded amount beyond the weight-only FP8 graph (same weights),
    and both stay near FP16 on real text (logits span about +-15)."""
    ids = held_out_ids(trained)
    w8a8, wo = trained_quantized("quantize-fp8"), trained_quantized("quantize-fp8-wo")
    model = ir.load(trained_fp16)
    feeds = trained_feeds(model, ids)
    fp16 = run_onnx(trained_fp16, feeds)["logits"]
    got, weight_only = run_onnx(w8a8, feeds)["logits"], run_onnx(wo, feeds)["logits"]
    assert not np.array_equal(got, weight_only)  # the activation Q/DQ changes something
    rms = lambda a: float(np.sqrt(np.mean(a ** 2)))  # noqa: E731
    assert rms(got - fp16) < 0.1 * rms(fp16)
    assert (got.argmax(-1) == fp16.argmax(-1)).mean() > 0.9
    assert rms(got - weight_only) < 0.1 * rms(fp16)


def test_backend_builds_quantize_layers(trained_quantized, tmp_path):
    path = trained_quantized("quantize-fp8")
    model = ir.load(path)
    engine = build_with_backend(path, tmp_path, max_seq=128)
    counts = op_counts(model)
    assert engine.layer_types.get("QUANTIZE") == counts["QuantizeLinear"]
    assert engine.layer_types.get("DEQUANTIZE") == counts["DequantizeLinear"]
