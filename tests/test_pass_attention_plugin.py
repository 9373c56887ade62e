"""attention-plugin(-fp8kv): graph shape, onnxruntime numerics against the FP16 graph and the PyTorch
reference, and the TensorRT side (refused before parsing where plugins are missing)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from compiler.engine.backend import get_backend
from compiler.errors import BackendBuildError
from compiler.runtime.runner import Runner
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from passes import PassContext, make_pass, needs_plugins
from passes.attention_plugin import DOMAIN, OP, AttentionPluginPass
from plugins import attention_reference as ref

PROMPTS = [[1, 5, 9, 200, 33, 7, 8, 100, 41, 3], [4, 4, 300]]


def _rewrite(path, tmp_path, name, window=0, **options):
    model = ir.load(path)
    make_pass(name, PassContext(max_positions=128, sliding_window=window), **options)(model)
    out = tmp_path / f"{name}-w{window}.onnx"
    ir.save(model, out)
    return model, out


@pytest.fixture(scope="module")
def fp8_graph(final_fp16_llama, tmp_path_factory):
    return _rewrite(final_fp16_llama, tmp_path_factory.mktemp("fp8kv"), "attention-plugin-fp8kv")


def test_every_layer_becomes_one_plugin_node_with_fp8_cache_io(fp8_graph, final_fp16_llama):
    model, path = fp8_graph
    before = ir.load(final_fp16_llama)
    layers = sum(1 for n in before.graph if n.op_type == "Attention")
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ops.count((DOMAIN, OP)) == layers > 0
    assert ("", "Attention") not in ops and ("", "TensorScatter") not in ops
    caches = [v for v in (*model.graph.inputs, *model.graph.outputs) if "key" in v.name or "value" in v.name]
    assert len(caches) == 4 * layers and all(v.dtype == ir.DataType.FLOAT8E4M3FN for v in caches)
    for node in model.graph:
        if node.domain == DOMAIN:
            k_scale, v_scale = node.inputs[6].const_value.numpy(), node.inputs[7].const_value.numpy()
            assert k_scale.shape == v_scale.shape == (2,) and (k_scale > 0).all() and (v_scale > 0).all()
            # how TensorRT's ONNX parser maps the node to the AOT plugin of plugins/trt_plugin.py
            assert node.attributes["plugin_namespace"].as_string() == "llmc" and node.attributes["aot"].as_int() == 1
    assert (DOMAIN, OP, "") in model.functions and model.opset_imports[DOMAIN] == 1
    onnx.checker.check_model(onnx.load(path), full_check=True)


def test_plugin_graph_without_fp8_matches_the_fp16_graph_exactly(final_fp16_llama, tmp_path):
    _, plugin = _rewrite(final_fp16_llama, tmp_path, "attention-plugin")
    native, custom = Runner(OnnxRuntimeExecutor(final_fp16_llama)), Runner(OnnxRuntimeExecutor(plugin))
    assert custom.generate(PROMPTS, 12).tokens == native.generate(PROMPTS, 12).tokens
    forced = native.generate(PROMPTS[:1], 12).tokens[0]
    for a, b in zip(native.teacher_forced(PROMPTS[0], forced), custom.teacher_forced(PROMPTS[0], forced)):
        assert np.abs(a - b).max() < 1e-3


def test_fp8_cache_generation_end_to_end_against_the_fp16_graph(fp8_graph, final_fp16_llama):
    """Tolerance = the fp8kv recipe's: FP8 K/V costs ~2-4% relative error per attention (3 mantissa bits)."""
    native, fp8 = Runner(OnnxRuntimeExecutor(final_fp16_llama)), Runner(OnnxRuntimeExecutor(fp8_graph[1]))
    out = fp8.generate(PROMPTS, 12)  # batched, different lengths: the FP8 cache round-trips through the runner
    assert [len(t) for t in out.tokens] == [12, 12]
    forced = native.generate(PROMPTS[:1], 16).tokens[0]
    a, b = native.teacher_forced(PROMPTS[0], forced), fp8.teacher_forced(PROMPTS[0], forced)
    errors = [np.abs(x - y) for x, y in zip(a, b)]
    agree = np.mean([x.argmax(-1)[-1] == y.argmax(-1)[-1] for x, y in zip(a, b)])
    assert max(e.max() for e in errors) < 0.3 and np.mean([e.mean() for e in errors]) < 0.05 and agree >= 0.88
    assert max(e.max() for e in errors) > 0  # the cache really is FP8: not bit-identical to FP16


