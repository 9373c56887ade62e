"""logits-fp32-topk, tested three ways: the graph after (FP32 logits, a TopK, the table's rows gathered, a
scatter), onnxruntime before vs after, TensorRT-RTX parse + build; plus a hand-made FP16 tie.

Tolerance before vs after (the bundled trained model's fp16 graph, llmc's onnxruntime executor): every
logit within half an FP16 spacing of the FP16 one (the refined K are the same sums unrounded; the rest
are those values, or on onnxruntime's CPU the same FP32 sums, since its Cast pair is folded), and the
refined K equal to numpy's FP32 product of the lm_head's FP16 operands within 1e-4.
"""

import numpy as np
import onnx_ir as ir
import pytest

from compiler.graph_io import LOGITS_AT
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from helpers import build_with_backend, op_counts, save
from passes import REGISTRY
from passes.logits_fp32_topk import LogitsFp32TopKPass

F16 = ir.DataType.FLOAT16
CAPACITY = 256


def _lm_head_graph(table: np.ndarray, tied: bool) -> ir.Model:
    """hidden [b, n, H] FP16 @ weight -> logits FP16: the weight the tied table's Transpose, or its own [H, V]."""
    vocab, hidden = table.shape
    h = ir.Value(name="hidden", shape=ir.Shape(["b", "n", hidden]), type=ir.TensorType(F16))
    if tied:
        source = ir.Value(name="table", shape=ir.Shape([vocab, hidden]), type=ir.TensorType(F16),
                          const_value=ir.tensor(table))
        transpose = ir.node("Transpose", [source], attributes={"perm": [1, 0]}, name="lm_head.transpose")
        weight, nodes = transpose.outputs[0], [transpose]
    else:
        source = weight = ir.Value(name="lm_head.weight", shape=ir.Shape([hidden, vocab]), type=ir.TensorType(F16),
                                   const_value=ir.tensor(np.ascontiguousarray(table.T)))
        nodes = []
    matmul = ir.node("MatMul", [h, weight], name="lm_head.matmul")
    out = matmul.outputs[0]
    out.name, out.dtype, out.shape = "logits", F16, ir.Shape(["b", "n", vocab])
    graph = ir.Graph([h], [out], nodes=[*nodes, matmul], initializers=[source], opset_imports={"": 23})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """The ONNX reference evaluator: an FP16 MatMul's output is FP16, as TensorRT writes it. (onnxruntime's CPU
    provider has no FP16 GEMM: it computes in FP32 and folds a following Cast pair, so it never shows the tie.)"""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(ir.serde.serialize_model(model)).run(None, {"hidden": x})[0]


def _tie(hidden=64, vocab=300, low=40, high=260):
    """A table and a hidden state where tokens `low` < `high` round to the same FP16 logit (16 <= |logit| < 32:
    spacing 1/64) but `high` is the larger in FP32 by 0.006: argmax of the FP16 logits takes `low`."""
    rng = np.random.default_rng(7)
    table = (rng.standard_normal((vocab, hidden)) * 0.05).astype(np.float16)
    x = np.ones((1, 1, hidden), np.float16)
    table[low] = np.float16(0.25)  # 64 x 0.25 = 16.0 exactly
    table[high] = np.float16(0.25)
    table[high, 0] = np.float16(0.25 + 0.006)  # FP32 16.006 (FP16 has 0.25 + 0.005859375): rounds to 16.0
    return table, x, low, high


@pytest.mark.parametrize("tied", [True, False])
def test_a_tie_in_fp16_goes_to_the_larger_fp32_logit(tied):
    table, x, low, high = _tie()
    model = _lm_head_graph(table, tied)
    before = _run(model, x)
    assert before.dtype == np.float16 and before[0, 0, low] == before[0, 0, high] == 16.0
    assert int(before[0, 0].argmax()) == low  # the tie: the lower id wins
    widened = _lm_head_graph(table, tied)  # widening the FP16 logits alone keeps the tie
    matmul = next(n for n in widened.graph if n.op_type == "MatMul")
    cast = ir.node("Cast", [matmul.outputs[0]], attributes={"to": ir.DataType.FLOAT})
    matmul.outputs[0].name, cast.outputs[0].name, cast.outputs[0].dtype = "fp16", "logits", ir.DataType.FLOAT
    widened.graph.append(cast)
    widened.graph.outputs[0] = cast.outputs[0]
    assert int(_run(widened, x)[0, 0].argmax()) == low
    assert LogitsFp32TopKPass(k=4)(model).modified
    after = _run(model, x)
    exact = x.astype(np.float32) @ table.T.astype(np.float32)
    assert after.dtype == np.float32 and int(after[0, 0].argmax()) == high == int(exact[0, 0].argmax())
    assert after[0, 0, high] - after[0, 0, low] == pytest.approx(exact[0, 0, high] - exact[0, 0, low], abs=1e-5)
    gathers = [n for n in model.graph if n.op_type == "Gather"]
    # a tied table is gathered by row: never transposed whole for the gather
    assert len(gathers) == 1 and gathers[0].inputs[0].name == ("table" if tied else "lm_head.weight")
    assert gathers[0].attributes["axis"].as_int() == (0 if tied else 1)


