"""cast-fp16, tested three ways: no FP32 left, onnxruntime FP16 vs FP32 within FP16 tolerance, backend builds."""

import numpy as np
import onnx_ir as ir
import pytest

from passes import CastFp16Pass, Rotary2DCachePass
from helpers import build_with_backend, feeds_with_past, run_onnx, save


def test_graph_has_no_fp32_tensor_after(fresh_llama_model, llama_export):
    _, io = llama_export
    model = fresh_llama_model
    assert CastFp16Pass()(model).modified
    F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]
    values += [v for n in model.graph for v in n.outputs]
    assert not [v.name for v in values if v.dtype == F32]
    assert {v.dtype for v in model.graph.inputs if v.name in io.past_names} == {F16}
    assert model.graph.outputs[0].dtype == F16


def test_onnxruntime_fp16_close_to_fp32(fresh_llama_model, llama_export, tmp_path):
    path, io = llama_export
    feeds32 = feeds_with_past(io, np.float32)
    before = run_onnx(path, feeds32)
    CastFp16Pass()(fresh_llama_model)
    feeds16 = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in feeds32.items()}
    after = run_onnx(save(fresh_llama_model, tmp_path / "fp16.onnx"), feeds16)
    # FP16 keeps ~3 significant digits; logits of the tiny model are O(1): 2e-2 absolute.
    np.testing.assert_allclose(after["logits"], before["logits"], atol=2e-2)
    assert np.argmax(after["logits"], -1).tolist() == np.argmax(before["logits"], -1).tolist()


def test_clamps_out_of_range_constants():
    big = ir.Value(name="big", const_value=ir.tensor(np.array([-3.4e38, 1.0, 1e6], np.float32), name="big"))
    big.type, big.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([3])
    node = ir.node("Identity", [big])
    node.outputs[0].name, node.outputs[0].type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([], node.outputs, nodes=[node], initializers=[big], opset_imports={"": 23})
    model = ir.Model(graph, ir_version=10)
    CastFp16Pass()(model)
    arr = model.graph.initializers["big"].const_value.numpy()
    assert arr.dtype == np.float16 and np.isfinite(arr).all() and arr[0] == -65504


def test_backend_parses_and_builds_fp16_graph(fresh_llama_model, tmp_path):
    Rotary2DCachePass(64)(fresh_llama_model)
    CastFp16Pass()(fresh_llama_model)
    engine = build_with_backend(save(fresh_llama_model, tmp_path / "m.onnx"), tmp_path)
    assert engine.layer_types.get("ATTENTION_INPUT", 0) == 2  # native attention: needs FP16
    assert {t.dtype for t in engine.tensors if t.name.startswith(("past", "present", "logits"))} == {"float16"}


def _one_node_graph(branch: str) -> ir.Model:
    """A graph whose only FP32 is what `branch` names; intermediate values carry no type, so the pass
    reports a change only through that branch. The output is cast to FP16 at the end."""
    from onnx import TensorProto, helper, numpy_helper

    f32 = numpy_helper.from_array(np.array([0.5, -3.4e38, 1e6], np.float32))
    nodes, inputs, inits = [], [], []
    if branch == "cast":
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [3]))
        nodes.append(helper.make_node("Cast", ["ids"], ["v"], to=TensorProto.FLOAT))
    elif branch == "constant":
        nodes.append(helper.make_node("Constant", [], ["v"], value=f32))
    elif branch == "constant_of_shape":
        nodes.append(helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([3], np.int64))))
        nodes.append(helper.make_node("ConstantOfShape", ["shape"], ["v"],
                                      value=numpy_helper.from_array(np.array([-3.4e38], np.float32))))
    elif branch == "value_float":
        nodes.append(helper.make_node("Constant", [], ["v"], value_float=1e6))
    elif branch == "value_floats":
        nodes.append(helper.make_node("Constant", [], ["v"], value_floats=[0.5, -3.4e38, 1e6]))
    elif branch == "initializer":
        inits.append(numpy_helper.from_array(np.array([0.5, -3.4e38, 1e6], np.float32), "v"))
    elif branch == "input":
        inputs.append(helper.make_tensor_value_info("v", TensorProto.FLOAT, [3]))
    elif branch == "subgraph":  # a Cast to FP32 inside an If's branches
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [3]))
        inputs.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
        body = [helper.make_graph([helper.make_node("Cast", ["ids"], [f"b{i}"], to=TensorProto.FLOAT)], f"body{i}", [],
                                  [helper.make_tensor_value_info(f"b{i}", TensorProto.FLOAT, [3])]) for i in (0, 1)]
        nodes.append(helper.make_node("If", ["flag"], ["v"], then_branch=body[0], else_branch=body[1]))
    nodes.append(helper.make_node("Cast", ["v"], ["y"], to=TensorProto.FLOAT16))
    graph = helper.make_graph(nodes, branch, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)],
                              inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def _run(model: ir.Model, feeds: dict) -> np.ndarray:
    import onnxruntime

    proto = ir.serde.serialize_model(model).SerializeToString()
    return onnxruntime.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


