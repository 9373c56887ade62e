"""attention-plugin(-fp8kv) with `paged: true`: the KV cache as block pools + one block_tables input.

Three ways, like tests/test_pass_attention_plugin.py: the graph's shape (nodes, I/O contract), its
numerics under onnxruntime against the UNPAGED FP16 graph (generation through the runner, whose
executor allocates shuffled block tables) and the PyTorch reference, and the TensorRT side (refused
before parsing where plugins are missing; a real build only with full TensorRT and a GPU).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from compiler.engine.backend import get_backend
from compiler.errors import BackendBuildError, BadInputError
from compiler.measure.pass_check import prefill_logits
from compiler.runtime.runner import Runner
from compiler.graph_io import io_from_onnx
from compiler.runtime.executor import block_tables_for, identity_block_tables, shuffled_block_tables
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.graph_io import GraphIO
from passes import PassContext, make_pass, needs_plugins
from passes.attention_plugin import BLOCK_TABLES, DOMAIN, NUM_BLOCKS, OP, PAGED_OP, AttentionPluginPass
from plugins import attention_reference as ref

PROMPTS = [[1, 5, 9, 200, 33, 7, 8, 100, 41, 3], [4, 4, 300]]
NEW = 20  # prefill + 19 decode steps: sequence 0 (10 tokens) runs from its first 16-token block into its second
EXACT = 1e-3  # paging moves K/V rows, it does not round them: the linear plugin test's bound (measured: 0.0)


def _rewrite(path, tmp_path, name, window=0, **options):
    model = ir.load(path)
    make_pass(name, PassContext(max_positions=128, sliding_window=window), options)(model)
    out = tmp_path / f"{name}-w{window}-{'-'.join(f'{k}{v}' for k, v in options.items())}.onnx"
    ir.save(model, out)
    return model, out


@pytest.fixture(scope="module")
def paged16(final_fp16_llama, tmp_path_factory):
    return _rewrite(final_fp16_llama, tmp_path_factory.mktemp("paged"), "attention-plugin", paged=True)


@pytest.fixture(scope="module")
def native_run(final_fp16_llama):
    """The unpaged fp16 graph's greedy generation: (tokens [steps, B], logits [steps, B, vocab])."""
    return _run(OnnxRuntimeExecutor(final_fp16_llama))


def _run(executor, forced: np.ndarray | None = None, prompts=PROMPTS, steps=NEW):
    """Prefill + decode through the runner; greedy, or teacher-forced with `forced` tokens [steps, B]."""
    runner = Runner(executor)
    logits = [runner.prefill(prompts)]
    lengths = [len(p) for p in prompts]
    for i in range(steps - 1):
        feed = forced[i] if forced is not None else logits[-1].argmax(-1)
        logits.append(runner.decode([int(t) for t in feed], [n + i for n in lengths]))
    logits = np.stack(logits)
    return logits.argmax(-1), logits


# --- graph shape ------------------------------------------------------------------------------------------

def test_paged_graph_has_block_pools_and_one_block_table_input(paged16, final_fp16_llama):
    model, path = paged16
    before = ir.load(final_fp16_llama)
    layers = sum(1 for n in before.graph if n.op_type == "Attention")
    kv_heads, _, head_dim = before.graph.inputs[2].shape[1:]
    ops = [(n.domain, n.op_type) for n in model.graph]
    assert ops.count((DOMAIN, PAGED_OP)) == layers > 0
    assert (DOMAIN, OP) not in ops and ("", "Attention") not in ops and ("", "TensorScatter") not in ops

    io = io_from_onnx(path)
    assert io == GraphIO(layers, kv_heads, head_dim, 512, capacity=128, block_size=16,
                         logits_positions=True) and io.max_blocks == 8  # the fp16 graph ends with last-position-logits
    assert [v.name for v in model.graph.inputs] == io.input_names
    table = model.graph.inputs[2]
    assert table.name == BLOCK_TABLES and table.dtype == ir.DataType.INT32
    assert str(table.shape[0]) == "batch_size" and table.shape[1] == 8
    caches = [v for v in (*model.graph.inputs, *model.graph.outputs) if v.name.startswith(("past_", "present."))]
    assert len(caches) == 4 * layers
    for v in caches:
        assert v.dtype == ir.DataType.FLOAT16
        assert [str(d) if not isinstance(d, int) else d for d in v.shape] == [NUM_BLOCKS, kv_heads, 16, head_dim]
    plugin_nodes = [n for n in model.graph if n.domain == DOMAIN]
    assert all(len(n.inputs) == 9 and n.inputs[8] is table for n in plugin_nodes)  # one table for every layer
    for v in model.graph.inputs:  # a pool's dim 0 counts blocks: nothing but the plugin may read it
        if v.name.startswith("past_"):
            assert {u.node.op_type for u in v.uses()} == {PAGED_OP}
    assert (DOMAIN, PAGED_OP, "") in model.functions and (DOMAIN, OP, "") not in model.functions
    onnx.checker.check_model(onnx.load(path), full_check=True)


