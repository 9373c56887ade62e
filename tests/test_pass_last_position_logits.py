"""last-position-logits, tested three ways: the gather before the lm_head MatMul, onnxruntime before vs after
on the gathered rows, TensorRT-RTX parse + build (a native GATHER layer).

The graph is the fp16 recipe's of the bundled trained model (capacity 256). Tolerance through llmc's
onnxruntime executor: exact. Its FP16 MatMuls run as FP32 GEMMs (compiler/runtime/ort_widen.py), which give
each gathered row the same dot product whatever the number of rows, so the logits must be bit-identical
(measured 0.0). onnxruntime's own FP16 MatMul is one ulp off at another M: the per-pass check's bound below.
"""

import numpy as np
import onnx_ir as ir
import pytest

from compiler.graph_io import BATCH, LOGITS_AT, LOGITS_AT_DIM
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from helpers import build_with_backend, op_counts, save
from passes import REGISTRY
from passes.last_position_logits import LastPositionLogitsPass, lm_head

CAPACITY = 256


@pytest.fixture(scope="module")
def graphs(trained, exported, tmp_path_factory):
    """(before, after) paths: the fp16 recipe's lowering without this pass, and with it."""
    from compiler.frontend.default_model import default_model_dir
    from conftest import final_graph, fp16_lowering

    recipe = fp16_lowering()
    assert recipe[-1] == "last-position-logits"  # every recipe has it last, but fp16's FP32 logits (recipes/*.yaml)
    folder = tmp_path_factory.mktemp("last-position")
    before = final_graph(trained, folder / "before.onnx", passes=recipe[:-1], capacity=CAPACITY,
                         exported=exported(default_model_dir(), trained))
    model = ir.load(before)
    assert LastPositionLogitsPass()(model).modified
    return before, save(model, folder / "after.onnx"), model


def _feeds(executor, ids, start=0):
    io = executor.io
    batch, seq = ids.shape
    feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(start, start + seq), (batch, 1))}
    for name in io.past_names:
        feeds[name] = np.zeros((batch, io.num_kv_heads, CAPACITY, io.head_dim), executor.input_dtype(name))
    return feeds


def test_graph_shape_after(graphs):
    _, _, model = graphs
    assert REGISTRY["last-position-logits"] is LastPositionLogitsPass
    counts = op_counts(model)
    assert counts["GatherND"] == 1
    matmul = lm_head(model.graph)
    gather = matmul.inputs[0].producer()
    assert gather.op_type == "GatherND" and gather.attributes["batch_dims"].value == 1
    assert gather.inputs[0].producer().op_type == "RMSNormalization"  # the final norm's output, gathered
    assert gather.inputs[1].producer().op_type == "Unsqueeze"
    positions = next(v for v in model.graph.inputs if v.name == LOGITS_AT)
    assert positions.dtype == ir.DataType.INT64 and list(positions.shape)[1] == LOGITS_AT_DIM
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    assert list(logits.shape)[1] == LOGITS_AT_DIM
    axes = model.graph.initializers["llmc.logits_positions.axes"]
    assert axes.dtype == ir.DataType.INT64 and list(axes.shape) == [1]  # typed, as weight_footprint reads them
    assert not LastPositionLogitsPass()(model).modified  # once is enough


def test_onnxruntime_before_vs_after_on_the_gathered_rows(graphs):
    before_path, after_path, _ = graphs
    before, after = OnnxRuntimeExecutor(before_path), OnnxRuntimeExecutor(after_path)
    ids = np.random.default_rng(0).integers(4, 1024, (3, 9)).astype(np.int64)
    full = before.run(_feeds(before, ids))["logits"].astype(np.float32)
    assert full.shape[:2] == (3, 9)
    every = after.run({**_feeds(after, ids), LOGITS_AT: np.tile(np.arange(9), (3, 1))})
    np.testing.assert_array_equal(every["logits"].astype(np.float32), full)  # validation: every position
    last = np.array([[8], [3], [5]])  # serving: each row's last real position (rows right-padded)
    got = after.run({**_feeds(after, ids), LOGITS_AT: last})
    assert got["logits"].shape == (3, 1, full.shape[2])
    np.testing.assert_array_equal(got["logits"][:, 0].astype(np.float32), full[np.arange(3), last[:, 0]])
    two = np.array([[0, 8], [1, 2], [7, 7]])
    got = after.run({**_feeds(after, ids), LOGITS_AT: two})["logits"].astype(np.float32)
    np.testing.assert_array_equal(got, full[np.arange(3)[:, None], two])
    for present in after.io.present_names:  # the cache is written as before: every position
        np.testing.assert_array_equal(every[present], before.run(_feeds(before, ids))[present])


