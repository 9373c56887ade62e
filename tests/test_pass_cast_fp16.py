"""cast-fp16, tested three ways: no FP32 left, onnxruntime FP16 vs FP32 within FP16 tolerance, backend builds."""

import numpy as np
import onnx_ir as ir

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