BRANCH_FEEDS = {"cast": {"ids": np.array([1, -2, 3])}, "input": {"v": np.array([0.5, -2, 3], np.float16)},
                "subgraph": {"ids": np.array([1, -2, 3]), "flag": np.array(True)}}
BRANCH_WANT = {"cast": [1, -2, 3], "input": [0.5, -2, 3], "constant_of_shape": [-65504] * 3, "value_float": [65504],
               "subgraph": [1, -2, 3]}


@pytest.mark.parametrize("branch", ["cast", "constant", "constant_of_shape", "value_float", "value_floats",
                                    "initializer", "input", "subgraph"])
def test_each_kind_of_fp32_is_lowered_and_reported(branch):
    """Cast targets (in subgraphs too), Constant / ConstantOfShape tensors, value_float(s), initializers and
    graph inputs: each alone makes the pass report a change, leaves nothing FP32 and computes, in FP16,
    the FP32 values clamped to +-65504 (-3.4e38, a mask fill, would become -inf)."""
    model = _one_node_graph(branch)
    assert CastFp16Pass()(model).modified is True
    CastFp16Pass().ensures(model)
    got = _run(model, BRANCH_FEEDS.get(branch, {}))
    assert got.dtype == np.float16 and np.isfinite(got).all()
    np.testing.assert_array_equal(got, BRANCH_WANT.get(branch, [0.5, -65504, 65504]))
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        assert not {"value_float", "value_floats"} & set(node.attributes)
        if node.op_type in ("Constant", "ConstantOfShape") and node.name != "shape":  # as later passes read it
            attr = node.attributes["value"]
            assert attr.name == "value" and attr.as_tensor().dtype in (ir.DataType.FLOAT16, ir.DataType.INT64)
        if node.op_type == "Cast":
            assert node.attributes["to"].as_int() == ir.DataType.FLOAT16


def test_leaves_other_types_and_reports_no_change():
    """Integer constants, integer casts and FP16 already in place: nothing to lower, modified is False."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array([2], np.int64))),
             helper.make_node("Constant", [], ["axes"], value_ints=[0]),  # no tensor, no float: not touched
             helper.make_node("Unsqueeze", ["c", "axes"], ["c2"]),
             helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
             helper.make_node("Add", ["xi", "c"], ["y"])]
    graph = helper.make_graph(nodes, "ints", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert CastFp16Pass()(model).modified is False
    assert model.graph.node(0).attributes["value"].as_tensor().dtype == ir.DataType.INT64
    assert list(model.graph.node(1).attributes["value_ints"].as_ints()) == [0]
    assert model.graph.node(3).attributes["to"].as_int() == ir.DataType.INT64


def test_postcondition_names_what_stayed_fp32():
    model = _one_node_graph("input")
    with pytest.raises(ir.passes.PostconditionError, match=r"^FP32 tensors remain after cast-fp16: \['v'\]$"):
        CastFp16Pass().ensures(model)
    inputs = [ir.Value(name=f"in{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1])) for i in range(7)]
    node = ir.node("Concat", inputs, attributes={"axis": 0})
    many = ir.Model(ir.Graph(inputs, node.outputs, nodes=[node], opset_imports={"": 21}), ir_version=10)
    with pytest.raises(ir.passes.PostconditionError,  # the first five named, not all seven
                       match=r"^FP32 tensors remain after cast-fp16: \['in0', 'in1', 'in2', 'in3', 'in4'\]$"):
        CastFp16Pass().ensures(many)
