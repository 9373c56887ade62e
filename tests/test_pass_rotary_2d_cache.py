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
    assert Rotary2DCachePass(MAX_POS)(model).modified is False  # idempotent


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


# Synthetic graphs: the exporter's cone (Cast -> Unsqueeze -> Mul inv_freq -> Cos / Sin) in seconds,
# without an export; two rope bases are Gemma 3's local and global tables.
HEADS, HEAD_DIM, SEQ = 2, 8, 5


def _rotary_graph(bases=(10_000.0,), *, empty_fourth=False, clip=False, other_input=False) -> ir.Model:
    """One RotaryEmbedding per base over x [1, SEQ, HEADS * HEAD_DIM]; `clip` puts a Clip with its
    optional min omitted (an empty input) in the cone, `other_input` adds a second graph input to the
    angles behind a value the walk meets twice (Mul(p, p))."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
             helper.make_node("Unsqueeze", ["pos_f", "last"], ["pos_u"])]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "last")]
    angle_source = "pos_u"
    if clip:
        nodes.append(helper.make_node("Clip", ["pos_u", "", "cap"], ["pos_c"]))
        inits.append(numpy_helper.from_array(np.array(1e9, np.float32), "cap"))
        angle_source = "pos_c"
    if other_input:
        nodes += [helper.make_node("Mul", ["pos_u", "pos_u"], ["pos_sq"]),
                  helper.make_node("Add", ["other", "pos_sq"], ["pos_mixed"])]
        angle_source = "pos_mixed"
    outputs = []
    for k, base in enumerate(bases):
        inits.append(numpy_helper.from_array(_inv_freq(base), f"inv_freq{k}"))
        nodes += [helper.make_node("Mul", [angle_source, f"inv_freq{k}"], [f"angles{k}"]),
                  helper.make_node("Cos", [f"angles{k}"], [f"cos{k}"]),
                  helper.make_node("Sin", [f"angles{k}"], [f"sin{k}"]),
                  helper.make_node("RotaryEmbedding", ["x", f"cos{k}", f"sin{k}"] + ([""] if empty_fourth else []),
                                   [f"y{k}"], num_heads=HEADS)]
        outputs.append(helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, [1, "S", HEADS * HEAD_DIM]))
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", HEADS * HEAD_DIM]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "S"])]
    if other_input:
        inputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1, "S", 1]))
    graph = helper.make_graph(nodes, "rotary", inputs, outputs, inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)],
                                                        ir_version=10))


def _ort(path, feeds) -> list[np.ndarray]:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


def _inv_freq(base: float) -> np.ndarray:
    return (1.0 / base ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)).astype(np.float32)


@pytest.mark.parametrize("form", ["three-inputs", "empty-fourth-input", "clip-in-cone"])
def test_synthetic_tables_are_the_cone_at_every_position_one_per_distinct_rope(form, tmp_path):
    """Each distinct cos / sin table becomes one [max_positions, head_dim / 2] initializer (the value
    typed and shaped: later passes read them), equal to the cone evaluated at positions 0..max-1; the
    nodes take (x, cos, sin, position_ids) and compute what they computed, at positions past 0."""
    from passes import PassContext, make_pass

    bases = (10_000.0, 1_000_000.0)
    model = _rotary_graph(bases, empty_fourth=form == "empty-fourth-input", clip=form == "clip-in-cone")
    before = save(model, tmp_path / "before.onnx")
    max_pos = 24
    assert make_pass("rotary-2d-cache", PassContext(max_positions=max_pos))(model).modified is True
    rotary = [n for n in model.graph if n.op_type == "RotaryEmbedding"]
    assert [len(n.inputs) for n in rotary] == [4, 4] and all(n.inputs[3].name == "position_ids" for n in rotary)
    assert op_counts(model)["Cos"] == 0 and op_counts(model)["Sin"] == 0
    angles = np.arange(max_pos, dtype=np.float64)[:, None] * np.stack([_inv_freq(b) for b in bases])[:, None, :]
    names = set()
    for node, angle in zip(rotary, angles):
        for value, want in ((node.inputs[1], np.cos(angle)), (node.inputs[2], np.sin(angle))):
            assert value.is_initializer() and value.dtype == ir.DataType.FLOAT
            assert value.shape == ir.Shape([max_pos, HEAD_DIM // 2])
            np.testing.assert_allclose(value.const_value.numpy(), want, atol=2e-6)
            names.add(value.name)
    assert len(names) == 4  # two ropes: four tables, none shared by name
    feeds = {"x": np.random.default_rng(0).standard_normal((1, SEQ, HEADS * HEAD_DIM)).astype(np.float32),
             "position_ids": np.arange(11, 11 + SEQ, dtype=np.int64)[None]}
    want, got = _ort(before, feeds), _ort(save(model, tmp_path / "after.onnx"), feeds)
    for w, g in zip(want, got):  # FP32 table lookup vs recompute at positions 11..15
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_tables_are_evaluated_on_onnxruntimes_cpu_provider(monkeypatch):
    """The table is tabulated on the CPU whatever onnxruntime build is installed: a GPU build refuses a
    session without providers (since onnxruntime 1.9), and the constant must not depend on a device."""
    import onnxruntime

    real, seen = onnxruntime.InferenceSession, []

    def session(model, *args, **kwargs):
        seen.append(kwargs.get("providers", args[1] if len(args) > 1 else None))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    Rotary2DCachePass(8)(_rotary_graph())
    assert seen == [["CPUExecutionProvider"]]


def test_refuses_cos_that_reaches_another_input_behind_a_shared_value():
    """The cone walk goes on past values it has already seen (here position_ids' Mul(p, p)) and finds
    every graph input the angles depend on."""
    with pytest.raises(ir.passes.PreconditionError, match=r"depends on \['other', 'position_ids'\]"):
        Rotary2DCachePass(8)(_rotary_graph(other_input=True))


def test_cone_walk_visits_each_value_once():
    """60 stacked Add(v, v): 2^60 paths from the top to position_ids, 61 values. A walk that revisits
    values never ends; this one returns in well under the alarm's 20 s."""
    import signal

    from passes.rotary_2d_cache import _cone_graph_inputs

    pos = ir.Value(name="position_ids", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3]))
    value = pos
    nodes = []
    for _ in range(60):
        nodes.append(ir.node("Add", [value, value]))
        value = nodes[-1].outputs[0]
    ir.Graph([pos], [value], nodes=nodes, opset_imports={"": 23})

    def too_slow(*_):
        raise TimeoutError("the cone walk revisits values")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(20)
    try:
        assert _cone_graph_inputs(value) == {"position_ids"}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_preconditions_and_postcondition_name_what_is_wrong():
    from passes import PassContext, make_pass

    model = _rotary_graph()
    model.graph.inputs.remove(model.graph.inputs[1])  # position_ids no longer a graph input
    with pytest.raises(ir.passes.PreconditionError, match="^graph has RotaryEmbedding but no 'position_ids' input$"):
        Rotary2DCachePass(8).requires(model)
    with pytest.raises(ir.passes.PostconditionError, match="^a RotaryEmbedding without position_ids remains$"):
        Rotary2DCachePass(8).ensures(_rotary_graph())
    with pytest.raises(TypeError, match="pass 'rotary-2d-cache': bad option"):
        make_pass("rotary-2d-cache", PassContext(max_positions=8), {"block_size": 32})


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