def test_backend_parses_and_builds_a_native_gather(graphs, tmp_path):
    _, after_path, _ = graphs
    engine = build_with_backend(after_path, tmp_path, max_seq=CAPACITY)
    assert "GATHER" in engine.layer_types and "PLUGIN_V3" not in engine.layer_types
    io = {t.name: t for t in engine.tensors}
    assert io[LOGITS_AT].is_input and io[LOGITS_AT].dtype == "int64" and io[LOGITS_AT].shape == (-1, -1)
    assert io["logits"].shape[:2] == (-1, -1) and io["logits"].shape[2] > 0  # [batch, n, vocab]


def test_the_scheduler_asks_for_the_last_positions_and_every_request_gets_its_solo_tokens(graphs):
    """The in-flight scheduler over the graph after the pass (host slots, and the device manager through
    test_scheduler_device's in-place stand-in executor) gives each request the tokens of its solo run on the
    graph before it; every logits it received was [rows, 1, vocab]."""
    from compiler.runtime.runner import Runner
    from compiler.runtime.scheduler import Request, Scheduler
    from tests.test_scheduler_device import InPlaceStandIn

    before_path, after_path, _ = graphs
    before, after = OnnxRuntimeExecutor(before_path), OnnxRuntimeExecutor(after_path)
    assert after.io.logits_positions and not before.io.logits_positions
    rng = np.random.default_rng(3)
    requests = [Request(rng.integers(4, 1024, n).tolist(), m) for n, m in [(5, 20), (30, 9), (2, 25), (12, 14)]]
    solo = [Runner(before, pad_token_id=3).generate([r.prompt], r.max_tokens).tokens[0] for r in requests]
    runner = Runner(after, pad_token_id=3)  # its prefill asks for each prompt's last position
    assert [runner.generate([r.prompt], r.max_tokens).tokens[0] for r in requests] == solo
    assert runner.prefill([requests[1].prompt, requests[0].prompt]).shape == (2, after.io.vocab_size)
    widths = []
    run = after.run

    def counted(feeds):
        out = run(feeds)
        widths.append(out["logits"].shape[1])
        return out

    after.run = counted
    for executor in (after, InPlaceStandIn(after)):
        scheduler = Scheduler(executor, max_batch=3, max_tokens_per_step=16, pad_token_id=3)
        handles = [scheduler.submit(r) for r in requests]
        scheduler.run_until_idle()
        assert [h.tokens for h in handles] == solo
        assert max(s.width for s in scheduler.steps) > 1  # prompt chunks ran: n = 1 of a wider step
    assert set(widths) == {1}


def test_the_per_pass_check_measures_it_as_exact(graphs):
    """--check-passes feeds every position to the graph after the pass. Its plain onnxruntime session runs the
    FP16 lm_head in FP16, where a GEMM of other M rounds differently: at most one FP16 ulp of the logits."""
    from compiler.measure.pass_check import PassChecker

    before_path, after_path, _ = graphs
    checker = PassChecker(ir.load(before_path))
    check = checker.after("last-position-logits", ir.load(after_path))
    assert check.within and check.agreement == 1.0, check
    assert check.max_abs <= 2.0 ** -7, check  # one FP16 ulp for |logit| in [8, 16)


# Hand-built lm_head graphs (seconds, no model): every position-wise op the pass looks through, the refusals,
# and the shapes it rewrites. The reference is numpy on the same weights, so a wrong gather, a wrong axis or
# a missed op fails on values, not only on structure.
H, V = 4, 6