def _single_node_model(fp8: bool, window: int, q_heads=8, kv_heads=2, head_dim=16, capacity=32, scale=0.25):
    """A graph of one llmc::PagedAttention node and its function: the body on its own."""
    pass_ = AttentionPluginPass(kv_dtype="float8e4m3fn" if fp8 else "float16", window=window)
    function = pass_._function(ir.DataType.FLOAT16, scale)
    f16, cache_t = ir.DataType.FLOAT16, ir.DataType.FLOAT8E4M3FN if fp8 else ir.DataType.FLOAT16

    def value(name, dtype, shape):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    ins = [value("q", f16, ["B", q_heads, "S", head_dim]), value("k", f16, ["B", kv_heads, "S", head_dim]),
           value("v", f16, ["B", kv_heads, "S", head_dim]),
           value("past_k", cache_t, ["B", kv_heads, capacity, head_dim]),
           value("past_v", cache_t, ["B", kv_heads, capacity, head_dim]),
           value("position_ids", ir.DataType.INT64, ["B", "S"]),
           value("k_scale", ir.DataType.FLOAT, [kv_heads]), value("v_scale", ir.DataType.FLOAT, [kv_heads])]
    node = ir.node(OP, ins, domain=DOMAIN, num_outputs=3, attributes={"scale": scale, "window": window})
    for out, name, dtype in zip(node.outputs, ("out", "present_k", "present_v"), (f16, cache_t, cache_t)):
        out.name, out.type = name, ir.TensorType(dtype)
    graph = ir.Graph(ins, list(node.outputs), nodes=[node], opset_imports={"": 24, DOMAIN: 1})
    model = ir.Model(graph, ir_version=10, functions=[function])
    return model


