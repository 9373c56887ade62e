"""Where AWQ folds 1/s (passes/quantize_int4_awq.py, `_fold_target`): into the RMSNorm weight that feeds a
group's MatMuls (through a Cast, as residual-fp32 leaves on Gemma 3), or into the columns of the up_proj
MatMul that feeds down_proj through a Mul; nowhere else. A fold in the wrong place, or one into a weight
another consumer also reads, would change the model; these graphs are built by hand so every case is
one the real exports may or may not contain."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from passes.quantize_int4_awq import QuantizeInt4AwqPass

fold_target = QuantizeInt4AwqPass._fold_target
H = 4
S = np.array([1.0, 2.0, 4.0, 0.5], np.float32)


def value(name, shape=(1, H), dtype=ir.DataType.FLOAT):
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))


def initializer(graph, name, array):
    v = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(array.shape)),
                 const_value=ir.tensor(array, name=name))
    graph.register_initializer(v)
    return v


def consumer(graph, x, name="consumer"):
    """A MatMul reading x, so x has a use."""
    w = initializer(graph, f"{name}.w", np.ones((H, H), np.float32))
    node = ir.node("MatMul", [x, w], name=name)
    graph.append(node)
    return node


def norm_graph(cast=False, cast_domain="", extra_norm_use=False, gamma_initializer=True, gamma_shared=False):
    x = value("x")
    graph = ir.Graph([x], [], nodes=[], name="g")
    gamma_array = np.arange(1, H + 1, dtype=np.float32)
    if gamma_initializer:
        gamma = initializer(graph, "gamma", gamma_array)
    else:
        gamma = value("gamma", (H,))
        graph.inputs.append(gamma)
    norm = ir.node("RMSNormalization", [x, gamma], name="norm")
    graph.append(norm)
    out = norm.outputs[0]
    if gamma_shared:
        graph.append(ir.node("Identity", [gamma], name="other_gamma_reader"))
    if cast:
        c = ir.node("Cast", [out], attributes={"to": ir.DataType.FLOAT16}, domain=cast_domain, name="cast")
        graph.append(c)
        if extra_norm_use:
            consumer(graph, out, "other_reader")
        out = c.outputs[0]
    consumer(graph, out)
    return graph, gamma, gamma_array, out


def test_the_norm_weight_absorbs_1_over_s():
    graph, gamma, before, out = norm_graph()
    fold = fold_target(out, ir.Model(graph, ir_version=10))
    fold(S)
    np.testing.assert_array_equal(gamma.const_value.numpy(), before / S)
    assert gamma.const_value.numpy().dtype == before.dtype  # the weight keeps its dtype


def test_through_a_cast_the_norm_still_absorbs_it():
    graph, gamma, before, out = norm_graph(cast=True)
    fold_target(out, ir.Model(graph, ir_version=10))(S)
    np.testing.assert_array_equal(gamma.const_value.numpy(), before / S)


@pytest.mark.parametrize("case", ["cast read by another node", "cast of a custom domain", "gamma a graph input",
                                  "gamma read by another node"])
def test_no_fold_where_it_would_change_another_reader_or_is_not_a_plain_cast(case):
    graph, gamma, before, out = norm_graph(
        cast=case.startswith("cast"), cast_domain="custom" if case == "cast of a custom domain" else "",
        extra_norm_use=case == "cast read by another node", gamma_initializer=case != "gamma a graph input",
        gamma_shared=case == "gamma read by another node")
    assert fold_target(out, ir.Model(graph, ir_version=10)) is None


def test_a_value_without_producer_or_readers_has_no_fold_target():
    graph, _, _, out = norm_graph()
    model = ir.Model(graph, ir_version=10)
    assert fold_target(graph.inputs[0], model) is None  # a graph input: no producer
    unread = ir.node("RMSNormalization", [graph.inputs[0], graph.initializers["gamma"]], name="unread")
    graph.append(unread)
    assert fold_target(unread.outputs[0], model) is None


def mul_graph(w_shared=False, product_shared=False, other_op=False, joined_by="Mul"):
    """up_proj(x) * act(gate(x)) -> down_proj: 1/s folds into up_proj's output columns."""
    x = value("x")
    graph = ir.Graph([x], [], nodes=[], name="g")
    w_array = np.arange(H * H, dtype=np.float32).reshape(H, H) + 1
    w = initializer(graph, "up.w", w_array)
    up = ir.node("Add" if other_op else "MatMul", [x, w], name="up")
    gate = ir.node("Sigmoid", [x], name="gate")
    graph.append(up)
    graph.append(gate)
    if w_shared:
        graph.append(ir.node("Identity", [w], name="other_w_reader"))
    if product_shared:
        consumer(graph, up.outputs[0], "other_up_reader")
    mul = ir.node(joined_by, [gate.outputs[0], up.outputs[0]], name="mul")
    graph.append(mul)
    consumer(graph, mul.outputs[0])
    return graph, w, w_array, mul.outputs[0]


def test_the_up_projection_columns_absorb_1_over_s():
    graph, w, before, out = mul_graph()
    fold_target(out, ir.Model(graph, ir_version=10))(S)
    np.testing.assert_array_equal(w.const_value.numpy(), before / S[None, :])
    assert w.const_value.numpy().dtype == before.dtype


@pytest.mark.parametrize("case", ["weight read elsewhere", "product read elsewhere", "not a MatMul", "joined by Add"])
def test_no_fold_into_a_shared_or_non_matmul_producer(case):
    """Only a Mul passes the scale through to one operand: an Add of the up projection does not."""
    graph, _, _, out = mul_graph(w_shared=case == "weight read elsewhere",
                                 product_shared=case == "product read elsewhere", other_op=case == "not a MatMul",
                                 joined_by="Add" if case == "joined by Add" else "Mul")
    assert fold_target(out, ir.Model(graph, ir_version=10)) is None
