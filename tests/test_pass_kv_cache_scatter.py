"""kv-cache-scatter, tested three ways: TensorScatter instead of Concat, onnxruntime unchanged, KV_CACHE_UPDATE in TensorRT."""

import numpy as np
import onnx_ir as ir
import pytest

from passes import CastFp16Pass, CleanupPass, GqaNativeAttentionPass, KvCacheScatterPass, Rotary2DCachePass
from helpers import build_with_backend, feeds_with_past, op_counts, run_onnx, save

CAP = 32


@pytest.fixture()
def before(fresh_llama_model):
    for p in (CleanupPass(), Rotary2DCachePass(CAP), GqaNativeAttentionPass()):
        p(fresh_llama_model)
    return fresh_llama_model


def _fixed(feeds, io, cap=CAP):
    """The same state as a Concat-graph feed, laid into fixed-capacity buffers (unused slots random)."""
    rng = np.random.default_rng(5)
    out = {"input_ids": feeds["input_ids"], "position_ids": feeds["position_ids"]}
    for name in io.past_names:
        b, h, p, d = feeds[name].shape
        buf = rng.standard_normal((b, h, cap, d)).astype(feeds[name].dtype) * 30  # garbage must be masked
        buf[:, :, :p] = feeds[name]
        out[name] = buf
    return out


def test_graph_shape_after(before, llama_export):
    _, io = llama_export
    assert KvCacheScatterPass(CAP)(before).modified
    counts = op_counts(before)
    assert counts["TensorScatter"] == 2 * io.num_layers
    assert counts["Attention"] == io.num_layers
    for out in before.graph.outputs[1:]:
        assert out.producer().op_type == "TensorScatter"  # no Concat on the cache path
        assert list(out.shape)[1:] == [io.num_kv_heads, CAP, io.head_dim]
    for node in before.graph:
        if node.op_type == "Attention":
            assert node.inputs[1].producer().op_type == "TensorScatter"
    names = [v.name for v in before.graph.inputs]
    assert names == ["input_ids", "position_ids", *io.past_names]  # attention_mask is gone
    assert before.opset_imports[""] == 24


def test_onnxruntime_before_vs_after_with_ragged_positions(before, llama_export, tmp_path):
    _, io = llama_export
    ref_path = save(before, tmp_path / "before.onnx")
    KvCacheScatterPass(CAP)(before)
    after_path = save(before, tmp_path / "after.onnx")
    # Row 0 has 6 cached tokens, row 1 has 2: each row's Concat run is the reference for that row.
    for past in (6, 2):
        feeds = feeds_with_past(io, np.float32, batch=1, seq=3, past=past, seed=past)
        ref = run_onnx(ref_path, feeds)
        got = run_onnx(after_path, _fixed(feeds, io))
        np.testing.assert_allclose(got["logits"], ref["logits"], atol=1e-5, rtol=1e-5)
        for present in io.present_names:
            np.testing.assert_array_equal(got[present][:, :, : past + 3], ref[present])
    # Both rows in one batch, each at its own positions.
    a = feeds_with_past(io, np.float32, batch=1, seq=1, past=6, seed=1)
    b = feeds_with_past(io, np.float32, batch=1, seq=1, past=2, seed=2)
    fa, fb = _fixed(a, io), _fixed(b, io)
    batch = {k: np.concatenate([fa[k], fb[k]]) for k in fa}
    got = run_onnx(after_path, batch)
    np.testing.assert_allclose(got["logits"][0], run_onnx(ref_path, a)["logits"][0], atol=1e-5)
    np.testing.assert_allclose(got["logits"][1], run_onnx(ref_path, b)["logits"][0], atol=1e-5)


def test_backend_builds_kv_cache_update_and_attention(before, llama_export, tmp_path):
    _, io = llama_export
    KvCacheScatterPass(CAP)(before)
    CastFp16Pass()(before)
    engine = build_with_backend(save(before, tmp_path / "m.onnx"), tmp_path, max_seq=CAP)
    assert engine.layer_types.get("KV_CACHE_UPDATE") == 2 * io.num_layers
    assert engine.layer_types.get("ATTENTION_INPUT") == io.num_layers
    assert "SOFTMAX" not in engine.layer_types
    assert engine.layer_types.get("CONCATENATION", 0) < 2 * io.num_layers  # only shape arithmetic is left
    cache = [t for t in engine.tensors if t.name.startswith("past_key_values")]
    assert all(t.shape == (-1, io.num_kv_heads, CAP, io.head_dim) for t in cache)


def test_requires_gqa_native_attention_first(fresh_llama_model):
    CleanupPass()(fresh_llama_model)
    with pytest.raises(ir.passes.PreconditionError, match="gqa-native-attention"):
        KvCacheScatterPass(CAP)(fresh_llama_model)


