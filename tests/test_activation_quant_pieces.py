"""The W8A8 passes' pieces against their definitions (passes/activation_quant.py): SmoothQuant's scales
(Xiao et al. 2022, eq. 4) for channels above and below 1, the per-tensor activation scale of an empty or
all-zero sample, the Q/DQ pair's scale and zero-point types, and the options both passes take."""

import numpy as np
import onnx_ir as ir
import pytest

from helpers import norm_matmul_graph
from passes import PassContext, make_pass
from passes.activation_quant import activation_scale, insert_qdq, smoothing_scales
from passes.quant_coverage import DEFAULT_MIN_COVERAGE
from passes.quantize_fp8_w8a8 import QuantizeFp8Pass
from passes.quantize_int8_sq import QuantizeInt8SqPass


def test_smoothing_scales_follow_the_definition_on_both_sides_of_one():
    amax_x = np.array([0.01, 0.5, 3.0, 40.0, 0.0], np.float32)
    amax_w = np.array([0.2, 0.05, 1.5, 0.01, 0.3], np.float32)
    for alpha in (0.0, 0.5, 0.85, 1.0):
        got = smoothing_scales(amax_x, amax_w, alpha)
        want = np.maximum(np.maximum(amax_x.astype(np.float64), 1e-5) ** alpha / np.maximum(amax_w, 1e-5) ** (1 - alpha), 1e-5)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert (smoothing_scales(amax_x, amax_w, 0.5) < 1).any()  # scales below 1 are kept, not clamped to 1


def test_activation_scale_of_an_empty_or_zero_sample_is_one():
    assert activation_scale(np.zeros((0, 4), np.float32), 448.0) == 1.0
    assert activation_scale(np.zeros((3, 4), np.float32), 127.0) == 1.0
    assert activation_scale(np.array([[0.5, -254.0]], np.float32), 127.0) == 2.0


@pytest.mark.parametrize("dtype, np_dtype", [(ir.DataType.FLOAT16, np.float16), (ir.DataType.FLOAT, np.float32)])
def test_qdq_scale_has_the_activations_type_and_the_zero_point_the_formats(dtype, np_dtype):
    x = ir.Value(name="x", type=ir.TensorType(dtype), shape=ir.Shape([1, 4]))
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 23})
    reader = ir.node("Identity", [x], name="reader")
    graph.append(reader)
    q, dq = insert_qdq(graph, x, [reader], 0.25, ir.DataType.INT8, np.zeros((), np.int8), "g0")
    scale, zero = q.inputs[1], q.inputs[2]
    assert scale.type.dtype == dtype and scale.const_value.numpy().dtype == np_dtype and float(scale.const_value.numpy()) == 0.25
    assert zero.type.dtype == ir.DataType.INT8 and zero.const_value.dtype == ir.DataType.INT8
    assert dq.inputs[1] is scale and dq.inputs[2] is zero and reader.inputs[0] is dq.outputs[0]


def test_qdq_refuses_an_activation_it_has_no_scale_type_for():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.BFLOAT16), shape=ir.Shape([1, 4]))
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 23})
    with pytest.raises(ValueError) as info:
        insert_qdq(graph, x, [], 1.0, ir.DataType.INT8, np.zeros((), np.int8), "layer0")
    assert str(info.value) == ("layer0: a BFLOAT16 activation gets no Q/DQ scale here (FP16 or FP32 only); "
                               "run cast-fp16 before the pass")


@pytest.mark.parametrize("cls", [QuantizeFp8Pass, QuantizeInt8SqPass])
def test_options_are_checked_and_kept(cls):
    p = cls({})
    assert p.include_lm_head is False and p.min_coverage == DEFAULT_MIN_COVERAGE
    p = cls({"a": 1}, include_lm_head=True, min_coverage=0.5, targets=["model.layers.1.*"], exclude=["*.o_proj"])
    assert (p.include_lm_head, p.min_coverage, p.targets, p.exclude) == (True, 0.5, ("model.layers.1.*",), ("*.o_proj",))
    for alpha in (0, 1, 0.5):
        assert cls({}, smoothing_alpha=alpha).alpha == alpha
    for alpha in (True, "0.5", -0.1, 1.5):
        with pytest.raises(ValueError, match="smoothing_alpha must be a number in"):
            cls({}, smoothing_alpha=alpha)


@pytest.mark.parametrize("name", ["quantize-fp8", "quantize-int8-sq"])
def test_made_from_the_build_context_with_the_recipe_options(name):
    acts = {"model.layers.0.self_attn.q_proj": np.zeros((4, 64), np.float32)}
    p = make_pass(name, PassContext(max_positions=256, activations=acts), {"smoothing_alpha": 0.25, "min_coverage": 0.5})
    assert p.activations is acts and p.alpha == 0.25 and p.min_coverage == 0.5


@pytest.mark.parametrize("sibling", [False, True])
def test_smoothing_folds_only_when_no_reader_outside_the_group_shares_the_input(sibling):
    model, gamma, activations = norm_matmul_graph(sibling=sibling)
    before = gamma.const_value.numpy().copy()
    QuantizeInt8SqPass(activations, smoothing_alpha=0.5)(model)
    assert (not np.array_equal(gamma.const_value.numpy(), before)) is (not sibling)