# --- onnxruntime numerics -----------------------------------------------------------------------------------

def test_paged_fp16_generation_matches_the_unpaged_graph(paged16, native_run, final_fp16_llama):
    """Batch of 2 prompts (10 and 3 tokens), 19 decode steps: same greedy tokens, same logits, and the pool
    read back through the executor's (shuffled) block tables is the unpaged graph's cache, row for row."""
    native = OnnxRuntimeExecutor(final_fp16_llama)
    tokens, logits = _run(native)
    assert np.array_equal(tokens, native_run[0])
    paged = OnnxRuntimeExecutor(paged16[1])
    paged_tokens, paged_logits = _run(paged)
    assert np.array_equal(paged_tokens, tokens)
    assert np.abs(paged_logits - logits).max() < EXACT

    tables = paged.cache.block_tables
    assert tables.shape == (2, 8) and not np.array_equal(tables, identity_block_tables(2, 8))
    assert len(np.unique(tables)) == tables.size  # disjoint: each block belongs to one sequence
    for name in ("past_key_values.0.key", "past_key_values.1.value"):
        pool = torch.from_numpy(paged.cache.buffers[name])
        linear = ref.paged_to_linear(pool, torch.from_numpy(tables), 128).numpy()
        assert np.array_equal(linear, native.cache.buffers[name])


def test_block_table_layout_does_not_matter_unless_it_is_wrong(paged16, native_run):
    """Identity and two shuffled layouts: bit-identical logits. A table that gives sequence 0's second logical
    block the physical block of its first: the same until position 16 is written, wrong after (so this test
    can fail), while sequence 1, whose blocks are untouched, is unaffected."""
    forced = native_run[0]
    runs = {}
    for name, allocate in (("identity", identity_block_tables), ("shuffled", None),
                           ("shuffled7", lambda b, m: shuffled_block_tables(b, m, seed=7))):
        runs[name] = _run(OnnxRuntimeExecutor(paged16[1], block_allocator=allocate), forced)[1]
    assert np.array_equal(runs["identity"], runs["shuffled"]) and np.array_equal(runs["identity"], runs["shuffled7"])

    def corrupt(batch, max_blocks):
        tables = shuffled_block_tables(batch, max_blocks)
        tables[0, 1] = tables[0, 0]
        return tables

    bad = _run(OnnxRuntimeExecutor(paged16[1], block_allocator=corrupt), forced)[1]
    first_write_past_16 = 16 - len(PROMPTS[0]) + 1  # the step (0 = prefill) that writes position 16
    assert np.array_equal(bad[:first_write_past_16], runs["identity"][:first_write_past_16])
    assert np.abs(bad[first_write_past_16:, 0] - runs["identity"][first_write_past_16:, 0]).max() > 0.1
    assert np.array_equal(bad[:, 1], runs["identity"][:, 1])

    io = io_from_onnx(paged16[1])
    with pytest.raises(ValueError, match=r"block ids must lie in \[0, 16\)"):
        block_tables_for(io, 2, lambda b, m: identity_block_tables(b, m) + 1)


