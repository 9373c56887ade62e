"""quantize-int4-rtn, tested three ways: DQ(int4)+MatMul shape, onnxruntime semantics, TensorRT DEQUANTIZE layers."""

import numpy as np
import onnx_ir as ir
import pytest

from passes import QuantizeInt4RtnPass
from passes.quantize_int4_rtn import dequantize_blockwise, exact_product_scale, quantize_blockwise
from helpers import build_with_backend, op_counts, run_onnx, save

BLOCK = 32


def test_rtn_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((128, 48)) * 0.05).astype(np.float16)
    w[:32, 0] = 0  # an all-zero block must not divide by zero
    q, scale = quantize_blockwise(w, BLOCK)
    assert scale.shape == (128 // BLOCK, 48) and scale.dtype == np.float16
    qi = q.astype(np.int8)
    assert qi.min() >= -8 and qi.max() <= 7
    err = np.abs(dequantize_blockwise(q, scale, BLOCK).astype(np.float32) - w.astype(np.float32))
    step = np.repeat(scale.astype(np.float32), BLOCK, axis=0)
    # Half a quantization step, plus FP16 rounding of the scale (clipping at 7) and of the result.
    assert (err <= step * 0.51 + np.abs(w.astype(np.float32)) * 1e-3 + 1e-7).all()
    assert err.max() > step.min() / 8  # it really is 4-bit: errors are a sizeable fraction of a step
    assert (dequantize_blockwise(q, scale, BLOCK)[:32, 0] == 0).all()


def test_scales_round_up_so_that_every_int4_product_is_exact_in_fp16():
    """Every positive finite FP16 scale (subnormals included) x every int4 q: the product is exact in
    FP16 after rounding, so a kernel that dequantizes in FP32 computes the graph's FP16 weight."""
    s = np.arange(1, 0x7C00, dtype=np.uint16).view(np.float16)  # every positive finite FP16 ...
    s = s[s.astype(np.float32) * 8 < 65000]  # ... whose products can be finite (max|W| / 7 < 8e3)
    r = exact_product_scale(s)
    q = np.arange(-8, 8, dtype=np.float32)[:, None]
    exact = q * r.astype(np.float32)[None, :]
    assert np.array_equal(exact.astype(np.float16).astype(np.float32), exact)
    assert (r >= s).all()  # up, so max|W| / scale stays <= 7: no extra clipping
    normal = s >= 2**-14  # a small change of scale: relative for normal scales, < 8 subnormal steps below
    assert (r[normal].astype(np.float64) / s[normal].astype(np.float64) - 1).max() < 2**-7
    assert (r[~normal].astype(np.float64) - s[~normal].astype(np.float64)).max() <= 7 * 2**-24
    unrounded = q * s.astype(np.float32)[None, :]  # without it most products need more than FP16's 11 bits
    assert (unrounded.astype(np.float16).astype(np.float32) != unrounded).any(axis=0).mean() > 0.8
    assert exact_product_scale(np.float32([0.3]))[0] == np.float32(0.3)  # FP32 scales are left alone


def test_graph_shape_after(final_fp16_llama, llama):
    model = ir.load(final_fp16_llama)
    matmuls = op_counts(model)["MatMul"]
    assert QuantizeInt4RtnPass(BLOCK)(model).modified
    dqs = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 7 * llama.spec.num_layers == matmuls - 1  # every block projection; lm_head kept
    for dq in dqs:
        q, scale = dq.inputs[:2]
        assert q.dtype == ir.DataType.INT4 and scale.dtype == ir.DataType.FLOAT16
        assert dq.attributes["block_size"].as_int() == BLOCK and dq.attributes["axis"].as_int() == 0
        assert scale.shape[0] * BLOCK == q.shape[0] and len(dq.inputs) == 2  # symmetric: no zero point
    lm_head = next(n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name == "logits")
    assert lm_head.inputs[1].is_initializer() and lm_head.inputs[1].dtype == ir.DataType.FLOAT16
    assert not QuantizeInt4RtnPass(BLOCK)(model).modified  # nothing float left to quantize


def test_onnxruntime_computes_matmul_with_the_dequantized_weights(final_fp16_llama, tmp_path):
    """ORT(after) == ORT(before with every quantized weight replaced by its dequantized value)."""
    quantized = ir.load(final_fp16_llama)
    QuantizeInt4RtnPass(BLOCK)(quantized)
    reference = ir.load(final_fp16_llama)
    for node in quantized.graph:
        if node.op_type == "DequantizeLinear":
            name = node.outputs[0].name.removesuffix(".dequantized")
            q, scale = (v.const_value.numpy() for v in node.inputs[:2])
            init = reference.graph.initializers[name]
            init.const_value = ir.tensor(dequantize_blockwise(q, scale, BLOCK), name=name)
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 512, (2, 5)), "position_ids": np.tile(np.arange(5), (2, 1))}
    for v in reference.graph.inputs[2:]:
        feeds[v.name] = np.zeros([2 if not isinstance(d, int) else d for d in v.shape], np.float16)
    got = run_onnx(save(quantized, tmp_path / "q.onnx"), feeds)
    want = run_onnx(save(reference, tmp_path / "ref.onnx"), feeds)
    # Exact up to FP16 rounding: the numerics executor runs only onnxruntime's basic optimizations
    # (its extended DQ+MatMul fusion was measured 5.4 off on this graph, see runtime_onnx.py).
    np.testing.assert_allclose(got["logits"], want["logits"], atol=1e-3)
    assert (tmp_path / "q.onnx").stat().st_size < 0.6 * (tmp_path / "ref.onnx").stat().st_size