def _run_plain(path, feeds):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for inp in session.get_inputs():
        if inp.type == "tensor(float8e4m3fn)":
            feeds[inp.name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(feeds[inp.name], onnx.TensorProto.FLOAT8E4M3FN)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
@pytest.mark.parametrize("window", [0, 5])
def test_function_body_matches_the_pytorch_reference(fp8, window, tmp_path):
    """The ONNX decomposition (what onnxruntime runs) and plugins/attention_reference.py (what the kernel
    is checked against) are the same function: cache write, FP8 rounding, GQA, causal + window mask."""
    torch.manual_seed(window + fp8)
    path = tmp_path / "one.onnx"
    ir.save(_single_node_model(fp8, window), path)
    batch, q_len, start = 2, 3, torch.tensor([9, 20])  # decode-like: 3 new tokens after 9 / 20 cached
    q = torch.randn(batch, 8, q_len, 16).half()
    k_new, v_new = torch.randn(batch, 2, q_len, 16).half(), torch.randn(batch, 2, q_len, 16).half()
    k_past, v_past = torch.randn(batch, 2, 32, 16).half(), torch.randn(batch, 2, 32, 16).half()
    positions = start[:, None] + torch.arange(q_len)[None]
    feeds = {"q": q.numpy(), "k": k_new.numpy(), "v": v_new.numpy(), "position_ids": positions.numpy()}
    if fp8:
        ks, vs = ref.fp8_scales(k_past), ref.fp8_scales(v_past)
        k_past, v_past = ref.quantize_fp8(k_past, ks), ref.quantize_fp8(v_past, vs)
        feeds.update(k_scale=ks.numpy(), v_scale=vs.numpy(),
                     past_k=k_past.view(torch.uint8).numpy(), past_v=v_past.view(torch.uint8).numpy())
    else:
        ks = vs = None
        feeds.update(past_k=k_past.numpy(), past_v=v_past.numpy(), k_scale=np.ones(2, np.float32),
                     v_scale=np.ones(2, np.float32))
    got = _run_plain(path, feeds)

    k_cache, v_cache = k_past.clone(), v_past.clone()
    for cache, new, s in ((k_cache, k_new, ks), (v_cache, v_new, vs)):
        written = ref.quantize_fp8(new, s) if fp8 else new
        for b in range(batch):
            cache[b, :, int(start[b]): int(start[b]) + q_len] = written[b]
    expected = ref.attention_reference(q, k_cache, v_cache, start + q_len, k_scale=ks, v_scale=vs, window=window,
                                       sm_scale=0.25)
    as_bytes = (lambda t: t.view(torch.uint8).numpy()) if fp8 else (lambda t: t.numpy())
    assert np.array_equal(got["present_k"], as_bytes(k_cache)) and np.array_equal(got["present_v"], as_bytes(v_cache))
    err = np.abs(got["out"].astype(np.float32) - expected.numpy()).max()
    assert err < 5e-3, err


def test_window_changes_only_positions_past_it(final_fp16_llama, tmp_path):
    """A window wider than every position is the full causal attention; a narrow one changes later logits only."""
    _, wide = _rewrite(final_fp16_llama, tmp_path, "attention-plugin", window=100)
    _, narrow = _rewrite(final_fp16_llama, tmp_path, "attention-plugin", window=4)
    ids = np.array([PROMPTS[0]], np.int64)
    pos = np.arange(ids.shape[1])[None]
    outs = []
    for path in (final_fp16_llama, wide, narrow):
        ex = OnnxRuntimeExecutor(path)
        ex.start(1)
        outs.append(ex.step(ids, pos)[0])
    assert np.abs(outs[0] - outs[1]).max() < 1e-3
    assert np.abs(outs[0][:4] - outs[2][:4]).max() < 1e-3  # positions 0..3 see at most 4 keys either way
    assert np.abs(outs[0][4:] - outs[2][4:]).max() > 1e-2


def test_plugin_recipes_are_marked_and_refused_before_parsing_without_plugins(fp8_graph, tmp_path, monkeypatch):
    from compiler.driver import build as driver
    from compiler.stages import export as export_stage, load as load_stage
    from compiler.engine.engine_build import build_engine
    from compiler.recipe import load_recipe
    from compiler.engine.engine_build import BuildOptions

    assert needs_plugins(load_recipe("fp8kv").passes) and needs_plugins(load_recipe("fp16-plugin").passes)
    assert not needs_plugins(load_recipe("fp16").passes)
    backend = get_backend()
    if backend.supports_plugins:
        pytest.skip(f"{backend.name} {backend.version} has plugin layers: building needs the llmc plugin "
                    "registered (plugins/trt_plugin.py) and a GPU; the refusal path does not apply")
    with pytest.raises(BackendBuildError, match="plugin.*install full TensorRT"):
        build_engine(fp8_graph[1], tmp_path / "x.plan", BuildOptions(), backend)
    assert not (tmp_path / "x.plan").exists()

    def no_export(*_a, **_k):
        raise AssertionError("exported before refusing the plugin recipe")

    monkeypatch.setattr(export_stage, "export_onnx", no_export)
    monkeypatch.setattr(load_stage, "load_model", no_export)
    with pytest.raises(BackendBuildError, match="fp8kv.*TensorRT-RTX has no plugins"):
        driver.run_build(driver.BuildRequest(recipe="fp8kv", output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_requires_the_cache_scatter_form(fresh_llama_model):
    with pytest.raises(ir.passes.PreconditionError, match="kv-cache-scatter"):
        AttentionPluginPass()(fresh_llama_model)



# --- the pass on hand-built decoders (seconds, no model) --------------------------------------------------
# Two layers of embedding -> q/k/v projections -> TensorScatter caches -> native Attention (the form
# kv-cache-scatter and gqa-native-attention leave), built by hand so each case the pass must take or refuse
# is one graph. The reference for every numeric check is the same graph before the pass, run by onnxruntime
# with its own native Attention and TensorScatter: the plugin node's function body is not involved in it.
SB, SQ, SKV, SD, SC, SV = 2, 4, 2, 8, 16, 32  # batch, query heads, kv heads, head dim, capacity, vocab
SCALE = 0.35


def _decoder(layers=2, capacity=SC, scales=None, is_causal=None, windows=None, shape_reads=(), reader=None,
             past_as_input=True, logits_positions=False, zero_head=False, drop_input=None, plain_kv=False,
             dtype=np.float16, shape_read_is_output=False):
    """The decoder graph; `shape_reads` adds Shape(past_key_values.0.key, start, end) nodes (as the exporter's
    batch-size reads), `reader` another op reading that cache, `zero_head` zeroes kv head 1's key projection."""
    from compiler.graph_io import LOGITS_AT

    rng = np.random.default_rng(7)
    f16 = ir.DataType.from_numpy(np.dtype(dtype))  # FLOAT16 unless asked (an FP32 graph: before cast-fp16)
    i64 = ir.DataType.INT64

    def value(name, dtype, shape):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    ids, pos = value("input_ids", i64, ["batch", "seq"]), value("position_ids", i64, ["batch", "seq"])
    inputs = [ids, pos]
    if logits_positions:
        inputs.append(value(LOGITS_AT, i64, ["batch", "n"]))
    graph = ir.Graph(inputs, [], nodes=[], name="decoder", opset_imports={"": 24})

    def init(name, array):
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(array.dtype)), shape=ir.Shape(array.shape),
                     const_value=ir.tensor(array, name=name))
        graph.register_initializer(v)
        return v

    def add(op, ins, **attrs):
        node = ir.node(op, ins, attributes=attrs)
        graph.append(node)
        return node.outputs[0]

    width = SQ * SD
    x = add("Gather", [init("embed", rng.standard_normal((SV, width)).astype(dtype)), ids], axis=0)
    write_index = add("Gather", [pos, init("zero", np.array(0, np.int64))], axis=1)
    slots = add("Unsqueeze", [add("Range", [init("r0", np.array(0, np.int64)), init("cap", np.array(capacity, np.int64)),
                                           init("r1", np.array(1, np.int64))]), init("slot_axes", np.array([0, 1, 2], np.int64))])
    mask = add("LessOrEqual", [slots, add("Unsqueeze", [pos, init("pos_axes", np.array([1, 3], np.int64))])])
    outputs = []
    for i in range(layers):
        heads = {}
        for name, h in (("q", SQ), ("k", SKV), ("v", SKV)):
            w = (rng.standard_normal((width, h * SD)) / width ** 0.5).astype(dtype)
            if zero_head and name == "k":
                w[:, SD:2 * SD] = 0
            y = add("Reshape", [add("MatMul", [x, init(f"w{name}{i}", w)]), init(f"shape_{name}{i}", np.array([0, 0, h, SD], np.int64))])
            heads[name] = add("Transpose", [y], perm=[0, 2, 1, 3])
            heads[name].type, heads[name].shape = ir.TensorType(f16), ir.Shape(["batch", h, "seq", SD])
        caches = {}
        for kv in ("key", "value"):
            past = value(f"past_key_values.{i}.{kv}", f16, ["batch", SKV, capacity, SD])
            if past_as_input:
                graph.inputs.append(past)
            else:  # a cache made inside the graph: nothing a pool could replace
                past = add("Expand", [init(f"zeros{i}{kv}", np.zeros((1, SKV, capacity, SD), dtype)),
                                      add("Concat", [add("Shape", [ids], start=0, end=1),
                                                     init(f"rest{i}{kv}", np.array([SKV, capacity, SD], np.int64))], axis=0)])
                past.type, past.shape = ir.TensorType(f16), ir.Shape(["batch", SKV, capacity, SD])
                past.name = f"made.{i}.{kv}"
            if plain_kv:
                caches[kv] = past
                continue
            scatter = ir.node("TensorScatter", [past, heads[kv[0]], write_index], attributes={"axis": 2},
                              name=f"scatter.{i}.{kv}")
            graph.append(scatter)
            out = scatter.outputs[0]
            out.name, out.type, out.shape = f"present.{i}.{kv}", ir.TensorType(f16), ir.Shape(["batch", SKV, capacity, SD])
            caches[kv] = out
            outputs.append(out)
        attrs = {} if scales == "none" else {"scale": (scales or [SCALE] * layers)[i]}
        if is_causal is not None:
            attrs["is_causal"] = is_causal
        attention = ir.node("Attention", [heads["q"], caches["key"], caches["value"], mask], attributes=attrs,
                            name=f"attention.{i}")
        graph.append(attention)
        attention.outputs[0].name = f"attention.{i}.out"
        attention.outputs[0].type, attention.outputs[0].shape = ir.TensorType(f16), ir.Shape(["batch", SQ, "seq", SD])
        o = add("Reshape", [add("Transpose", [attention.outputs[0]], perm=[0, 2, 1, 3]),
                            init(f"merge{i}", np.array([0, 0, width], np.int64))])
        x = add("Add", [x, o])
    if logits_positions:
        x = add("GatherND", [x, add("Unsqueeze", [graph.inputs[2], init("lp_axes", np.array([2], np.int64))])], batch_dims=1)
    logits = add("MatMul", [x, init("lm_head", (rng.standard_normal((width, SV)) / width ** 0.5).astype(dtype))])
    logits.name, logits.type, logits.shape = "logits", ir.TensorType(f16), ir.Shape(["batch", "seq", SV])
    for start, end in shape_reads:
        attrs = {} if start is None else {"start": start}
        if end is not None:
            attrs["end"] = end
        node = ir.node("Shape", [graph.inputs[2 + logits_positions]], attributes=attrs, name=f"shape_read_{start}_{end}")
        graph.append(node)
        out = node.outputs[0] if shape_read_is_output else add("Identity", [node.outputs[0]])
        out.name = f"shape_read_{start}_{end}"
        graph.outputs.append(out)
    if reader:
        node = ir.node(reader, [graph.inputs[2 + logits_positions]], name="cache_reader")
        graph.append(node)
        node.outputs[0].name = "cache_reader_out"
        graph.outputs.append(node.outputs[0])
    graph.outputs[:0] = [logits, *outputs]
    if windows is not None:
        from passes.kv_cache_scatter import LAYER_WINDOWS
        graph.metadata_props[LAYER_WINDOWS] = ",".join(map(str, windows))
    if drop_input:
        graph.inputs.remove(next(v for v in graph.inputs if v.name == drop_input))
    return ir.Model(graph, ir_version=10)


def _decode_feeds(start=5, seq=3, seed=1, dtype=np.float16):
    """A decode-like step: `start` positions already cached (random K/V there, zeros after), `seq` new tokens."""
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, SV, (SB, seq)), "position_ids": np.tile(np.arange(start, start + seq), (SB, 1))}
    for i in range(2):
        for kv in ("key", "value"):
            past = np.zeros((SB, SKV, SC, SD), np.float32)
            past[:, :, :start] = rng.standard_normal((SB, SKV, start, SD))
            feeds[f"past_key_values.{i}.{kv}"] = past.astype(dtype)
    return feeds


