"""quantize-int8-embedding on a tiny Gemma 3 (tied embedding / lm_head, one initializer read by the
Gather and by lm_head's Transpose): graph shape (one INT8 table, both readers on its DQ), onnxruntime
(the graph computes its dequantized table; near the FP16 graph), TensorRT-RTX parse + build."""

import numpy as np
import onnx_ir as ir
import pytest

from passes import PassContext, make_pass
from passes.quantize_int8_embedding import QuantizeInt8EmbeddingPass, embedding_tables
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from helpers import build_with_backend, op_counts, run_onnx, save

CAPACITY, VOCAB, HIDDEN = 64, 512, 128


@pytest.fixture(scope="module")
def tied(tmp_path_factory, exported):
    """(loaded tiny Gemma 3, its fp16-recipe graph up to the FP32 logits)."""
    from conftest import final_graph, fp16_lowering
    from compiler.frontend.default_model import make_tiny_model
    from compiler.frontend.load import load_model

    root = tmp_path_factory.mktemp("tied")
    loaded = load_model(make_tiny_model(root / "gemma3", "gemma3", vocab_size=VOCAB, hidden_size=HIDDEN, seed=3))
    path = final_graph(loaded, root / "fp16.onnx", passes=fp16_lowering(), capacity=CAPACITY,
                       exported=exported(loaded.path, loaded))
    return loaded, path


@pytest.fixture(scope="module")
def quantized(tied, tmp_path_factory):
    model = ir.load(tied[1])
    pass_ = make_pass("quantize-int8-embedding", PassContext(max_positions=CAPACITY))
    assert pass_(model).modified
    return pass_, save(model, tmp_path_factory.mktemp("int8-emb") / "model.onnx")


def _feeds(model: ir.Model, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, VOCAB, (2, 9)), "position_ids": np.tile(np.arange(9), (2, 1))}
    for v in model.graph.inputs[2:]:
        feeds[v.name] = np.zeros([2 if not isinstance(d, int) else d for d in v.shape], np.float16)
    return feeds


def test_graph_shape_after(tied, quantized):
    before = ir.load(tied[1])
    (table,) = embedding_tables(before)
    assert sorted(u.op_type for u, _ in table.uses()) == ["Gather", "Transpose"]  # tied: one table, two readers
    pass_, path = quantized
    model = ir.load(path)
    assert pass_.quantized == ["lm_head", "model.embed_tokens"]
    (dq,) = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    q, scale = dq.inputs[:2]
    assert q.dtype == ir.DataType.INT8 and tuple(q.shape) == (VOCAB, HIDDEN) and len(dq.inputs) == 2  # symmetric
    assert scale.dtype == ir.DataType.FLOAT16 and tuple(scale.shape) == (VOCAB,) and dq.attributes["axis"].as_int() == 0
    assert sorted(u.op_type for u, _ in dq.outputs[0].uses()) == ["Gather", "Transpose"]
    assert not embedding_tables(model) and table.name not in model.graph.initializers
    assert len(model.graph) == len(before.graph) + 1
    # Stored once: the table's bytes halve (plus one FP16 scale per row); no float copy for lm_head.
    floats = {v.name: v.const_value.nbytes for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT16}
    assert max(floats.values()) < VOCAB * HIDDEN * 2 and q.const_value.nbytes == VOCAB * HIDDEN


def test_rows_round_to_nearest_on_their_own_scale(tied, quantized):
    table = embedding_tables(ir.load(tied[1]))[0].const_value.numpy().astype(np.float32)
    dq = next(n for n in ir.load(quantized[1]).graph if n.op_type == "DequantizeLinear")
    q, scale = (v.const_value.numpy().astype(np.float32) for v in dq.inputs[:2])
    peak = np.abs(table).max(axis=1)
    np.testing.assert_allclose(scale, np.where(peak == 0, 1.0, peak / 127), rtol=1e-3)  # an all-zero row (padding) gets 1
    assert (peak > 0).sum() > VOCAB // 2
    assert (np.abs(q * scale[:, None] - table) <= 0.5 * scale[:, None] * (1 + 1e-2)).all()


