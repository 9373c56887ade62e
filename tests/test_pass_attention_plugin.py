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