def test_a_transpose_without_perm_is_a_tied_table_too():
    """Transpose's default perm reverses the axes: [1, 0] for the table, so its rows are gathered."""
    table, x, low, high = _tie()
    model = _lm_head_graph(table, tied=True)
    transpose = next(n for n in model.graph if n.op_type == "Transpose")
    del transpose.attributes["perm"]
    assert LogitsFp32TopKPass(k=4)(model).modified
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.inputs[0].name == "table" and gather.attributes["axis"].as_int() == 0
    assert int(_run(model, x)[0, 0].argmax()) == high


def test_an_identity_transpose_is_gathered_by_column():
    """Only a [1, 0] Transpose reads a [vocab, hidden] table: Transpose(perm [0, 1]) of the [hidden, vocab] weight
    is the weight itself, so its output is gathered by column."""
    table, x, low, high = _tie()
    model = _lm_head_graph(table, tied=False)
    weight = model.graph.initializers["lm_head.weight"]
    identity = ir.node("Transpose", [weight], attributes={"perm": [0, 1]}, name="identity")
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    model.graph.insert_before(matmul, identity)
    matmul.replace_input_with(1, identity.outputs[0])
    assert LogitsFp32TopKPass(k=4)(model).modified
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.inputs[0] is identity.outputs[0] and gather.attributes["axis"].as_int() == 1
    assert int(_run(model, x)[0, 0].argmax()) == high


def test_logits_of_unknown_width_get_the_one_topk():
    """`chunk` needs the vocabulary to split it; without a shape on `logits` the pass keeps the one TopK."""
    table, x, low, high = _tie()
    model = _lm_head_graph(table, tied=False)
    model.graph.outputs[0].shape = None
    assert LogitsFp32TopKPass(k=4, chunk=4)(model).modified
    assert sum(n.op_type == "TopK" for n in model.graph) == 1 and int(_run(model, x)[0, 0].argmax()) == high


def test_options_are_checked():
    assert (LogitsFp32TopKPass().k, LogitsFp32TopKPass().chunk) == (16, 0) and LogitsFp32TopKPass(k=3840).k == 3840
    assert LogitsFp32TopKPass(k=1).k == 1 and LogitsFp32TopKPass(k=16, chunk=1 << 20).chunk == 1 << 20  # the bounds
    for bad in (0, 3841, 2.0, True, "8"):
        with pytest.raises(ValueError, match="k must be an integer from 1 to 3840"):
            LogitsFp32TopKPass(k=bad)
    assert LogitsFp32TopKPass(chunk=0).chunk == 0
    for bad in (-1, 1.5, True, 1 << 21):
        with pytest.raises(ValueError, match=r"chunk must be 0 \(one TopK over the vocabulary\) or a positive integer"):
            LogitsFp32TopKPass(chunk=bad)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk, topks", [(0, 1), (256, 2), (1024, 1), (300, 1)])  # 8 chunks < K; 300 does not divide
def test_the_chunked_topk_finds_the_same_k_best(tied, chunk, topks):
    """Each chunk's max, the K best chunks, TopK inside them: the K best logits whichever way, refined."""
    rng = np.random.default_rng(11)
    table = (rng.standard_normal((8192, 64)) * 0.3).astype(np.float16)
    x = rng.standard_normal((2, 3, 64)).astype(np.float16)
    model = _lm_head_graph(table, tied)
    LogitsFp32TopKPass(k=16, chunk=chunk)(model)
    assert sum(n.op_type == "TopK" for n in model.graph) == topks
    got = _run(model, x)
    exact = x.astype(np.float32) @ table.T.astype(np.float32)
    fp16 = exact.astype(np.float16).astype(np.float32)
    refined = np.abs(got - fp16) > 0  # the refined entries are the only ones off the FP16 values
    assert (refined.sum(-1) <= 16).all() and (refined.sum(-1) >= 8).all()
    top = np.argsort(-exact, axis=-1)[..., :8]  # well inside the 16 (at the 16th, FP16 order may differ)
    np.testing.assert_allclose(np.take_along_axis(got, top, -1), np.take_along_axis(exact, top, -1), rtol=0, atol=1e-5)
    assert (got.argmax(-1) == exact.argmax(-1)).all()