def test_paged_fp8_generation_against_fp16_and_the_linear_fp8_graph(final_fp16_llama, native_run, tmp_path):
    """Tolerance = the fp8kv recipe's, as the linear FP8 test; and paging adds nothing: the linear FP8 graph
    (same calibrated scales) gives bit-identical logits."""
    model, paged = _rewrite(final_fp16_llama, tmp_path, "attention-plugin-fp8kv", paged=True, block_size=8)
    caches = [v for v in model.graph.inputs if v.name.startswith("past_")]
    assert all(v.dtype == ir.DataType.FLOAT8E4M3FN and v.shape[2] == 8 for v in caches)
    assert io_from_onnx(paged).max_blocks == 16
    out = Runner(OnnxRuntimeExecutor(paged)).generate(PROMPTS, NEW)  # free-running, batched, different lengths
    assert [len(t) for t in out.tokens] == [NEW, NEW]

    forced, fp16 = native_run
    fp8 = _run(OnnxRuntimeExecutor(paged), forced)[1]
    errors = np.abs(fp8 - fp16)
    agree = (fp8.argmax(-1) == fp16.argmax(-1)).mean()
    assert errors.max() < 0.3 and errors.mean() < 0.05 and agree >= 0.88, (errors.max(), errors.mean(), agree)
    assert errors.max() > 0  # the cache really is FP8

    _, linear = _rewrite(final_fp16_llama, tmp_path, "attention-plugin-fp8kv")
    assert np.array_equal(_run(OnnxRuntimeExecutor(linear), forced)[1], fp8)


def test_paged_sliding_window_matches_the_linear_plugin(final_fp16_llama, native_run, tmp_path):
    """window 4 (Mistral-style) on the paged cache = the linear plugin graph's window 4; and it does bite."""
    forced, full = native_run
    _, linear = _rewrite(final_fp16_llama, tmp_path, "attention-plugin", window=4)
    _, paged = _rewrite(final_fp16_llama, tmp_path, "attention-plugin", window=4, paged=True, block_size=4)
    a = _run(OnnxRuntimeExecutor(linear), forced)[1]
    b = _run(OnnxRuntimeExecutor(paged), forced)[1]
    assert np.abs(a - b).max() < EXACT
    assert np.abs(b - full).max() > 1e-2


def _single_node_model(fp8: bool, window: int, num_blocks: int, max_blocks: int, block_size: int, q_heads=8,
                       kv_heads=2, head_dim=16, scale=0.25):
    """A graph of one paged node and its function: the body on its own."""
    pass_ = AttentionPluginPass(kv_dtype="float8e4m3fn" if fp8 else "float16", window=window, paged=True,
                                block_size=block_size)
    function = pass_._function(ir.DataType.FLOAT16, scale)
    f16, cache_t = ir.DataType.FLOAT16, ir.DataType.FLOAT8E4M3FN if fp8 else ir.DataType.FLOAT16

    def value(name, dtype, shape):
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))

    pool = [num_blocks, kv_heads, block_size, head_dim]
    ins = [value("q", f16, ["B", q_heads, "S", head_dim]), value("k", f16, ["B", kv_heads, "S", head_dim]),
           value("v", f16, ["B", kv_heads, "S", head_dim]), value("past_k", cache_t, pool),
           value("past_v", cache_t, pool), value("position_ids", ir.DataType.INT64, ["B", "S"]),
           value("k_scale", ir.DataType.FLOAT, [kv_heads]), value("v_scale", ir.DataType.FLOAT, [kv_heads]),
           value("block_tables", ir.DataType.INT32, ["B", max_blocks])]
    node = ir.node(PAGED_OP, ins, domain=DOMAIN, num_outputs=3, attributes={"scale": scale, "window": window})
    for out, name, dtype in zip(node.outputs, ("out", "present_k", "present_v"), (f16, cache_t, cache_t)):
        out.name, out.type = name, ir.TensorType(dtype)
    graph = ir.Graph(ins, list(node.outputs), nodes=[node], opset_imports={"": 24, DOMAIN: 1})
    return ir.Model(graph, ir_version=10, functions=[function])


