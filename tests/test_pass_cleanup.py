"""cleanup, tested three ways: fewer nodes and no dead ones, onnxruntime unchanged, backend builds."""

import sys

import numpy as np

from passes import CastFp16Pass, CleanupPass
from helpers import build_with_backend, feeds_with_past, op_counts, run_onnx, save


def test_graph_shrinks_and_second_run_is_noop(fresh_llama_model):
    model = fresh_llama_model
    before = len(model.graph)
    assert CleanupPass()(model).modified
    assert len(model.graph) < before
    counts = op_counts(model)
    assert counts["Cos"] == 1 and counts["Sin"] == 1  # the per-layer rotary duplicates merged by CSE
    assert not CleanupPass()(model).modified  # fixed point


def test_onnxruntime_unchanged(fresh_llama_model, llama_export, tmp_path):
    path, io = llama_export
    feeds = feeds_with_past(io, np.float32)
    before = run_onnx(path, feeds)
    CleanupPass()(fresh_llama_model)
    after = run_onnx(save(fresh_llama_model, tmp_path / "clean.onnx"), feeds)
    for name in io.output_names:  # a semantics-preserving rewrite: 1e-6
        np.testing.assert_allclose(after[name], before[name], atol=1e-6, rtol=1e-6)


def test_backend_parses_and_builds(fresh_llama_model, tmp_path):
    CastFp16Pass()(fresh_llama_model)
    CleanupPass()(fresh_llama_model)
    engine = build_with_backend(save(fresh_llama_model, tmp_path / "m.onnx"), tmp_path)
    assert engine.layer_types.get("MATRIX_MULTIPLY", 0) > 0


def test_leaves_no_reference_to_the_graph(llama_export):
    """onnxscript's module-level rules keep the last graph their matchers saw; the pass clears that,
    so dropping the model frees it (and its weights): at 1B this held 3.6 GB."""
    import gc
    import weakref

    import onnx_ir as ir

    model = ir.load(llama_export[0])
    assert CleanupPass()(model).modified
    graph = weakref.ref(model.graph)
    del model
    gc.collect()
    assert graph() is None


def test_values_removed_from_graph_io_are_not_kept_alive():
    """onnx-ir's graph I/O lists count references and only decrement on removal: a removed input and
    its tensor stay reachable from the graph until forget_removed_io drops the zero counts."""
    import gc
    import weakref

    import numpy as np
    import onnx_ir as ir

    from passes.rewriter_state import forget_removed_io

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    lifted = ir.Value(name="w", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]),
                      const_value=ir.tensor(np.ones(2, np.float32)))
    node = ir.node("Identity", [x])
    graph = ir.Graph([x, lifted], node.outputs, nodes=[node])
    graph.inputs.remove(lifted)  # what torch.onnx does with a lifted parameter
    ref = weakref.ref(lifted)
    del lifted
    gc.collect()
    assert ref() is not None  # the bug this works around: held by the inputs' counter
    assert forget_removed_io(graph) == 1
    gc.collect()
    assert ref() is None
    assert [v.name for v in graph.inputs] == ["x"] and forget_removed_io(graph) == 0


def test_exported_weights_are_freed_once_cast_fp16_replaced_them(model_dirs):
    """End to end: after export and cast-fp16, no tensor shares the FP32 model's memory once the model
    is dropped. The exporter lifts `q_proj.weight` to a graph input, then folds it transposed into a
    new initializer: the removed input kept the original (at 1B, 1.45 GB of such weights)."""
    import gc

    import torch
    from torch._subclasses.fake_tensor import FakeTensor

    from compiler.frontend.export import export_onnx
    from compiler.frontend.load import load_model
    from passes import PassContext, make_pass

    loaded = load_model(model_dirs["llama"])
    graph = export_onnx(loaded, method="full")
    address = loaded.model.model.layers[0].self_attn.q_proj.weight.data_ptr()
    del loaded
    for name in ("cleanup", "cast-fp16"):
        make_pass(name, PassContext(max_positions=64), {})(graph.model)
    gc.collect()
    alive = [o for o in gc.get_objects()
             if isinstance(o, torch.Tensor) and not isinstance(o, FakeTensor) and o.data_ptr() == address]
    assert alive == [] and len(graph.model.graph.initializers) > 0