def test_onnxruntime_computes_the_dequantized_table(tied, quantized, tmp_path):
    """The graph equals the FP16 graph with the table replaced by its dequantized values (same
    executor: FP16 Gather, FP32-widened lm_head), and stays near the unquantized graph."""
    _, path = quantized
    reference = ir.load(path)
    dq = next(n for n in reference.graph if n.op_type == "DequantizeLinear")
    q, scale = (v.const_value.numpy() for v in dq.inputs[:2])
    table = (q.astype(np.float32) * scale.astype(np.float32)[:, None]).astype(np.float16)
    const = ir.Value(name="table", const_value=ir.tensor(table, name="table"))
    const.type, const.shape = dq.outputs[0].type, dq.outputs[0].shape
    reference.graph.register_initializer(const)
    dq.outputs[0].replace_all_uses_with(const)
    reference.graph.remove(dq, safe=True)
    feeds = _feeds(reference)
    got = run_onnx(path, feeds)["logits"]
    assert np.array_equal(got, run_onnx(save(reference, tmp_path / "dequantized.onnx"), feeds)["logits"])
    fp16 = run_onnx(tied[1], feeds)["logits"]
    assert float(np.linalg.norm(got - fp16) / np.linalg.norm(fp16)) < 0.02  # measured 0.0043; INT4 is ~0.4
    assert (got.argmax(-1) == fp16.argmax(-1)).mean() >= 0.9


def test_cpu_executor_computes_the_tied_lm_head_weight_ahead(quantized):
    """compiler/ort_widen.py dequantizes Transpose(DQ(table)) once into the session's FP32 lm_head
    weight, instead of casting a 262144-row table each step: only activations are cast."""
    from compiler.runtime.ort_widen import widen_fp16_matmuls

    model = ir.load(quantized[1])
    before = op_counts(model)
    count, weights = widen_fp16_matmuls(model)
    after = op_counts(model)
    assert after["Cast"] == before["Cast"] + 2 * count  # activation in, product out, for every MatMul
    assert any(w.shape == (HIDDEN, VOCAB) and w.dtype == np.float32 for w in weights.values())
    assert after["DequantizeLinear"] == 1 and after["Transpose"] == before["Transpose"] - 1  # the Gather's DQ stays
    assert OnnxRuntimeExecutor(quantized[1]).io.vocab_size == VOCAB


def test_tensorrt_rtx_parses_and_builds(quantized, tmp_path):
    engine = build_with_backend(quantized[1], tmp_path, max_seq=CAPACITY)
    assert engine.layer_types.get("DEQUANTIZE", 0) >= 1, engine.layer_types


def test_untied_table_is_quantized_for_the_gather_only(trained_fp16):
    """The trained model's lm_head has its own weight (int8-wo with include_lm_head takes it): the
    pass quantizes the embedding table and leaves lm_head's weight float."""
    model = ir.load(trained_fp16)
    lm_head = next(n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name == "logits").inputs[1]
    pass_ = QuantizeInt8EmbeddingPass()
    assert pass_(model).modified and pass_.quantized == ["model.embed_tokens"]
    assert lm_head.is_initializer() and lm_head.dtype == ir.DataType.FLOAT16
    assert op_counts(model)["DequantizeLinear"] == 1


# Hand-built tables (seconds, no model): which tables are taken, which are left, and the values onnxruntime
# computes from the INT8 copy against numpy's own per-row rounding of the same table.
V, H = 8, 5


def _table(dtype=np.float16, zero_row=True):
    table = np.random.default_rng(4).standard_normal((V, H)).astype(dtype)
    if zero_row:
        table[3] = 0  # padding: a row of zeros keeps scale 1 and dequantizes to exact zeros
    return table