@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
@pytest.mark.parametrize("window", [0, 5])
def test_paged_function_body_matches_the_pytorch_reference(fp8, window, tmp_path):
    """The body's pool write and gather are plugins/attention_reference.py's write_paged / paged_to_linear
    (block_tables[b, p // bs], p % bs), over a shuffled pool with spare blocks; attention as the reference's."""
    import onnxruntime as ort

    torch.manual_seed(3 * window + fp8)
    batch, q_len, bs, cap, kv_heads = 2, 3, 4, 32, 2
    gen = torch.Generator().manual_seed(window + 10 * fp8)
    table, num_blocks = ref.allocate_block_table([cap] * batch, bs, num_blocks=batch * cap // bs + 5, generator=gen)
    path = tmp_path / "one.onnx"
    ir.save(_single_node_model(fp8, window, num_blocks, cap // bs, bs), path)
    start = torch.tensor([9, 20])  # decode-like: 3 new tokens after 9 / 20 cached (seq 0 straddles blocks 2 and 3)
    q = torch.randn(batch, 8, q_len, 16).half()
    k_new, v_new = torch.randn(batch, kv_heads, q_len, 16).half(), torch.randn(batch, kv_heads, q_len, 16).half()
    k_pool = torch.randn(num_blocks, kv_heads, bs, 16).half()  # spare blocks hold garbage too: must stay unread
    v_pool = torch.randn(num_blocks, kv_heads, bs, 16).half()
    positions = start[:, None] + torch.arange(q_len)[None]
    ks = vs = None
    if fp8:
        ks, vs = ref.fp8_scales(k_pool), ref.fp8_scales(v_pool)
        k_pool, v_pool = ref.quantize_fp8(k_pool, ks), ref.quantize_fp8(v_pool, vs)
    feeds = {"q": q.numpy(), "k": k_new.numpy(), "v": v_new.numpy(), "position_ids": positions.numpy(),
             "block_tables": table.numpy(),
             "k_scale": (ks if fp8 else torch.ones(kv_heads)).numpy(), "v_scale": (vs if fp8 else torch.ones(kv_heads)).numpy()}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for name, pool in (("past_k", k_pool), ("past_v", v_pool)):
        feeds[name] = (ort.OrtValue.ortvalue_from_numpy_with_onnx_type(pool.view(torch.uint8).numpy(),
                                                                       onnx.TensorProto.FLOAT8E4M3FN)
                       if fp8 else pool.numpy())
    got = dict(zip(["out", "present_k", "present_v"], session.run(["out", "present_k", "present_v"], feeds)))

    k_expected, v_expected = k_pool.clone(), v_pool.clone()
    for pool, new, s in ((k_expected, k_new, ks), (v_expected, v_new, vs)):
        ref.write_paged(pool, table, positions, ref.quantize_fp8(new, s) if fp8 else new)
    expected = ref.attention_reference(q, k_expected, v_expected, start + q_len, block_table=table, k_scale=ks,
                                       v_scale=vs, window=window, sm_scale=0.25)
    as_bytes = (lambda t: t.view(torch.uint8).numpy()) if fp8 else (lambda t: t.numpy())
    assert np.array_equal(got["present_k"], as_bytes(k_expected)) and np.array_equal(got["present_v"], as_bytes(v_expected))
    err = np.abs(got["out"].astype(np.float32) - expected.numpy()).max()
    assert err < 5e-3, err


def test_pass_check_feeds_a_paged_graph(paged16, final_fp16_llama):
    """--check-passes measures the paged pass too: its prefill feeds pools and block tables."""
    ids = np.array([PROMPTS[0], PROMPTS[0][::-1]], np.int64)
    paged = prefill_logits(ir.load(paged16[1]), ids)
    assert np.abs(paged - prefill_logits(ir.load(final_fp16_llama), ids)).max() < EXACT


def test_paged_options_are_checked(final_fp16_llama, tmp_path):
    from compiler.recipe import load_recipe

    with pytest.raises(ValueError, match="power of two"):
        AttentionPluginPass(paged=True, block_size=12)
    with pytest.raises(ir.passes.PreconditionError, match="capacity 128 .* not a multiple of block_size 256"):
        make_pass("attention-plugin", PassContext(max_positions=128), {"paged": True, "block_size": 256})(
            ir.load(final_fp16_llama))
    recipe = tmp_path / "bad.yaml"
    recipe.write_text((load_recipe("fp16-paged").source.read_text()).replace("block_size: 16", "block_size: 24"))
    with pytest.raises(BadInputError, match="attention-plugin.*power of two"):
        load_recipe(str(recipe))


# --- TensorRT -------------------------------------------------------------------------------------------------

def test_paged_recipes_are_refused_before_parsing_without_plugins(paged16, tmp_path, monkeypatch):
    from compiler.driver import build as driver
    from compiler.stages import export as export_stage, load as load_stage
    from compiler.engine.engine_build import build_engine
    from compiler.recipe import load_recipe
    from compiler.engine.engine_build import BuildOptions

    for name in ("fp16-paged", "fp8kv-paged"):
        recipe = load_recipe(name)
        assert needs_plugins(recipe.passes) and recipe.pass_options[-2] == {"paged": True, "block_size": 16}
    backend = get_backend()
    if backend.supports_plugins:
        pytest.skip(f"{backend.name} {backend.version} has plugin layers: the refusal path does not apply "
                    "(test_paged_engine_builds_with_full_tensorrt builds instead)")
    with pytest.raises(BackendBuildError, match="plugin.*install full TensorRT"):
        build_engine(paged16[1], tmp_path / "x.plan", BuildOptions(), backend)
    assert not (tmp_path / "x.plan").exists()

    def no_export(*_a, **_k):
        raise AssertionError("exported before refusing the plugin recipe")

    monkeypatch.setattr(export_stage, "export_onnx", no_export)
    monkeypatch.setattr(load_stage, "load_model", no_export)
    with pytest.raises(BackendBuildError, match="fp16-paged.*TensorRT-RTX has no plugins"):
        driver.run_build(driver.BuildRequest(recipe="fp16-paged", output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _full_tensorrt_reason() -> str | None:
    from plugins.trt_plugin import unavailable_reason

    reason = unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA GPU"
    return reason


@pytest.mark.skipif(_full_tensorrt_reason() is not None,
                    reason=f"building the paged plugin engine needs full TensorRT (>= 10.9, plugin layers), Triton "
                           f"and a GPU: {_full_tensorrt_reason()}")
def test_paged_engine_builds_with_full_tensorrt(paged16, native_run, tmp_path):
    """Full TensorRT: the parser maps the node to llmc::PagedAttentionBlockTable; the engine's I/O is the paged
    contract and its generation (pools on the GPU, shuffled tables) follows the unpaged onnxruntime graph."""
    from compiler.engine.engine_build import build_engine
    from compiler.runtime.trt_executor import TensorRTExecutor
    from compiler.engine.engine_build import BuildOptions

    engine = build_engine(paged16[1], tmp_path / "paged.plan", BuildOptions(max_batch=2, max_seq=128), get_backend())
    tensors = {t.name: t for t in engine.tensors}
    assert tensors[BLOCK_TABLES].dtype == "int32" and tuple(tensors[BLOCK_TABLES].shape) == (-1, 8)
    assert tuple(tensors["past_key_values.0.key"].shape)[1:] == (2, 16, 32)
    tokens, logits = _run(TensorRTExecutor(engine.plan_path), native_run[0])
    assert np.abs(logits - native_run[1]).max() < 0.1  # the fp16-plugin recipe's tolerance


# --- the paged rewrite on hand-built decoders (seconds, no model; tests/test_pass_attention_plugin.py's) ----

def _paged_feeds(feeds, tables, block_size):
    """The linear feeds with each past cache moved into a pool at the blocks `tables` names."""
    out = dict(feeds)
    batch, blocks = tables.shape
    for name in [n for n in feeds if n.startswith("past_")]:
        linear = feeds[name]
        pool = np.full((batch * blocks, linear.shape[1], block_size, linear.shape[3]), 9, linear.dtype)  # unused: 9s
        for b in range(batch):
            for j in range(blocks):
                pool[tables[b, j]] = linear[b, :, j * block_size:(j + 1) * block_size]
        out[name] = pool
    out[BLOCK_TABLES] = tables
    return out


def _linear(pool, tables, block_size):
    return np.stack([np.concatenate([pool[t] for t in row], axis=1) for row in tables])


@pytest.mark.parametrize("fp8", [False, True], ids=["fp16", "fp8"])
def test_synthetic_paged_graph_computes_the_linear_graph_on_shuffled_blocks(tmp_path, fp8):
    import ml_dtypes

    from test_pass_attention_plugin import SB, SC, SD, SKV, _decode_feeds, _decoder, _run_model

    block = 4
    feeds = _decode_feeds(start=5)
    scales = {f"present.{i}.{kv}": np.array([0.01, 0.02], np.float32) for i in range(2) for kv in ("key", "value")}
    options = {"kv_dtype": "float8e4m3fn", "scales": scales} if fp8 else {}
    linear = _decoder()
    AttentionPluginPass(**options)(linear)
    model = _decoder()
    pass_ = AttentionPluginPass(paged=True, block_size=block, **options)
    assert pass_(model).modified
    graph = model.graph
    assert [v.name for v in graph.inputs][:3] == ["input_ids", "position_ids", BLOCK_TABLES]
    tables_value = graph.inputs[2]
    assert tables_value.dtype == ir.DataType.INT32 and list(tables_value.shape) == ["batch", SC // block]
    assert type(tables_value.shape[1]) is int  # a static dim, as TensorRT's profiles need
    nodes = [n for n in graph if n.domain == DOMAIN]
    assert [n.op_type for n in nodes] == [PAGED_OP, PAGED_OP] and all(n.inputs[8] is tables_value for n in nodes)
    assert (DOMAIN, PAGED_OP, "") in model.functions and (DOMAIN, OP, "") not in model.functions
    for v in (*graph.inputs[3:], *graph.outputs[1:]):
        assert list(v.shape) == [NUM_BLOCKS, SKV, block, SD], v
        assert v.dtype == (ir.DataType.FLOAT8E4M3FN if fp8 else ir.DataType.FLOAT16)
    if fp8:
        for name in [n for n in feeds if n.startswith("past_")]:
            s = scales[name.replace("past_key_values", "present")][None, :, None, None]
            feeds[name] = (feeds[name].astype(np.float32) / s).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    want = _run_model(linear, feeds, tmp_path, "linear.onnx")
    tables = shuffled_block_tables(SB, SC // block, seed=2)
    got = _run_model(model, _paged_feeds(feeds, tables, block), tmp_path, "paged.onnx")
    np.testing.assert_array_equal(got["logits"], want["logits"])  # paging moves rows, it does not round them
    for name in [n for n in want if n.startswith("present.")]:
        np.testing.assert_array_equal(_linear(got[name], tables, block), want[name])


@pytest.mark.parametrize("start,end,expected", [(0, 1, "input_ids"), (None, None, [2, 2, 16, 8]), (1, None, [2, 16, 8]),
                                                (-2, None, [16, 8]), (0, 2, [2, 2])])
def test_synthetic_shape_reads_of_a_cache_are_rewired_off_the_pool(tmp_path, start, end, expected):
    _shape_reads(tmp_path, start, end, expected, as_output=False)


def test_synthetic_a_shape_read_that_is_a_graph_output_stays_one(tmp_path):
    _shape_reads(tmp_path, 1, None, [2, 16, 8], as_output=True)


def _shape_reads(tmp_path, start, end, expected, as_output):
    """The exporter reads the batch size off a cache input; a pool's dim 0 counts blocks: the reads must give
    the linear cache's dims still (batch from input_ids, the rest as constants)."""
    from test_pass_attention_plugin import SB, SC, _decode_feeds, _decoder, _run_model

    model = _decoder(shape_reads=[(start, end)], shape_read_is_output=as_output)
    AttentionPluginPass(paged=True, block_size=4)(model)
    name = f"shape_read_{start}_{end}"
    out = model.graph.outputs[-1]  # the read's graph output, or the Identity's that reads it
    out = out if as_output else out.producer().inputs[0]
    if expected == "input_ids":
        assert out.producer().op_type == "Shape" and out.producer().inputs[0].name == "input_ids"
        expected = [SB]
    else:
        assert out.producer().op_type == "Concat"
        assert [n.name for n in model.graph if n.name and n.name.startswith(name)] == [
            *(f"{name}.batch" if d == 0 else f"{name}.dim{d}" for d in list(range(4))[slice(start, end or 4)]),
            f"{name}.static"]
    assert not [n for n in model.graph if n.op_type == "Shape" and n.inputs[0].name.startswith("past_")]
    tables = shuffled_block_tables(SB, SC // 4)
    got = _run_model(model, _paged_feeds(_decode_feeds(), tables, 4), tmp_path)
    assert got[model.graph.outputs[-1].name].tolist() == expected


@pytest.mark.parametrize("case,message", [
    ("identity reader", r"^cache_reader \(Identity\) reads cache input past_key_values\.0\.key: only Shape reads can be "
                        r"rewired when the cache becomes a block pool$"),
    ("no input_ids", r"^shape_read_0_1 \(Shape\) reads cache input past_key_values\.0\.key: only Shape reads"),
    ("dynamic dim", r"^shape_read_1_None: dim 3 of past_key_values\.0\.key is dynamic$"),
    ("not an input", r"^scatter\.0\.key: its cache made\.0\.key is not a graph input \(nothing to page\)$"),
    ("twice", r"^graph already has a 'block_tables' input \(paged twice\?\)$"),
    ("capacity", r"^paged cache: capacity 16 \(--max-seq\) is not a multiple of block_size 32; pick a --max-seq that "
                 r"is, or a block_size that divides it$"),
    ("dynamic capacity", r"^paged cache: capacity cap \(--max-seq\) is not a multiple of block_size 4"),
])
def test_synthetic_paged_refusals_name_the_cause(case, message):
    from test_pass_attention_plugin import _decoder

    block = 32 if case == "capacity" else 4
    model = {"identity reader": lambda: _decoder(reader="Identity"),
             "no input_ids": lambda: _decoder(shape_reads=[(0, 1)], drop_input="input_ids"),
             "dynamic dim": lambda: _decoder(shape_reads=[(1, None)]),
             "not an input": lambda: _decoder(past_as_input=False),
             "twice": lambda: _decoder(), "capacity": lambda: _decoder(), "dynamic capacity": lambda: _decoder()}[case]()
    graph = model.graph
    if case == "dynamic dim":
        past = graph.inputs[2]
        past.shape = ir.Shape([past.shape[0], past.shape[1], past.shape[2], "head_dim"])
    if case == "twice":
        graph.inputs.append(ir.Value(name=BLOCK_TABLES, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape([2, 4])))
    if case == "dynamic capacity":
        for node in graph:
            if node.op_type == "TensorScatter":
                past = node.inputs[0]
                past.shape = ir.Shape([past.shape[0], past.shape[1], "cap", past.shape[3]])
    pass_ = AttentionPluginPass(paged=True, block_size=block)
    with pytest.raises(ir.passes.PreconditionError, match=message):
        if case in ("twice", "capacity", "dynamic capacity"):
            pass_.requires(model)
        else:
            pass_(model)
    AttentionPluginPass(paged=False).requires(_decoder()) if case in ("twice", "capacity") else None


def test_synthetic_every_shape_read_of_a_cache_is_rewired(tmp_path):
    from test_pass_attention_plugin import SB, SC, _decode_feeds, _decoder, _run_model

    model = _decoder(shape_reads=[(0, 1), (1, None)])  # the batch read first, then the others of the same cache
    AttentionPluginPass(paged=True, block_size=4)(model)
    assert not [n for n in model.graph if n.op_type == "Shape" and n.inputs[0].name.startswith("past_")]
    got = _run_model(model, _paged_feeds(_decode_feeds(), shuffled_block_tables(SB, SC // 4), 4), tmp_path)
    assert [got[v.name].tolist() for v in model.graph.outputs[-2:]] == [[SB], [2, 16, 8]]
