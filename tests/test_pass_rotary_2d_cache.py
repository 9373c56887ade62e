"""rotary-2d-cache, tested three ways: graph shape, onnxruntime before == after, TensorRT(-RTX) accepts."""

import numpy as np
import onnx_ir as ir
import pytest

from passes import CastFp16Pass, CleanupPass, Rotary2DCachePass
from helpers import build_with_backend, feeds_with_past, op_counts, run_onnx, save

MAX_POS = 64


def test_graph_shape_after(fresh_llama_model, llama_export):
    _, io = llama_export
    model = fresh_llama_model
    rotary_before = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert rotary_before and all(len(n.inputs) == 3 for n in rotary_before)  # the exporter's 3-D form
    result = Rotary2DCachePass(MAX_POS)(model)
    assert result.modified
    counts = op_counts(model)
    rotary = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert len(rotary) == 2 * io.num_layers  # q and k in every layer
    assert counts["Cos"] == 0 and counts["Sin"] == 0  # per-layer recomputation gone
    for node in rotary:
        assert [v.name for v in node.inputs[1:]] == ["rotary_emb.cos_cache", "rotary_emb.sin_cache", "position_ids"]
    cos = model.graph.initializers["rotary_emb.cos_cache"].const_value.numpy()
    assert cos.shape == (MAX_POS, io.head_dim // 2)
    np.testing.assert_allclose(cos[0], 1.0, atol=1e-6)  # position 0 is no rotation
    assert not Rotary2DCachePass(MAX_POS)(model).modified  # idempotent


def test_onnxruntime_before_vs_after(fresh_llama_model, llama_export, tmp_path):
    path, io = llama_export
    feeds = feeds_with_past(io, np.float32, past=9)  # positions 9..11, far from 0
    before = run_onnx(path, feeds)
    Rotary2DCachePass(MAX_POS)(fresh_llama_model)
    after = run_onnx(save(fresh_llama_model, tmp_path / "after.onnx"), feeds)
    for name in io.output_names:  # tolerance: FP32 table lookup vs recompute, 1e-5
        np.testing.assert_allclose(after[name], before[name], atol=1e-5, rtol=1e-5)


def test_backend_parses_and_builds_native_rotary(fresh_llama_model, tmp_path):
    # Attention builds only in FP16 on TensorRT, so the graph is lowered after the rewrite.
    Rotary2DCachePass(MAX_POS)(fresh_llama_model)
    CastFp16Pass()(fresh_llama_model)
    engine = build_with_backend(save(fresh_llama_model, tmp_path / "m.onnx"), tmp_path, max_seq=MAX_POS)
    assert engine.layer_types.get("ROTARY_EMBEDDING", 0) == 4
    assert engine.plan_path.stat().st_size > 0


def _rotary_with_cos_from_another_input() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2, 3, 4]))
    pos = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, 3]))
    cos = ir.Value(name="cos_in", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3, 2]))
    node = ir.node("RotaryEmbedding", [x, cos, cos], attributes={"num_heads": 2})
    node.outputs[0].name = "y"
    graph = ir.Graph([x, pos, cos], node.outputs, nodes=[node], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def test_refuses_cos_that_depends_on_other_inputs():
    """The check half of the rule: a cos/sin fed by a graph input other than position_ids is not tabulable."""
    with pytest.raises(ir.passes.PreconditionError, match="depends on"):
        Rotary2DCachePass(8)(_rotary_with_cos_from_another_input())


def test_driver_reports_inapplicable_recipe_as_unsupported_model():
    from compiler.frontend.run_passes import run_passes as _passes
    from compiler.errors import UnsupportedModelError
    from compiler.graph_io import ExportedGraph, GraphIO
    from compiler.recipe import Recipe, Tolerance
    from passes import PassContext

    recipe = Recipe("r", "", ("rotary-2d-cache",), Tolerance(1, 1, 0))
    graph = ExportedGraph(_rotary_with_cos_from_another_input(), GraphIO(1, 1, 4, 8))
    with pytest.raises(UnsupportedModelError, match="recipe 'r' cannot be applied"):
        _passes(graph, recipe, PassContext(8), None)


def test_runs_on_a_model_whose_weights_are_external_files(fresh_llama_model, llama_export, tmp_path, monkeypatch):
    """The stage cache hands passes an export loaded from model.onnx + model.onnx.data: the cos/sin cone's
    initializers are references to that file, which a session made from bytes cannot resolve (a second
    Gemma 3 build on one --cache-dir failed here). From another working directory, same tables as in memory."""
    folder = tmp_path / "cached"
    folder.mkdir()
    ir.save(fresh_llama_model, folder / "model.onnx", external_data="model.onnx.data", size_threshold_bytes=0)
    model = ir.load(folder / "model.onnx")
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    monkeypatch.chdir(tmp_path)
    assert Rotary2DCachePass(max_positions=64)(model).modified
    reference = ir.load(llama_export[0])
    Rotary2DCachePass(max_positions=64)(reference)
    tables = lambda m: {n: v.const_value.numpy() for n, v in m.graph.initializers.items() if "cache" in n}  # noqa: E731
    assert tables(model) and all(np.array_equal(a, tables(reference)[n]) for n, a in tables(model).items())