# --- one synthetic layer: Attention over a Concat-grown cache (milliseconds; what mutation testing runs) ---

BATCH, HEADS, KV, SEQ, PAST, DIM = 2, 4, 2, 3, 4, 8


def concat_cache_layer(axis: int = 2, past_first: bool = True, position_ids: bool = True, opset: int = 23,
                       key_via: str | None = None, present_value_via: str | None = None):
    """present.0.{key,value} = Concat(past, new) feeding a GQA Attention whose mask is the graph's
    `attention_mask` input (bool [B, 1, S, P+S]), the shape the exporter leaves after gqa-native-attention.
    key_via: an op between the key Concat and Attention; present_value_via: an op between the value
    Concat and its graph output. `input_ids` is an input nothing reads and `new_key_twice` an output
    made by a Concat that is no cache (the pass must keep both)."""
    from onnx import TensorProto, helper

    f, total = TensorProto.FLOAT, "past_plus_seq"
    nodes, outputs = [], [helper.make_tensor_value_info("out", f, ["batch", HEADS, SEQ, DIM])]
    for kv in ("key", "value"):
        past, new = f"past_key_values.0.{kv}", f"new_{kv}"
        via = present_value_via if kv == "value" else None
        nodes.append(helper.make_node("Concat", [past, new] if past_first else [new, past],
                                      [f"concat_{kv}" if via else f"present.0.{kv}"], axis=axis, name=f"concat_{kv}"))
        if via:
            nodes.append(helper.make_node(via, [f"concat_{kv}"], [f"present.0.{kv}"]))
        outputs.append(helper.make_tensor_value_info(f"present.0.{kv}", f, ["batch", KV, total, DIM]))
    key, value = "present.0.key", "concat_value" if present_value_via else "present.0.value"
    if key_via:
        nodes.append(helper.make_node(key_via, [key], ["key_for_attention"]))
        key = "key_for_attention"
    nodes.append(helper.make_node("Attention", ["query", key, value, "attention_mask"], ["out"], name="attention"))
    nodes.append(helper.make_node("Concat", ["new_key", "new_key"], ["new_key_twice"], axis=2))  # not a cache
    outputs.append(helper.make_tensor_value_info("new_key_twice", f, ["batch", KV, 2 * SEQ, DIM]))
    inputs = [helper.make_tensor_value_info("query", f, ["batch", HEADS, SEQ, DIM])]
    inputs += [helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", SEQ])] * position_ids
    inputs += [helper.make_tensor_value_info("attention_mask", TensorProto.BOOL, ["batch", 1, SEQ, total]),
               helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", SEQ])]
    for kv in ("key", "value"):
        inputs += [helper.make_tensor_value_info(f"past_key_values.0.{kv}", f, ["batch", KV, "past", DIM]),
                   helper.make_tensor_value_info(f"new_{kv}", f, ["batch", KV, SEQ, DIM])]
    graph = helper.make_graph(nodes, "concat_cache", inputs, outputs)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _synthetic_feeds():
    """Two sequences at different positions: the second has one real past token fewer (left in the
    buffer as padding that its own next token overwrites)."""
    rng = np.random.default_rng(3)
    starts = np.array([PAST, PAST - 1])
    feeds = {"query": rng.standard_normal((BATCH, HEADS, SEQ, DIM)).astype(np.float32),
             "position_ids": starts[:, None] + np.arange(SEQ)[None], "input_ids": np.zeros((BATCH, SEQ), np.int64)}
    for kv in ("key", "value"):
        feeds[f"past_key_values.0.{kv}"] = rng.standard_normal((BATCH, KV, PAST, DIM)).astype(np.float32)
        feeds[f"new_{kv}"] = rng.standard_normal((BATCH, KV, SEQ, DIM)).astype(np.float32)
    return feeds


def _ort(model, feeds, names):
    import onnxruntime as ort

    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    wanted = {v.name for v in model.graph.inputs}
    return dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in wanted})))