def _lm_head_graph(ops=("Mul", "Tanh", "Div", "Cast", "Identity"), hidden_shape=("batch", "sequence", H)):
    """hidden [batch, sequence, H] -> MatMul(W) -> each op in `ops` (in order) -> logits."""
    rng = np.random.default_rng(1)
    f32 = ir.TensorType(ir.DataType.FLOAT)
    hidden = ir.Value(name="hidden", type=f32, shape=None if hidden_shape is None else ir.Shape(list(hidden_shape)))
    graph = ir.Graph([hidden], [], nodes=[], name="lm", opset_imports={"": 21})
    w = ir.Value(name="w", type=f32, shape=ir.Shape([H, V]), const_value=ir.tensor(rng.standard_normal((H, V)).astype(np.float32)))
    c = ir.Value(name="c", type=f32, shape=ir.Shape([]), const_value=ir.tensor(np.float32(3.0)))
    graph.register_initializer(w)
    graph.register_initializer(c)
    matmul = ir.node("MatMul", [hidden, w], name="lm_head")
    graph.append(matmul)
    value = matmul.outputs[0]
    value.shape, value.dtype = ir.Shape(["batch", "sequence", V]), ir.DataType.FLOAT
    for i, op in enumerate(ops):
        inputs = [value, c] if op in ("Mul", "Div", "Add") else [value]
        attributes = {"to": ir.DataType.FLOAT} if op == "Cast" else {}
        node = ir.node(op, inputs, attributes=attributes, name=f"op{i}")
        graph.append(node)
        value = node.outputs[0]
        value.shape, value.dtype = ir.Shape(["batch", "sequence", V]), ir.DataType.FLOAT
    value.name = "logits"
    graph.outputs.append(value)
    return ir.Model(graph, ir_version=10), matmul


def _reference(hidden, w, ops):
    out = hidden @ w
    for op in ops:
        out = {"Mul": out * 3, "Div": out / 3, "Tanh": np.tanh(out), "Cast": out, "Identity": out}[op]
    return out