def _tied_graph(table, gather_axis=None, gather_domain="", table_input=False, extra_reader=None,
                transpose_first=False, second_gather=False, lm_head_name="logits"):
    """ids -> Gather(E) -> x; Transpose(E) -> MatMul(x, E^T) -> logits (a tied lm_head)."""
    f = ir.DataType.from_numpy(table.dtype)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["b", "s"]))
    graph = ir.Graph([ids], [], nodes=[], name="tied", opset_imports={"": 21})
    e = ir.Value(name="E", type=ir.TensorType(f), shape=ir.Shape(list(table.shape)),
                 const_value=None if table_input else ir.tensor(table, name="E"))
    if table_input:
        graph.inputs.append(e)
    else:
        graph.register_initializer(e)
    attributes = {} if gather_axis is None else {"axis": gather_axis}
    gather = ir.node("Gather", [e, ids], attributes=attributes, domain=gather_domain, name="embed")
    transpose = ir.node("Transpose", [e], attributes={"perm": [1, 0]}, name="lm_head.transpose")
    matmul = ir.node("MatMul", [gather.outputs[0], transpose.outputs[0]], name="lm_head")
    nodes = [transpose, gather, matmul] if transpose_first else [gather, transpose, matmul]
    for node in nodes:
        graph.append(node)
    matmul.outputs[0].name = lm_head_name
    matmul.outputs[0].type, matmul.outputs[0].shape = ir.TensorType(f), ir.Shape(["b", "s", V])
    graph.outputs.append(matmul.outputs[0])
    if second_gather:
        again = ir.node("Gather", [e, ids], attributes=attributes, name="embed_again")
        graph.append(again)
        again.outputs[0].name = "x_again"
        again.outputs[0].type, again.outputs[0].shape = ir.TensorType(f), ir.Shape(["b", "s", H])
        graph.outputs.append(again.outputs[0])
    if extra_reader:
        other = ir.node(extra_reader, [e, e], name="other")
        graph.append(other)
        other.outputs[0].name = "other"
        graph.outputs.append(other.outputs[0])
    return ir.Model(graph, ir_version=10)


def _numpy_int8_rows(table):
    """Per-row symmetric INT8, computed here: scale = max |row| / 127 (1 for a zero row), round to nearest."""
    t = table.astype(np.float64)
    scale = np.abs(t).max(axis=1) / 127
    scale = np.where(scale == 0, 1.0, scale).astype(table.dtype).astype(np.float64)
    q = np.clip(np.rint(t / scale[:, None]), -127, 127)
    return q, scale