def test_synthetic_layer_writes_at_position_and_masks_by_slot():
    """Reference: the Concat graph per sequence, with exactly its own past and the causal mask
    slot <= position; after the pass: one fixed buffer (garbage beyond what was written), new entries
    written at position_ids[b, 0], same attention output."""
    feeds = _synthetic_feeds()
    model = concat_cache_layer()
    assert KvCacheScatterPass(CAP)(model).modified
    assert {v.name for v in model.graph.inputs} == {"query", "position_ids", "input_ids", "past_key_values.0.key",
                                                    "new_key", "past_key_values.0.value", "new_value"}  # attention_mask gone
    assert model.opset_imports[""] == 24 and [n.op_type for n in model.graph].count("Concat") == 1
    assert model.graph.outputs[-1].name == "new_key_twice" and model.graph.outputs[-1].producer().op_type == "Concat"
    for past in model.graph.inputs[-4::2]:  # the cache inputs are fixed-capacity buffers now
        assert past.name.startswith("past_key_values.") and str(past.shape[0]) == "batch"
        assert list(past.shape)[1:] == [KV, CAP, DIM]
    scatters = [n for n in model.graph if n.op_type == "TensorScatter"]
    assert len(scatters) == 2 and all(n.attributes["axis"].as_int() == 2 for n in scatters)
    for out in model.graph.outputs[1:3]:
        assert out.producer().op_type == "TensorScatter" and list(out.shape)[1:] == [KV, CAP, DIM]
        assert str(out.shape[0]) == "batch"
    attention = next(n for n in model.graph if n.op_type == "Attention")
    assert len(attention.inputs) == 4 and attention.inputs[3].name == "kv_cache.causal_mask_Bx1xSxT"

    rng = np.random.default_rng(4)
    fixed = dict(feeds)
    for kv in ("key", "value"):
        buffer = (30 * rng.standard_normal((BATCH, KV, CAP, DIM))).astype(np.float32)  # must never be read
        buffer[:, :, :PAST] = feeds[f"past_key_values.0.{kv}"]
        fixed[f"past_key_values.0.{kv}"] = buffer
    got = _ort(model, fixed, ["out", "present.0.key", "present.0.value"])
    reference = concat_cache_layer()
    for b, start in enumerate(feeds["position_ids"][:, 0]):
        one = {k: v[b:b + 1] for k, v in feeds.items()}
        for kv in ("key", "value"):
            one[f"past_key_values.0.{kv}"] = one[f"past_key_values.0.{kv}"][:, :, :start]
        slots, positions = np.arange(start + SEQ), feeds["position_ids"][b]
        one["attention_mask"] = (slots[None, :] <= positions[:, None])[None, None]
        want = _ort(reference, one, ["out", "present.0.key", "present.0.value"])
        np.testing.assert_allclose(got["out"][b], want["out"][0], atol=1e-5, rtol=1e-5)
        for kv in ("key", "value"):
            buffer = got[f"present.0.{kv}"][b]
            np.testing.assert_array_equal(buffer[:, :start + SEQ], want[f"present.0.{kv}"][0])
            np.testing.assert_array_equal(buffer[:, start + SEQ:], fixed[f"past_key_values.0.{kv}"][b][:, start + SEQ:])


def test_synthetic_layer_preconditions_name_what_is_wrong():
    with pytest.raises(ir.passes.PreconditionError, match="graph has no 'position_ids' input"):
        KvCacheScatterPass(CAP)(concat_cache_layer(position_ids=False))
    with pytest.raises(ir.passes.PreconditionError, match=r"^present\.0\.key is a Concat, but not of past_key_values\.0\.key and new entries$"):
        KvCacheScatterPass(CAP)(concat_cache_layer(past_first=False))
    with pytest.raises(ir.passes.PreconditionError, match=r"^concat_key: cache Concat on axis 1, not 2$"):
        KvCacheScatterPass(CAP)(concat_cache_layer(axis=1))
    with pytest.raises(ir.passes.PreconditionError,
                       match=r"^attention: Attention's key does not come straight from the cache \(run gqa-native-attention before kv-cache-scatter\)$"):
        KvCacheScatterPass(CAP)(concat_cache_layer(key_via="Identity"))
    with pytest.raises(ir.passes.PostconditionError, match=r"^cache outputs not updated by TensorScatter: \['present\.0\.value'\]$"):
        KvCacheScatterPass(CAP)(concat_cache_layer(present_value_via="Identity"))
    model = concat_cache_layer(axis=-2)
    assert KvCacheScatterPass(CAP)(model).modified is True  # -2 is axis 2 of a rank-4 cache
    assert KvCacheScatterPass(CAP)(model).modified is False  # nothing left to rewrite
    newer = concat_cache_layer(opset=25)
    KvCacheScatterPass(CAP)(newer)
    assert newer.opset_imports[""] == 25  # raised to TensorScatter's 24 if below, never lowered


def _windowed_reference(feeds, window: int | None) -> list[np.ndarray]:
    """Per sequence, the Concat graph with exactly its own past and the mask slot <= position, and
    slot > position - window where a window is given."""
    reference, outs = concat_cache_layer(), []
    for b, start in enumerate(feeds["position_ids"][:, 0]):
        one = {k: v[b:b + 1] for k, v in feeds.items()}
        for kv in ("key", "value"):
            one[f"past_key_values.0.{kv}"] = one[f"past_key_values.0.{kv}"][:, :, :start]
        slots, positions = np.arange(start + SEQ)[None, :], feeds["position_ids"][b][:, None]
        mask = slots <= positions
        if window:
            mask &= slots > positions - window
        one["attention_mask"] = mask[None, None]
        outs.append(_ort(reference, one, ["out"])["out"][0])
    return outs