def test_backend_builds_dequantize_layers(final_fp16_llama, tmp_path):
    model = ir.load(final_fp16_llama)
    QuantizeInt4RtnPass(BLOCK)(model)
    engine = build_with_backend(save(model, tmp_path / "q.onnx"), tmp_path, max_seq=128)
    assert engine.layer_types.get("DEQUANTIZE") == op_counts(model)["DequantizeLinear"]


def test_rejects_unsupported_block_size():
    with pytest.raises(ValueError, match="block_size"):
        QuantizeInt4RtnPass(48)



def test_replaced_float_weights_are_released_during_the_pass(final_fp16_llama, monkeypatch):
    """Memory: each float weight is freed once its quantized form is in the graph, not at the pass's
    end (on a 1B model the FP16 weights piling up beside the INT4 ones cost +2 GB)."""
    import gc
    import weakref

    from passes import weight_quant

    model = ir.load(final_fp16_llama)
    before = {v.name: weakref.ref(v.const_value) for v in model.graph.initializers.values()}
    alive_at_each_replacement = []
    real = weight_quant.replace_weight

    def spy(graph, target, qw, dtype):
        gc.collect()  # what is still referenced, not what is merely not yet collected
        alive_at_each_replacement.append(sum(1 for n, r in before.items() if r() is not None))
        real(graph, target, qw, dtype)

    monkeypatch.setattr(weight_quant, "replace_weight", spy)
    QuantizeInt4RtnPass(BLOCK)(model)
    gc.collect()
    replaced = [n for n in before if n not in model.graph.initializers]
    assert len(replaced) == len(alive_at_each_replacement) > 0
    assert all(before[n]() is None for n in replaced)
    # One fewer live float tensor at every step: the previous weight was already gone.
    assert alive_at_each_replacement == list(range(len(before), len(before) - len(replaced), -1))


def test_quantize_blockwise_is_the_same_in_column_chunks(monkeypatch):
    """Chunked over output columns (uneven last chunk, with and without AWQ's clip ranges), the int4
    values and scales are those of one pass over the whole weight."""
    import passes.quantize_int4_rtn as rtn

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((256, 1000)) * rng.uniform(0, 3, (1, 1000))).astype(np.float16)
    w[:, 7] = 0  # an all-zero column: scale 1
    clip = rng.uniform(0.5, 1.0, (2, 1000)).astype(np.float32)
    for c in (None, clip):
        whole = rtn.quantize_blockwise(w, 128, c)
        monkeypatch.setattr(rtn, "QUANTIZE_CHUNK", 256 * 96)  # 96 columns a step: 11 chunks, the last 40 wide
        chunked = rtn.quantize_blockwise(w, 128, c)
        monkeypatch.undo()
        assert whole[0].dtype == chunked[0].dtype and whole[1].dtype == chunked[1].dtype == np.float16
        assert np.array_equal(whole[0].astype(np.int8), chunked[0].astype(np.int8))
        assert np.array_equal(whole[1].view(np.int16), chunked[1].view(np.int16))


def independent_rtn(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 RTN written from the pass's contract, not its code: each block's scale is
    max|W| / 7 as an FP16 number, rounded *up* to 8 significant bits (a multiple of 2**-21 below FP16's
    normal range), so that |q| <= 8 times it needs at most 11 bits; q = clip(round(W / scale), -8, 7)."""
    k, n = w.shape
    amax = np.abs(w.astype(np.float64)).reshape(k // block, block, n).max(axis=1)
    fp16 = (amax.astype(np.float32) / np.float32(7)).astype(np.float16).astype(np.float64)
    fp16[fp16 == 0] = 1.0
    _, exponent = np.frexp(fp16)  # fp16 = m * 2**exponent, m in [0.5, 1)
    step = np.maximum(np.ldexp(1.0, exponent - 8), 2.0**-21)
    scale = np.ceil(fp16 / step) * step
    q = np.clip(np.rint(w.astype(np.float64) / np.repeat(scale, block, axis=0)), -8, 7)
    return q, scale


def one_matmul_graph(w: np.ndarray) -> ir.Model:
    """y = x @ W with W an FP16 initializer, under a module name the pass's default targets select."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = w.shape
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="model.layers.0.mlp.down_proj")],
                              "one_matmul", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["b", n])],
                              [numpy_helper.from_array(w, "w")])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]))