def _run_model(model, feeds, tmp_path, name="m.onnx"):
    path = tmp_path / name
    ir.save(model, path)
    return _run_plain(path, dict(feeds))


def test_synthetic_each_layer_becomes_one_node_and_computes_the_native_graph(tmp_path):
    feeds = _decode_feeds()
    want = _run_model(_decoder(), feeds, tmp_path, "before.onnx")
    model = _decoder()
    pass_ = AttentionPluginPass(window=None)
    assert pass_(model).modified and pass_.window == 0
    plugin = [n for n in model.graph if n.domain == DOMAIN]
    assert [n.op_type for n in plugin] == [OP, OP] and [n.name for n in plugin] == ["llmc.paged_attention.0",
                                                                                    "llmc.paged_attention.1"]
    assert not [n for n in model.graph if n.op_type in ("Attention", "TensorScatter")]
    for i, node in enumerate(plugin):
        assert [v.name for v in node.inputs[1:6]] == [node.inputs[1].name, node.inputs[2].name, f"past_key_values.{i}.key",
                                                     f"past_key_values.{i}.value", "position_ids"]
        assert node.inputs[1].producer().op_type == node.inputs[2].producer().op_type == "Transpose"
        for scale in node.inputs[6:8]:
            assert scale.is_initializer() and scale.dtype == ir.DataType.FLOAT and list(scale.shape) == [SKV]
            np.testing.assert_array_equal(scale.const_value.numpy(), np.ones(SKV, np.float32))  # unused for FP16
            assert scale.const_value.dtype == ir.DataType.FLOAT  # the tensor as stored, not only the declared type
        assert [o.name for o in node.outputs] == [f"attention.{i}.out", f"present.{i}.key", f"present.{i}.value"]
        assert node.outputs[1].dtype == ir.DataType.FLOAT16 and list(node.outputs[1].shape) == ["batch", SKV, SC, SD]
        assert node.outputs[0].dtype == ir.DataType.FLOAT16 and list(node.outputs[0].shape) == ["batch", SQ, "seq", SD]
        assert node.attributes["scale"].as_float() == pytest.approx(SCALE) and node.attributes["window"].as_int() == 0
        assert node.attributes["plugin_namespace"].as_string() == DOMAIN and node.attributes["aot"].as_int() == 1
    assert [o.name for o in model.graph.outputs] == ["logits"] + [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert (DOMAIN, OP, "") in model.functions and model.opset_imports[DOMAIN] == 1 and model.opset_imports[""] == 24
    got = _run_model(model, feeds, tmp_path)
    for name, array in want.items():
        np.testing.assert_allclose(got[name].astype(np.float32), array.astype(np.float32), atol=2e-3, rtol=0, err_msg=name)
    assert [n.op_type for n in model.graph].count("LessOrEqual") == 0  # the mask now lives in the body


def test_synthetic_a_newer_default_opset_is_kept_an_older_one_raised():
    model = _decoder()
    model.opset_imports[""] = 25
    AttentionPluginPass()(model)
    assert model.opset_imports[""] == 25
    model = _decoder()
    model.opset_imports[""] = 23
    AttentionPluginPass().call(model)
    assert model.opset_imports[""] == 24  # TensorScatter's opset, for the function body's ops


def test_synthetic_fp8_cache_with_given_scales(tmp_path):
    import ml_dtypes

    from passes.attention_plugin import AttentionPluginFp8KvPass

    feeds = _decode_feeds()
    want = _run_model(_decoder(), feeds, tmp_path, "before.onnx")
    scales = {f"present.{i}.{kv}": np.array([0.01 + 0.002 * i, 0.02], np.float32) for i in range(2) for kv in ("key", "value")}
    model = _decoder()
    pass_ = AttentionPluginPass(kv_dtype="float8e4m3fn", scales=scales)
    assert pass_.fp8 and pass_(model).modified
    for i, node in enumerate(n for n in model.graph if n.domain == DOMAIN):
        np.testing.assert_array_equal(node.inputs[6].const_value.numpy(), scales[f"present.{i}.key"])
        np.testing.assert_array_equal(node.inputs[7].const_value.numpy(), scales[f"present.{i}.value"])
        assert node.inputs[6].name == f"kv_scale.{i}.key" and node.inputs[7].name == f"kv_scale.{i}.value"
        for v in (node.inputs[3], node.inputs[4], node.outputs[1], node.outputs[2]):
            assert v.dtype == ir.DataType.FLOAT8E4M3FN
        assert node.outputs[0].dtype == ir.DataType.FLOAT16
    fp8_feeds = dict(feeds)
    for name in [n for n in feeds if n.startswith("past_")]:
        s = scales[name.replace("past_key_values", "present")][None, :, None, None]
        fp8_feeds[name] = (feeds[name].astype(np.float32) / s).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    got = _run_model(model, fp8_feeds, tmp_path)
    for i in range(2):  # the cache written: the native graph's present, rounded to FP8 on its scales
        for kv in ("key", "value"):
            s = scales[f"present.{i}.{kv}"][None, :, None, None]
            expected = (want[f"present.{i}.{kv}"].astype(np.float32) / s).astype(ml_dtypes.float8_e4m3fn)
            stored = got[f"present.{i}.{kv}"].view(ml_dtypes.float8_e4m3fn).astype(np.float32)
            # layer 0's new rows are the native graph's; layer 1's follow layer 0's FP8 attention: old rows only
            rows = slice(None) if i == 0 else slice(0, 5)
            np.testing.assert_array_equal(stored[:, :, rows], expected.astype(np.float32)[:, :, rows])
            assert not stored[:, :, 8:].any()
    error = np.abs(got["logits"].astype(np.float32) - want["logits"].astype(np.float32)).max()
    assert 0 < error < 0.15 * np.abs(want["logits"].astype(np.float32)).max()
    assert AttentionPluginFp8KvPass.from_context(PassContext(max_positions=SC, sliding_window=3)).kv_dtype == "float8e4m3fn"
    assert AttentionPluginFp8KvPass.from_context(PassContext(max_positions=SC, sliding_window=3)).window == 3
    assert AttentionPluginFp8KvPass.from_context(PassContext(max_positions=SC), paged=True, margin=2.0).paged
    with pytest.raises(ir.passes.PreconditionError, match=r"^no FP8 scale for present\.1\.value \(scales has "):
        AttentionPluginPass(kv_dtype="float8e4m3fn", scales={k: v for k, v in scales.items() if k != "present.1.value"})(_decoder())
    extra = {**{k: v for k, v in scales.items() if k != "present.1.value"}, "present.7.key": scales["present.0.key"],
             "present.8.key": scales["present.0.key"]}  # five names: the first four are listed
    with pytest.raises(ir.passes.PreconditionError) as info:
        AttentionPluginPass(kv_dtype="float8e4m3fn", scales=extra).call(_decoder())
    assert str(info.value) == ("no FP8 scale for present.1.value (scales has ['present.0.key', 'present.0.value', "
                               "'present.1.key', 'present.7.key'])")


@pytest.mark.parametrize("logits_positions", [False, True])
def test_synthetic_fp8_scales_are_calibrated_from_this_graphs_cache(tmp_path, logits_positions):
    """Per head: amax of the K/V this graph writes for `calibration_tokens` seeded random tokens, x margin / 448."""
    model = _decoder(logits_positions=logits_positions, zero_head=True)
    reference = _decoder(logits_positions=logits_positions, zero_head=True)
    tokens, margin, seed = 6, 1.5, 3
    pass_ = AttentionPluginPass(kv_dtype="float8e4m3fn", calibration_tokens=tokens, margin=margin, seed=seed)
    pass_(model)
    ids = np.random.default_rng(seed).integers(0, SV, (1, tokens), dtype=np.int64)
    feeds = {"input_ids": ids, "position_ids": np.arange(tokens)[None]}
    feeds.update({f"past_key_values.{i}.{kv}": np.zeros((1, SKV, SC, SD), np.float16) for i in range(2) for kv in ("key", "value")})
    if logits_positions:
        from compiler.graph_io import LOGITS_AT
        feeds[LOGITS_AT] = np.zeros((1, 1), np.int64)
    cache = _run_model(reference, feeds, tmp_path, "reference.onnx")
    for i, node in enumerate(n for n in model.graph if n.domain == DOMAIN):
        for kv, scale in (("key", node.inputs[6]), ("value", node.inputs[7])):
            present = cache[f"present.{i}.{kv}"].astype(np.float32)
            amax = np.abs(present).max(axis=(0, 2, 3))
            assert np.abs(present[:, :, tokens:]).max() == 0  # nothing written past the calibration tokens
            want = np.maximum(amax * margin / 448.0, np.finfo(np.float32).tiny)
            np.testing.assert_allclose(scale.const_value.numpy(), want, rtol=1e-6)
            assert scale.const_value.numpy().dtype == np.float32
            if kv == "key":  # head 1's keys are all zero: the smallest normal float32, not 0 (no 0 / 0)
                assert scale.const_value.numpy()[1] == np.finfo(np.float32).tiny


def test_synthetic_an_fp32_graph_is_calibrated_on_its_fp32_cache():
    pass_ = AttentionPluginPass(kv_dtype="float8e4m3fn", calibration_tokens=SC)
    fp32, fp16 = pass_._calibrate(_decoder(dtype=np.float32)), pass_._calibrate(_decoder())
    for name in fp16:  # the same weights, rounded to FP16 in one: the same scales to FP16 precision
        np.testing.assert_allclose(fp32[name], fp16[name], rtol=5e-3)


def test_synthetic_calibration_stops_at_the_cache_capacity():
    pass_ = AttentionPluginPass(kv_dtype="float8e4m3fn", calibration_tokens=10 * SC)
    scales = pass_._calibrate(_decoder())
    assert sorted(scales) == [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert all(s.shape == (SKV,) and s.dtype == np.float32 and (s > 0).all() for s in scales.values())
    more = AttentionPluginPass(kv_dtype="float8e4m3fn", calibration_tokens=SC)._calibrate(_decoder())
    for name in scales:  # same seed, every slot filled either way
        np.testing.assert_array_equal(scales[name], more[name])
    fewer = AttentionPluginPass(kv_dtype="float8e4m3fn", calibration_tokens=SC // 2)._calibrate(_decoder())
    assert any(not np.array_equal(scales[n], fewer[n]) for n in scales)  # half the slots: other amax
    other = AttentionPluginPass(kv_dtype="float8e4m3fn", calibration_tokens=SC, seed=1)._calibrate(_decoder())
    assert any(not np.array_equal(scales[n], other[n]) for n in scales)


@pytest.mark.parametrize("window", [3, 1, 0])
def test_synthetic_a_window_masks_keys_older_than_it(tmp_path, window):
    """window 3 at position p: keys p-2..p only. Reference: the native graph with that band mask."""
    feeds = _decode_feeds(start=6)
    model = _decoder()
    AttentionPluginPass(window=window)(model)
    assert all(n.attributes["window"].as_int() == window for n in model.graph if n.domain == DOMAIN)
    got = _run_model(model, feeds, tmp_path)
    reference = _decoder()
    if window:
        graph = reference.graph
        mask = next(n for n in graph if n.op_type == "LessOrEqual")
        slots, pos = mask.inputs
        floor = ir.node("Sub", [pos, ir.Value(name="w", const_value=ir.tensor(np.array(window, np.int64)))])
        floor.inputs[1].type, floor.inputs[1].shape = ir.TensorType(ir.DataType.INT64), ir.Shape([])
        graph.register_initializer(floor.inputs[1])
        inside = ir.node("Greater", [slots, floor.outputs[0]])
        both = ir.node("And", [mask.outputs[0], inside.outputs[0]])
        graph.insert_after(mask, [floor, inside, both])
        for node in graph:
            if node.op_type == "Attention":
                node.replace_input_with(3, both.outputs[0])
    want = _run_model(reference, feeds, tmp_path, "reference.onnx")
    np.testing.assert_allclose(got["logits"].astype(np.float32), want["logits"].astype(np.float32), atol=2e-3, rtol=0)
    unwindowed = _run_model(_decoder(), feeds, tmp_path, "plain.onnx")["logits"].astype(np.float32)
    assert (np.abs(got["logits"].astype(np.float32) - unwindowed).max() > 1e-2) == bool(window)


@pytest.mark.parametrize("case,message", [
    ("no position_ids", "^graph has no 'position_ids' input$"),
    ("no attention", "^no Attention nodes to replace$"),
    ("different scales", r"^layers differ in \(or lack\) the softmax scale attribute: "),
    ("no scale", r"^layers differ in \(or lack\) the softmax scale attribute: \{None\}$"),
    ("causal", "^attention.0: is_causal=1 \\(expected the explicit cache mask\\)$"),
    ("no scatter", "^attention.0: K/V do not come from TensorScatter \\(run kv-cache-scatter before attention-plugin\\)$"),
    ("windows", r"^the layers' attention windows differ \(\[0, 4\], 0 = full\) and the plugin applies one window to "
                r"every layer: use a native recipe \(fp16, int4-awq, ...\) or a cache of at most 4 positions$"),
    ("capacity past the window", r"^the layers' attention windows differ \(\[0, 8\], 0 = full\)"),  # 16 > 8 = head dim
])
def test_synthetic_graphs_it_cannot_take_are_refused_by_name(case, message):
    model = {"no position_ids": lambda: _decoder(drop_input="position_ids"),
             "no attention": lambda: _decoder(layers=0),
             "different scales": lambda: _decoder(scales=[0.35, 0.5]),
             "no scale": lambda: _decoder(scales="none"),
             "causal": lambda: _decoder(is_causal=1),
             "no scatter": lambda: _decoder(plain_kv=True),
             "windows": lambda: _decoder(windows=[0, 4]),
             "capacity past the window": lambda: _decoder(windows=[0, SD])}[case]()
    with pytest.raises(ir.passes.PreconditionError, match=message):
        AttentionPluginPass().requires(model)


def test_synthetic_what_it_accepts():
    AttentionPluginPass().requires(_decoder(scales=[0.35, 0.3500001]))  # equal to 6 digits: one scale
    AttentionPluginPass().requires(_decoder(is_causal=0))
    AttentionPluginPass().requires(_decoder(windows=[4, 4]))  # one window for every layer
    AttentionPluginPass().requires(_decoder(windows=[0, 16]))  # a cache within the smallest window: none slides
    AttentionPluginPass().requires(_decoder(windows=[32, 16]))
    model = _decoder()
    model.graph.node(len(model.graph) - 1)  # a graph with an Attention of another domain is not matched
    other = _decoder()
    for node in other.graph:
        if node.op_type == "Attention":
            node.domain = "com.example"
    with pytest.raises(ir.passes.PreconditionError, match="^no Attention nodes to replace$"):
        AttentionPluginPass().requires(other)
    AttentionPluginPass()._layers(_decoder())  # default domain spelt either way
    spelt = _decoder()
    for node in spelt.graph:
        if node.op_type == "Attention":
            node.domain = "ai.onnx"
    assert len(AttentionPluginPass()._layers(spelt)) == 2


def test_synthetic_ensures_no_native_attention_is_left():
    model = _decoder()
    with pytest.raises(ir.passes.PostconditionError, match=r"^native attention / cache update left after "
                       r"attention-plugin: \['scatter.0.key', 'scatter.0.value', 'attention.0', 'scatter.1.key'\]$"):
        AttentionPluginPass().ensures(model)
    for node in model.graph:
        if node.op_type in ("Attention", "TensorScatter"):
            node.domain = "com.example"
    AttentionPluginPass().ensures(model)


def test_synthetic_options_are_checked():
    for kwargs, message in (({"kv_dtype": "int8"}, r"^kv_dtype 'int8' is not one of float16, float8e4m3fn$"),
                            ({"paged": "yes"}, r"^paged must be true or false, not 'yes'$"),
                            ({"block_size": 12}, r"^block_size must be a power of two >= 1 \(the kernel's paged addressing\), not 12$"),
                            ({"block_size": 0}, "not 0$"), ({"block_size": -4}, "not -4$"), ({"block_size": 16.0}, "not 16.0$")):
        with pytest.raises(ValueError, match=message):
            AttentionPluginPass(**kwargs)
    for block in (1, 2, 64):
        assert AttentionPluginPass(paged=True, block_size=block).block_size == block
    p = AttentionPluginPass()
    assert (p.kv_dtype, p.window, p.scales, p.calibration_tokens, p.margin, p.seed, p.paged, p.block_size) == (
        "float16", 0, None, 48, 1.25, 0, False, 16) and not p.fp8
    assert AttentionPluginPass.from_context(PassContext(max_positions=SC, sliding_window=5), paged=True).window == 5
    assert AttentionPluginPass.from_context(PassContext(max_positions=SC, sliding_window=5), paged=True).paged
    assert AttentionPluginPass(window="7").window == 7