def _fixed_buffers(feeds) -> dict:
    rng, fixed = np.random.default_rng(4), dict(feeds)
    for kv in ("key", "value"):
        buffer = (30 * rng.standard_normal((BATCH, KV, CAP, DIM))).astype(np.float32)  # must never be read
        buffer[:, :, :PAST] = feeds[f"past_key_values.0.{kv}"]
        fixed[f"past_key_values.0.{kv}"] = buffer
    return fixed


@pytest.mark.parametrize("how, window", [("metadata", 2), ("option", 2), ("option", 1), ("metadata", 0), ("option", CAP)],
                         ids=["export-metadata", "option", "window-1", "metadata-full", "window-of-the-capacity"])
def test_synthetic_sliding_window_masks_slots_before_the_window(how, window):
    """A sliding layer (window 2: each query sees its own and the previous slot) gets
    pos - window < slot <= pos, from the export's llmc.layer_windows or the pass's option (through
    make_pass, as a recipe builds it); window 0, or a window the cache cannot exceed, masks causally only."""
    from passes import PassContext, make_pass

    feeds, model = _synthetic_feeds(), concat_cache_layer()
    if how == "metadata":
        model.graph.metadata_props["llmc.layer_windows"] = str(window)
        kv_pass = make_pass("kv-cache-scatter", PassContext(max_positions=CAP))
    else:
        kv_pass = make_pass("kv-cache-scatter", PassContext(max_positions=CAP), {"windows": (window,)})
    assert kv_pass(model).modified is True
    assert all(list(p.shape)[2] == CAP for p in model.graph.inputs if p.name.startswith("past_key_values."))
    got = _ort(model, _fixed_buffers(feeds), ["out"])["out"]
    slides = 0 < window < CAP
    assert ("Greater" in {n.op_type for n in model.graph}) == slides  # a window that masks nothing adds no nodes
    for b, want in enumerate(_windowed_reference(feeds, window if slides else None)):
        np.testing.assert_allclose(got[b], want, atol=1e-5, rtol=1e-5)
    if slides:  # and it differs from the causal-only answer: the window masked something
        assert not np.allclose(got[0], _windowed_reference(feeds, None)[0], atol=1e-3)


def test_synthetic_windows_that_do_not_fit_the_layers_are_refused_before_any_change():
    with pytest.raises(ir.passes.PreconditionError, match="^2 layer windows for 1 cached layers$"):
        KvCacheScatterPass(CAP, windows=(2, 2))(concat_cache_layer())
    model = concat_cache_layer()
    attention = next(n for n in model.graph if n.op_type == "Attention")
    not_cache = next(o for o in model.graph.outputs if o.name == "new_key_twice")
    attention.replace_input_with(1, not_cache)  # its key is a Concat, but of no cache
    before = [n.op_type for n in model.graph]
    with pytest.raises(ir.passes.PreconditionError,
                       match=r"^attention: its key is not a cache Concat, so its layer \(and window\) is unknown$"):
        KvCacheScatterPass(CAP, windows=(2,))(model)
    assert [n.op_type for n in model.graph] == before
    assert KvCacheScatterPass(CAP)(concat_cache_layer()).modified is True
    assert KvCacheScatterPass(CAP)(KvCacheScatterPass(CAP)(concat_cache_layer()).model).modified is False


def test_layer_windows_read_the_exports_metadata_and_the_postcondition_names_the_outputs():
    from passes.kv_cache_scatter import layer_windows

    model = concat_cache_layer()
    assert layer_windows(model) == ()
    model.graph.metadata_props["llmc.layer_windows"] = "0,4096,0"
    assert layer_windows(model) == (0, 4096, 0)
    with pytest.raises(ir.passes.PostconditionError,
                       match=r"^cache outputs not updated by TensorScatter: \['present.0.key', 'present.0.value'\]$"):
        KvCacheScatterPass(CAP).ensures(concat_cache_layer())
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1]))
    nodes = [ir.node("Identity", [x]) for _ in range(6)]
    for i, node in enumerate(nodes):
        node.outputs[0].name = f"present.{i}.key"
    six = ir.Model(ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, opset_imports={"": 24}), ir_version=10)
    with pytest.raises(ir.passes.PostconditionError, match=r"^cache outputs not updated by TensorScatter: "
                       r"\['present.0.key', 'present.1.key', 'present.2.key', 'present.3.key'\]$"):  # the first four
        KvCacheScatterPass(CAP).ensures(six)