def test_onnxruntime_weights_equal_an_independent_rtn_exactly():
    """The graph's int4 values and scales are those of `independent_rtn`, bit for bit, and onnxruntime's
    DequantizeLinear computes exactly q * scale (x = identity makes y the dequantized weight, with no
    rounding in the MatMul). Weight magnitudes span 1e-6..4 per column, subnormal scales included."""
    import onnxruntime as ort

    rng = np.random.default_rng(5)
    k, n = 128, 96
    w = (rng.standard_normal((k, n)) * np.geomspace(1e-6, 4, n)[None, :]).astype(np.float16)
    w[:BLOCK, 3] = 0  # an all-zero block: scale 1
    model = one_matmul_graph(w)
    assert QuantizeInt4RtnPass(BLOCK)(model).modified
    dq = next(node for node in model.graph if node.op_type == "DequantizeLinear")
    q, scale = (v.const_value.numpy() for v in dq.inputs[:2])
    q_ref, scale_ref = independent_rtn(w, BLOCK)
    assert (scale_ref < 2.0**-14).any() and (scale_ref > 0.1).any()  # subnormal and large scales both covered
    np.testing.assert_array_equal(scale.astype(np.float64), scale_ref)
    np.testing.assert_array_equal(q.astype(np.float64), q_ref)

    options = ort.SessionOptions()  # basic, as the numerics executor: "all" fuses DQ + MatMul into MatMulNBits
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    y = session.run(["y"], {"x": np.eye(k, dtype=np.float16)})[0]
    exact = q_ref * np.repeat(scale_ref, BLOCK, axis=0)  # float64: every product is exact
    np.testing.assert_array_equal(y.astype(np.float64), exact)
    assert np.abs(exact - w.astype(np.float64)).max() <= 0.5 * scale_ref.max() * (1 + 2**-7)  # it did quantize


def test_clip_ranges_shrink_the_scale_and_clipping_keeps_int4():
    """AWQ's clip search hands quantize_blockwise a range per block in (0, 1]: the scale is max|W| / 7
    times it (then rounded up as always), and the values it pushes past the range clip to [-8, 7]."""
    import ml_dtypes

    rng = np.random.default_rng(8)
    w = (rng.standard_normal((64, 40)) * 0.1).astype(np.float16)
    clip = rng.uniform(0.4, 1.0, (2, 40)).astype(np.float32)
    q, scale = quantize_blockwise(w, BLOCK, clip)
    assert q.dtype == ml_dtypes.int4 and scale.dtype == np.float16
    amax = np.abs(w.astype(np.float32)).reshape(2, BLOCK, 40).max(axis=1)
    _, scale_ref = independent_rtn((np.repeat(amax / 7 * clip * 7, BLOCK, axis=0)).astype(np.float32), BLOCK)
    np.testing.assert_array_equal(scale.astype(np.float64), scale_ref)
    want = np.clip(np.rint(w.astype(np.float64) / np.repeat(scale_ref, BLOCK, axis=0)), -8, 7)
    np.testing.assert_array_equal(q.astype(np.float64), want)
    assert (want == -8).any() and (want == 7).any() and (q.astype(np.int8) >= -8).all()  # clipping happened


def test_column_slices_cover_the_columns_once_in_chunks_of_the_budget():
    from passes.quantize_int4_rtn import column_slices

    assert column_slices(256, 1000, 256 * 96) == [slice(i, min(1000, i + 96)) for i in range(0, 1000, 96)]
    assert column_slices(4096, 10, 100) == [slice(i, i + 1) for i in range(10)]  # at least one column
    assert column_slices(1, 5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert column_slices(0, 3, 2) == [slice(0, 2), slice(2, 3)]  # K = 0: no division by zero


def test_scales_that_would_round_up_to_infinity_round_down():
    """Near FP16's largest value the multiple of 8 above is infinite: the one below is taken instead."""
    s = np.array([65504.0, 65472.0, 65440.0], np.float16)
    r = exact_product_scale(s)
    assert np.isfinite(r).all() and (r.view(np.uint16) % 8 == 0).all() and (r <= s).all()
    assert r.tolist() == [65280.0, 65280.0, 65280.0]  # bit pattern 0x7BF8: the multiple of 8 below 0x7BFF


def test_defaults_are_block_128_without_the_lm_head():
    p = QuantizeInt4RtnPass()
    assert p.block == 128 and p.block_for(4096) == (128, None) and p.include_lm_head is False