def test_folds_constants_but_keeps_weights_quantized(tmp_path):
    """A weight's DequantizeLinear (int8 constant -> float) is foldable but stays: folding it would store
    the float weight the quantizer removed. Other constant arithmetic still folds; outputs unchanged."""
    import onnx_ir as ir
    import onnxruntime
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    q = rng.integers(-127, 128, size=(8, 4), dtype=np.int8)
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1),
             helper.make_node("Add", ["one", "one"], ["two"]),  # constant arithmetic: folds
             helper.make_node("MatMul", ["x", "w"], ["xw"]),
             helper.make_node("Mul", ["xw", "two"], ["y"])]
    inits = [numpy_helper.from_array(q, "w_q"), numpy_helper.from_array(np.full(4, 0.02, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one")]
    graph = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    before = save(model, tmp_path / "before.onnx")
    assert CleanupPass()(model).modified is True
    assert op_counts(model) == {"DequantizeLinear": 1, "MatMul": 1, "Mul": 1}
    assert model.graph.initializers["w_q"].const_value.dtype == ir.DataType.INT8
    feeds = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    run = [onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
           for p in (before, save(model, tmp_path / "after.onnx"))]
    np.testing.assert_array_equal(run[1], run[0])


def _rule():
    from onnxscript.rewriter._rewrite_rule import RewriteRule

    return RewriteRule(lambda op, x: op.Relu(op.Relu(x)), lambda op, x: op.Relu(x))


def test_the_walk_finds_module_level_rules_in_the_rewriter_packages_only(monkeypatch):
    """Rules held directly, in a rule set, or in a tuple / list at module level of onnxscript.rewriter.*
    are found; a rule two containers deep, or in a module outside those packages, is not (their
    matchers are not onnxscript's shared state)."""
    import types

    from onnxscript.rewriter._rewrite_rule import RewriteRuleSet

    from passes.rewriter_state import _module_rules

    direct, in_set, in_tuple, in_list, deep, outside = (_rule() for _ in range(6))
    inside = types.ModuleType("onnxscript.rewriter.llmc_probe")
    inside.direct, inside.rule_set, inside.rules = direct, RewriteRuleSet([in_set]), (in_tuple,)
    inside.more, inside.deep = [in_list], [(deep,)]
    other = types.ModuleType("llmc_probe_elsewhere")
    other.rule = outside
    monkeypatch.setitem(sys.modules, inside.__name__, inside)
    monkeypatch.setitem(sys.modules, other.__name__, other)
    found = {id(r) for r in _module_rules()}
    assert {id(direct), id(in_set), id(in_tuple), id(in_list)} <= found
    assert id(deep) not in found and id(outside) not in found


def test_forgetting_clears_each_matcher_and_counts_what_it_dropped(monkeypatch):
    import types

    from passes.rewriter_state import MATCH_STATE, forget_matched_graphs

    rules = [_rule(), _rule()]
    probe = types.ModuleType("onnxscript.rewriter.llmc_probe")
    probe.rules = rules
    monkeypatch.setitem(sys.modules, probe.__name__, probe)
    forget_matched_graphs()  # whatever the real rules hold
    held = object()
    for rule in rules:
        for attr in MATCH_STATE[:3]:
            setattr(rule._matcher, attr, held)
    assert forget_matched_graphs() == 6
    assert all(getattr(rule._matcher, attr, None) is None for rule in rules for attr in MATCH_STATE)
    assert forget_matched_graphs() == 0


def test_forget_removed_io_counts_every_removed_value():
    import numpy as np
    import onnx_ir as ir

    from passes.rewriter_state import forget_removed_io

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    lifted = [ir.Value(name=f"w{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]),
                       const_value=ir.tensor(np.ones(2, np.float32))) for i in range(3)]
    node = ir.node("Identity", [x])
    graph = ir.Graph([x, *lifted], node.outputs, nodes=[node])
    for value in lifted:
        graph.inputs.remove(value)
    assert forget_removed_io(graph) == 3 and forget_removed_io(graph) == 0


def test_a_moved_private_api_loses_the_memory_fix_not_the_build(monkeypatch):
    """The workarounds read onnxscript's and onnx-ir's private state; where it is gone they do nothing
    (0 dropped) instead of failing the build."""
    import types

    from onnxscript.rewriter._rewrite_rule import RewriteRule

    from passes.rewriter_state import forget_matched_graphs, forget_removed_io

    assert forget_removed_io(types.SimpleNamespace(inputs=[], outputs=())) == 0  # lists without a counter
    probe = types.ModuleType("onnxscript.rewriter.llmc_probe")
    probe.bare = object.__new__(RewriteRule)  # a rule without a matcher
    monkeypatch.setitem(sys.modules, probe.__name__, probe)
    forget_matched_graphs()
    assert forget_matched_graphs() == 0
    monkeypatch.setitem(sys.modules, "onnxscript.rewriter._rewrite_rule", None)  # the import fails
    assert forget_matched_graphs() == 0