def test_a_softcap_after_the_lm_head_is_refused_by_name():
    table, _, _, _ = _tie()
    model = _lm_head_graph(table, tied=False)
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    tanh = ir.node("Tanh", [matmul.outputs[0]], name="softcap")
    matmul.outputs[0].name = "raw"
    tanh.outputs[0].name, tanh.outputs[0].dtype = "logits", F16
    model.graph.append(tanh)
    model.graph.outputs[0] = tanh.outputs[0]
    with pytest.raises(ir.passes.PreconditionError, match="found Tanh after it"):
        LogitsFp32TopKPass()(model)


@pytest.fixture(scope="module", params=[0, 64], ids=["one-topk", "chunked"])
def graphs(request, trained_fp16, tmp_path_factory):
    """(before, after, model after): the fp16 recipe's graph of the trained model without and with the pass,
    with one TopK (the default) and with the two-stage one (chunks of 64 of its 1024 logits)."""
    model = ir.load(trained_fp16)
    assert LogitsFp32TopKPass(chunk=request.param)(model).modified
    assert sum(n.op_type == "TopK" for n in model.graph) == (1 if request.param == 0 else 2)
    return trained_fp16, save(model, tmp_path_factory.mktemp("logits-fp32") / "model.onnx"), model


def test_graph_shape_after(graphs):
    from compiler.recipe import load_recipe

    _, _, model = graphs
    assert REGISTRY["logits-fp32-topk"] is LogitsFp32TopKPass and load_recipe("fp16").passes[-1] == "logits-fp32-topk"
    counts = op_counts(model)
    assert counts["ScatterElements"] == 1 and counts["TopK"] in (1, 2)
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    scatter = logits.producer()
    assert logits.dtype == ir.DataType.FLOAT and scatter.op_type == "ScatterElements"
    wide, indices, refined = scatter.inputs
    assert wide.producer().op_type == "Cast" and wide.producer().inputs[0].producer().op_type == "MatMul"
    assert indices.producer().op_type in ("TopK", "Add") and refined.producer().op_type == "Squeeze"
    gather = next(n for n in model.graph if n.op_type == "Gather" and n.inputs[1] is indices)
    lm_head = wide.producer().inputs[0].producer()
    assert gather.inputs[0] is lm_head.inputs[1] and gather.attributes["axis"].as_int() == 1  # its [H, V] weight
    assert model.graph.initializers["llmc.logits_fp32.k"].const_value.numpy().tolist() == [16]
    assert all(len(n.outputs) == 2 for n in model.graph if n.op_type == "TopK")  # values, indices
    assert LogitsFp32TopKPass()(model).modified is False  # once is enough


def test_onnxruntime_before_vs_after(graphs):
    before_path, after_path, model = graphs
    before, after = OnnxRuntimeExecutor(before_path), OnnxRuntimeExecutor(after_path)
    ids = np.random.default_rng(0).integers(4, 1024, (2, 9)).astype(np.int64)
    feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(9), (2, 1)), LOGITS_AT: np.tile(np.arange(9), (2, 1))}
    for name in before.io.past_names:
        feeds[name] = np.zeros((2, before.io.num_kv_heads, CAPACITY, before.io.head_dim), before.input_dtype(name))
    want = before.run(feeds)["logits"]
    got = after.run(feeds)["logits"]
    assert want.dtype == np.float16 and got.dtype == np.float32 and got.shape == want.shape
    spacing = np.spacing(np.abs(want)).astype(np.float32)
    assert (np.abs(got - want.astype(np.float32)) <= spacing / 2 + 1e-6).all()
    # the refined K: the lm_head's operands (its FP16 input, read back as an extra output) multiplied in FP32
    hidden_name = next(n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name == "llmc.logits_fp32.fp16")\
        .inputs[0].name
    probe = ir.load(after_path)
    value = next(v for n in probe.graph for v in n.outputs if v.name == hidden_name)
    probe.graph.outputs.append(value)
    hidden = OnnxRuntimeExecutor(save(probe, after_path.with_name("probe.onnx"))).run(feeds)[hidden_name]
    lm_head = next(n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name == "llmc.logits_fp32.fp16")
    exact = hidden.astype(np.float32) @ lm_head.inputs[1].const_value.numpy().astype(np.float32)
    top = np.argsort(-exact, axis=-1)[..., :4]
    np.testing.assert_allclose(np.take_along_axis(got, top, -1), np.take_along_axis(exact, top, -1), rtol=0, atol=1e-4)
    assert (got.argmax(-1) == exact.argmax(-1)).all()


def test_backend_parses_and_builds_native_layers(graphs, tmp_path):
    _, after_path, _ = graphs
    engine = build_with_backend(after_path, tmp_path, max_seq=CAPACITY)
    assert {"TOPK", "SCATTER", "GATHER"} <= set(engine.layer_types) and "PLUGIN_V3" not in engine.layer_types
    io = {t.name: t for t in engine.tensors}
    assert io["logits"].dtype == "float32" and io["logits"].shape[:2] == (-1, -1)