@pytest.mark.parametrize("transpose_first", [False, True])
def test_synthetic_tied_table_dequantizes_to_numpys_rows_for_both_readers(tmp_path, transpose_first):
    import onnxruntime as ort

    table = _table()
    model = _tied_graph(table, transpose_first=transpose_first)
    pass_ = QuantizeInt8EmbeddingPass()
    assert pass_(model).modified and pass_.quantized == ["lm_head", "model.embed_tokens"]
    graph = model.graph
    (dq,) = [n for n in graph if n.op_type == "DequantizeLinear"]
    readers = [n for n, _ in dq.outputs[0].uses()]
    assert sorted(n.op_type for n in readers) == ["Gather", "Transpose"]
    order = list(graph)
    assert all(order.index(dq) < order.index(n) for n in readers)  # inserted before its first reader
    assert "E" not in graph.initializers and not embedding_tables(model)
    assert dq.attributes["axis"].as_int() == 0 and len(dq.inputs) == 2
    q, scale = dq.inputs[0].const_value.numpy(), dq.inputs[1].const_value.numpy()
    assert q.dtype == np.int8 and q.shape == (V, H) and scale.dtype == np.float16 and scale.shape == (V,)
    want_q, want_scale = _numpy_int8_rows(table)
    np.testing.assert_array_equal(q, want_q)
    np.testing.assert_array_equal(scale.astype(np.float64), want_scale)
    path = save(model, tmp_path / "m.onnx")
    ids = np.array([[3, 0, 7], [1, 3, 5]])
    (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    dequantized = (want_q * want_scale[:, None]).astype(np.float16).astype(np.float64)
    want = dequantized[ids] @ dequantized.T
    np.testing.assert_allclose(got.astype(np.float64), want, rtol=2e-3, atol=2e-3)
    assert (got[0, 0] == 0).all()  # the zero row's logits: exact zeros


def test_synthetic_repeated_readers_share_one_int8_copy():
    table = _table(np.float32, zero_row=False)
    model = _tied_graph(table, gather_axis=0, second_gather=True)
    pass_ = QuantizeInt8EmbeddingPass()
    assert pass_(model).modified and pass_.quantized == ["lm_head", "model.embed_tokens"]
    assert op_counts(model)["DequantizeLinear"] == 1
    (dq,) = [n for n in model.graph if n.op_type == "DequantizeLinear"]
    assert dq.inputs[1].const_value.numpy().dtype == np.float32  # the scale keeps the table's dtype
    assert sorted(n.name for n, _ in dq.outputs[0].uses()) == ["embed", "embed_again", "lm_head.transpose"]


def test_synthetic_an_untied_gather_is_named_as_the_embedding_only():
    model = _tied_graph(_table(), lm_head_name="not_logits")  # the Transpose feeds no lm_head
    pass_ = QuantizeInt8EmbeddingPass()
    assert not pass_(model).modified and pass_.quantized == []  # read by a plain Transpose too: left float
    assert model.graph.initializers["E"].const_value is not None


@pytest.mark.parametrize("case", ["gather axis 1", "custom-domain gather", "graph input", "integer table",
                                  "3-D table", "1-D table", "another reader"])
def test_synthetic_tables_it_must_not_touch_are_left_float(case):
    table = {"integer table": np.arange(V * H).reshape(V, H).astype(np.int64),
             "3-D table": _table().reshape(V, H, 1), "1-D table": _table()[:, 0]}.get(case, _table())
    model = _tied_graph(table, gather_axis=1 if case == "gather axis 1" else None,
                        gather_domain="com.example" if case == "custom-domain gather" else "",
                        table_input=case == "graph input", extra_reader="Add" if case == "another reader" else None)
    pass_ = QuantizeInt8EmbeddingPass()
    assert not pass_(model).modified and pass_.quantized == []
    assert op_counts(model)["DequantizeLinear"] == 0
    assert [n.inputs[0].name for n in model.graph if n.op_type == "Gather"] == ["E"]


def test_synthetic_readers_are_named_by_module():
    from passes.quantize_int8_embedding import readers

    model = _tied_graph(_table(), extra_reader="Add")
    (table,) = embedding_tables(model)
    assert sorted(readers(table)) == ["Add", "Add", "lm_head", "model.embed_tokens"]


def test_synthetic_a_table_left_float_does_not_stop_the_next_one():
    model = _tied_graph(_table(), extra_reader="Add")  # E: read by Add too, left float
    graph = model.graph
    table2 = _table(zero_row=False)[:, :3]
    e2 = ir.Value(name="E2", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape([V, 3]),
                  const_value=ir.tensor(table2, name="E2"))
    graph.register_initializer(e2)
    gather = ir.node("Gather", [e2, graph.inputs[0]], name="embed2")
    graph.append(gather)
    gather.outputs[0].name = "x2"
    graph.outputs.append(gather.outputs[0])
    pass_ = QuantizeInt8EmbeddingPass()
    assert pass_(model).modified and pass_.quantized == ["model.embed_tokens"]
    (dq,) = [n for n in graph if n.op_type == "DequantizeLinear"]
    assert [n.name for n, _ in dq.outputs[0].uses()] == ["embed2"]
    np.testing.assert_array_equal(dq.inputs[0].const_value.numpy(), _numpy_int8_rows(table2)[0])
    assert graph.initializers["E"].const_value is not None and "E2" not in graph.initializers
