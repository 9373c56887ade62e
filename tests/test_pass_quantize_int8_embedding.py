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
    """(loaded tiny Gemma 3, its fp16-recipe graph)."""
    from conftest import final_graph
    from compiler.frontend.default_model import make_tiny_model
    from compiler.frontend.load import load_model
    from compiler.recipe import load_recipe

    root = tmp_path_factory.mktemp("tied")
    loaded = load_model(make_tiny_model(root / "gemma3", "gemma3", vocab_size=VOCAB, hidden_size=HIDDEN, seed=3))
    path = final_graph(loaded, root / "fp16.onnx", passes=load_recipe("fp16").passes, capacity=CAPACITY,
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
