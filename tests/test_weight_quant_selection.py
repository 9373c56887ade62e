"""Which MatMuls the weight-only quantizers take (passes/weight_quant.py), on synthetic graphs: seconds,
no export. The exporter's node metadata `pkg.torch.onnx.name_scopes` names each MatMul's Hugging Face
module; these graphs carry it the way torch.onnx writes it (a Python list literal, the op last)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from passes.quantize_int4_rtn import QuantizeInt4RtnPass
from passes.quantize_int8_wo import QuantizeInt8WoPass
from passes.weight_quant import matching_matmuls, module_name

K, N = 16, 8


def _weight(name: str, shape=(K, N), dtype=np.float16, initializer=True) -> ir.Value:
    arr = (np.random.default_rng(len(name)).standard_normal(shape) * 0.1).astype(dtype)
    value = ir.Value(name=name, const_value=ir.tensor(arr, name=name))
    value.type, value.shape = ir.TensorType(ir.DataType.from_numpy(arr.dtype)), ir.Shape(arr.shape)
    value.initializer = initializer
    return value


def _graph(specs) -> ir.Model:
    """specs: (node name, weight value, scopes list or raw metadata string or None, output name or None)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape([2, K]))
    nodes, inits, outputs = [], {}, []
    for name, weight, scopes, out in specs:
        node = ir.node("MatMul", [x, weight], name=name)
        if scopes is not None:
            node.metadata_props["pkg.torch.onnx.name_scopes"] = scopes if isinstance(scopes, str) else repr(scopes)
        node.outputs[0].name = out or f"{name}.out"
        nodes.append(node)
        outputs.append(node.outputs[0])
        if weight.is_graph_input() is False and getattr(weight, "initializer", False):
            inits[weight.name] = weight
    graph = ir.Graph([x] + [w for _, w, _, _ in specs if w.name.startswith("input")], outputs, nodes=nodes,
                     initializers=list(inits.values()), opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_module_names_come_from_the_exporters_scopes():
    def named(scopes):
        node = ir.node("MatMul", [])
        if scopes is not None:
            node.metadata_props["pkg.torch.onnx.name_scopes"] = scopes
        return module_name(node)

    assert named(repr(["model.layers.2.mlp.up_proj", "linear"])) == "model.layers.2.mlp.up_proj"  # two scopes
    assert named(repr(["", "model.model.layers.1.self_attn.q_proj", "linear"])) == "model.layers.1.self_attn.q_proj"
    assert named(repr(["model.lm_head", "linear"])) == "lm_head"  # a wrapper's 'model.' prefix is dropped
    assert named(repr(["model.model_proj", "linear"])) == "model.model_proj"  # only those two prefixes
    assert named(repr(["linear"])) is None and named("[unbalanced") is None and named(None) is None


def test_matching_matmuls_takes_constant_2d_float_weights_of_targeted_modules_in_graph_order():
    """Non-candidates come first in the graph, so the selection must look past each of them."""
    tied = _weight("tied")
    not_init = _weight("not_init", initializer=False)  # a constant-valued Value that is no initializer
    specs = [
        ("input_w", ir.Value(name="input_w", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape([K, N])),
         ["model.layers.0.mlp.gate_proj", "linear"], None),  # weight is a graph input
        ("nonconst", not_init, ["model.layers.0.mlp.up_proj", "linear"], None),
        ("int_w", _weight("int_w", dtype=np.int32), ["model.layers.0.self_attn.o_proj", "linear"], None),
        ("three_d", _weight("three_d", shape=(1, K, N)), ["model.layers.0.self_attn.v_proj", "linear"], None),
        ("excluded", _weight("excluded"), ["model.layers.0.self_attn.k_proj", "linear"], None),
        ("head_by_scope", _weight("head_by_scope"), ["model.lm_head", "linear"], None),
        ("head_by_output", _weight("head_by_output"), None, "logits"),
        ("other_module", _weight("other_module"), ["model.vision.proj", "linear"], None),
        ("down", _weight("down"), ["", "model.model.layers.0.mlp.down_proj", "linear"], None),
        ("tied_a", tied, ["model.layers.1.mlp.down_proj", "linear"], None),
        ("tied_b", tied, ["model.layers.2.mlp.down_proj", "linear"], None),
        ("fp32", _weight("fp32", dtype=np.float32), ["model.layers.3.mlp.up_proj", "linear"], None),
        ("unnamed", _weight("unnamed"), None, None),
    ]
    model = _graph(specs)
    picked = lambda **kw: [(t.node.name, t.name, t.skipped) for t in matching_matmuls(model, **kw)]  # noqa: E731
    tied_reason = "weight shared by 2 nodes (tied)"
    assert picked(exclude=("*.k_proj",)) == [
        ("down", "model.layers.0.mlp.down_proj", None), ("tied_a", "model.layers.1.mlp.down_proj", tied_reason),
        ("tied_b", "model.layers.2.mlp.down_proj", tied_reason), ("fp32", "model.layers.3.mlp.up_proj", None)]
    with_head = picked(exclude=("*.k_proj",), include_lm_head=True)
    assert with_head[:2] == [("head_by_scope", "lm_head", None), ("head_by_output", "lm_head", None)]
    assert picked(targets=("unnamed", "model.vision.*"), exclude=("*.k_proj",)) == [
        ("other_module", "model.vision.proj", None), ("unnamed", "unnamed", None)]  # no scopes: the node's name
    assert ("excluded", "model.layers.0.self_attn.k_proj", None) in picked()


@pytest.mark.parametrize("make", [QuantizeInt8WoPass, lambda **kw: QuantizeInt4RtnPass(block_size=32, **kw)],
                         ids=["int8", "int4-rtn"])
def test_include_lm_head_quantizes_it_and_targets_must_be_lists(make):
    def model():
        return _graph([("layer", _weight("layer"), ["model.layers.0.mlp.down_proj", "linear"], None),
                       ("head", _weight("head"), ["model.lm_head", "linear"], "logits")])

    for include, dequantized in ((False, {"layer"}), (True, {"layer", "head"})):
        m = model()
        qpass = make(include_lm_head=include)
        assert qpass(m).modified
        fed = {n.name for n in m.graph if n.op_type == "MatMul" and n.inputs[1].producer() is not None
               and n.inputs[1].producer().op_type == "DequantizeLinear"}
        assert fed == dequantized and sorted(qpass.quantized) == sorted({"layer": "model.layers.0.mlp.down_proj",
                                                                         "head": "lm_head"}[d] for d in dequantized)
    with pytest.raises(TypeError, match="^targets / exclude must be lists of module-name patterns$"):
        QuantizeInt8WoPass(targets="model.layers.*")


@pytest.mark.parametrize("make", [QuantizeInt8WoPass, lambda **kw: QuantizeInt4RtnPass(block_size=32, **kw)],
                         ids=["int8", "int4-rtn"])
def test_min_coverage_option_lets_a_tied_weight_stay_float(make):
    """Of three targeted MatMuls two share a weight (tied, kept float): 1/3 quantized is below the default
    0.95, so the pass refuses before any change; with min_coverage 0.3 it quantizes the one it can."""
    def model():
        tied = _weight("tied")
        return _graph([("a", tied, ["model.layers.0.mlp.up_proj", "linear"], None),
                       ("b", tied, ["model.layers.1.mlp.up_proj", "linear"], None),
                       ("c", _weight("c"), ["model.layers.2.mlp.up_proj", "linear"], None)])

    refused = make()
    with pytest.raises(ir.passes.PreconditionError) as caught:
        refused(model())
    message = str(caught.value)
    assert message.startswith(f"{refused.recipe_name}: only ") and "under min_coverage 95.0%" in message
    assert "model.layers.0.mlp.up_proj and 1 more: weight shared by 2 nodes (tied)" in message
    qpass = make(min_coverage=0.3)
    assert qpass(model()).modified and qpass.quantized == ["model.layers.2.mlp.up_proj"]
    tied = "weight shared by 2 nodes (tied)"
    block = 16 if isinstance(qpass, QuantizeInt4RtnPass) else None  # K = 16: the largest INT4 block dividing it
    assert [(p.name, p.k, p.n, p.block, p.skipped) for p in qpass.coverage.matmuls] == [
        ("model.layers.0.mlp.up_proj", K, N, None, tied), ("model.layers.1.mlp.up_proj", K, N, None, tied),
        ("model.layers.2.mlp.up_proj", K, N, block, None)]
    assert qpass.coverage.min_coverage == 0.3