def test_synthetic_logits_at_the_asked_positions_equal_numpy(tmp_path):
    import onnxruntime as ort

    ops = ("Mul", "Tanh", "Div", "Cast", "Identity")
    model, matmul = _lm_head_graph(ops)
    w = model.graph.initializers["w"].const_value.numpy()
    assert LastPositionLogitsPass()(model).modified
    path = save(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["hidden", LOGITS_AT]
    hidden = np.random.default_rng(2).standard_normal((2, 5, H)).astype(np.float32)
    full = _reference(hidden, w, ops)
    for positions in (np.array([[4], [1]]), np.array([[0, 3, 3], [2, 4, 0]]), np.tile(np.arange(5), (2, 1))):
        (got,) = session.run(None, {"hidden": hidden, LOGITS_AT: positions})
        np.testing.assert_allclose(got, full[np.arange(2)[:, None], positions], rtol=1e-6, atol=1e-6)


def test_synthetic_shapes_and_nodes_after():
    model, matmul = _lm_head_graph()
    LastPositionLogitsPass()(model)
    graph = model.graph
    positions = graph.inputs[-1]
    assert positions.name == LOGITS_AT and positions.dtype == ir.DataType.INT64
    assert list(positions.shape) == [BATCH, LOGITS_AT_DIM]
    gather = matmul.inputs[0].producer()
    assert gather.op_type == "GatherND" and gather.inputs[0] is graph.inputs[0]
    assert gather.outputs[0].dtype == ir.DataType.FLOAT and list(gather.outputs[0].shape) == [BATCH, LOGITS_AT_DIM, H]
    unsqueeze = gather.inputs[1].producer()
    assert unsqueeze.op_type == "Unsqueeze" and unsqueeze.inputs[0] is positions
    assert unsqueeze.inputs[1].const_value.numpy().tolist() == [2]
    order = [n.op_type for n in graph]
    assert order.index("Unsqueeze") < order.index("GatherND") < order.index("MatMul")  # topologically sorted
    value = graph.outputs[0]
    while True:  # every value from the MatMul to the logits: [batch, n, vocab]
        assert list(value.shape) == [BATCH, LOGITS_AT_DIM, V], value
        if value.producer() is matmul:
            break
        value = value.producer().inputs[0]


def test_synthetic_hidden_of_unknown_rank_gets_no_invented_shape():
    model, matmul = _lm_head_graph(ops=(), hidden_shape=None)
    LastPositionLogitsPass()(model)
    gather = matmul.inputs[0].producer()
    assert gather.op_type == "GatherND" and gather.outputs[0].shape is None
    assert gather.outputs[0].dtype == ir.DataType.FLOAT
    assert list(model.graph.outputs[0].shape) == [BATCH, LOGITS_AT_DIM, V]


def test_synthetic_lm_head_is_found_through_seven_position_wise_ops_not_eight():
    model, matmul = _lm_head_graph(ops=("Identity",) * 7)
    assert lm_head(model.graph) is matmul
    model, _ = _lm_head_graph(ops=("Identity",) * 8)
    with pytest.raises(ir.passes.PreconditionError, match="^no lm_head MatMul found before the logits"):
        lm_head(model.graph)


@pytest.mark.parametrize("op", ["Add", "Softmax"])
def test_synthetic_an_op_that_is_not_position_wise_is_refused_by_name(op):
    model, _ = _lm_head_graph(ops=("Tanh", op))
    with pytest.raises(ir.passes.PreconditionError, match=f"^{op} between the lm_head and the logits is not "
                       "position-wise: gathering before it would change the logits$"):
        LastPositionLogitsPass()(model)


def test_synthetic_a_graph_without_logits_or_matmul_is_refused():
    model, _ = _lm_head_graph()
    model.graph.outputs[0].name = "hidden_out"
    with pytest.raises(ir.passes.PreconditionError, match="^no lm_head MatMul found"):
        LastPositionLogitsPass()(model)
    model, matmul = _lm_head_graph(ops=())
    model.graph.outputs.clear()
    model.graph.outputs.append(model.graph.inputs[0])  # logits read straight from an input: no producer
    model.graph.inputs[0].name = "logits"
    with pytest.raises(ir.passes.PreconditionError, match="^no lm_head MatMul found"):
        lm_head(model.graph)


def test_synthetic_a_second_run_changes_nothing_and_returns_the_model():
    model, _ = _lm_head_graph()
    assert LastPositionLogitsPass()(model).modified
    nodes, inputs = [n.op_type for n in model.graph], list(model.graph.inputs)
    result = LastPositionLogitsPass()(model)
    assert result.modified is False and result.model is model
    assert [n.op_type for n in model.graph] == nodes and list(model.graph.inputs) == inputs


def test_synthetic_axes_constant_is_typed_and_shaped():
    """weight_footprint and TensorRT read an initializer's declared type and shape."""
    model, matmul = _lm_head_graph()
    LastPositionLogitsPass()(model)
    axes = matmul.inputs[0].producer().inputs[1].producer().inputs[1]
    assert axes.is_initializer() and axes.dtype == ir.DataType.INT64 and list(axes.shape) == [1]
    assert axes.const_value.dtype == ir.DataType.INT64


def test_synthetic_values_without_a_shape_between_lm_head_and_logits_keep_none(tmp_path):
    import onnxruntime as ort

    model, matmul = _lm_head_graph(ops=("Tanh", "Mul"))
    tanh = matmul.outputs[0].uses()[0][0]
    tanh.outputs[0].shape = None  # an exporter that did not annotate it
    w = model.graph.initializers["w"].const_value.numpy()
    assert LastPositionLogitsPass()(model).modified
    assert tanh.outputs[0].shape is None and list(matmul.outputs[0].shape) == [BATCH, LOGITS_AT_DIM, V]
    session = ort.InferenceSession(str(save(model, tmp_path / "m.onnx")), providers=["CPUExecutionProvider"])
    hidden = np.random.default_rng(5).standard_normal((1, 3, H)).astype(np.float32)
    (got,) = session.run(None, {"hidden": hidden, LOGITS_AT: np.array([[2]])})
    np.testing.assert_allclose(got, _reference(hidden, w, ("Tanh", "Mul"))[:, 2:3], rtol=1e-6, atol=1e-6)
