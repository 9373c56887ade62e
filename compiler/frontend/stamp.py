"""Export time flat in depth: export a 2-layer copy of the model, then stamp its last layer N-2 times.

torch.onnx (dynamo) traces, decomposes and optimizes every decoder layer, so a full export costs
time and memory in proportion to depth. A homogeneous decoder repeats one layer, so we export a
shallow model that *shares* the real model's modules (embeddings, norm, lm_head, layers[0:2]; no
weight is copied), take the subgraph of its LAST layer and clone it for layers 2..N-1 with each
layer's own weights. The last layer, not layer 0, is the template: the exporter's common-subexpression
elimination leaves the shape computations that all layers share inside layer 0's scope, so layer 0
holds nodes that every later layer only references.

Stamped nodes carry their layer's module path in `pkg.torch.onnx.name_scopes` (quantization passes
select MatMuls by it) and stamped weights are layer i's own parameters, in the form the exporter
folded them into (as is, or transposed for MatMul), found by comparing the template's initializers
with layer 1's parameters. Anything the stamper cannot account for raises `StampError`, and
`export_onnx(method="auto")` then falls back to the full export.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from typing import Any

from compiler.graph_io import KV, PAST_PREFIX, PRESENT_PREFIX, past_name, present_name

SHALLOW_LAYERS = 2
SCOPES = "pkg.torch.onnx.name_scopes"
WRAPPER_PREFIX = "model."  # export.FlatKVCausalLM holds the HF model as `self.model`


class StampError(Exception):
    """This model/export does not fit the stamping assumptions (the caller falls back to a full export)."""


# --- which models can be stamped -----------------------------------------------------------------

def decoder_layers(model, num_layers: int) -> tuple[str, Any]:
    """(dotted path, ModuleList) of the model's decoder layers: the one ModuleList of `num_layers` modules."""
    import torch

    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == num_layers and name.endswith("layers")]
    if len(found) != 1:
        raise StampError(f"expected one decoder layer list of {num_layers} modules, found {[n for n, _ in found]}")
    return found[0]


def heterogeneity(model, num_layers: int) -> str | None:
    """Why the layers differ (so stamping one for all would be wrong), or None if they are all alike.

    Checks the layer classes, every parameter/buffer name, shape and dtype, the per-layer config lists
    (`layer_types`, sliding-window flags, ...) and per-layer attention attributes (sliding window).
    """
    try:
        _, layers = decoder_layers(model, num_layers)
    except StampError as exc:
        return str(exc)

    def signature(layer):
        attn = getattr(layer, "self_attn", None)
        return (
            type(layer).__name__,
            tuple((n, tuple(p.shape), _kind(p)) for n, p in layer.named_parameters()),
            tuple((n, tuple(b.shape), b.dtype) for n, b in layer.named_buffers()),
            getattr(layer, "attention_type", None),
            getattr(attn, "sliding_window", None),
            getattr(attn, "is_sliding", None),
        )

    first = signature(layers[0])
    for i, layer in enumerate(layers):
        if signature(layer) != first:
            return f"layer {i} differs from layer 0 ({signature(layer)} vs {first})"
    for key, value in _config_dict(model.config).items():
        if isinstance(value, (list, tuple)) and len(value) == num_layers and len({repr(v) for v in value}) > 1:
            return f"config.{key} differs between layers"
    return None


def _kind(tensor):
    """A parameter's dtype, with every float dtype as one: half-stored layers (compiler/frontend/half_storage.py)
    and the FP32 ones restored for the export are the same layer."""
    return "float" if tensor.is_floating_point() else tensor.dtype


def _config_dict(config) -> dict:
    return {k: v for k, v in vars(config).items() if not k.startswith("_")}


def shallow_model(model, num_layers: int, keep: int = SHALLOW_LAYERS):
    """A view of `model` with only its first `keep` decoder layers: shared modules, copied config, no weights copied.

    Every module on the path to the layer list is shallow-copied with its own `_modules` dict, so the
    real model is never mutated; every other module (embeddings, norm, lm_head, rotary) is the same object.
    """
    import torch

    path, _ = decoder_layers(model, num_layers)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = keep
    for key, value in _config_dict(config).items():
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            setattr(config, key, type(value)(value[:keep]))

    def view(module, parts):
        clone = copy.copy(module)
        clone._modules = dict(module._modules)
        if getattr(clone, "config", None) is not None:
            clone.config = config
        child = module._modules[parts[0]]
        if len(parts) == 1:
            clone._modules[parts[0]] = torch.nn.ModuleList(list(child)[:keep])
        else:
            clone._modules[parts[0]] = view(child, parts[1:])
        return clone

    return view(model, path.split("."))


# --- stamping --------------------------------------------------------------------------------------

def _scopes(node) -> list[str]:
    import ast

    raw = node.metadata_props.get(SCOPES)
    if not raw:
        return []
    try:
        return list(ast.literal_eval(raw))
    except (ValueError, SyntaxError):
        return []


@dataclasses.dataclass
class _Template:
    """Layer `src` of the shallow export, and the values through which it meets the rest of the graph."""

    src: int
    nodes: list  # the layer's nodes, in graph order
    past: list  # its past_key_values.{src}.{key,value} inputs
    present: list  # its present.{src}.{key,value} outputs
    hidden_in: Any  # the hidden state it reads (layer src-1's output)
    hidden_out: Any  # the hidden state it writes (the final norm's input)


def stamp_layers(model_ir, torch_model, layers_path: str, num_layers: int) -> None:
    """Grow the shallow export `model_ir` (in place) to `num_layers` layers by cloning its last layer.

    `layers_path` is the HF path of the layer list (`model.layers`); `torch_model` provides the weights.
    """
    _, layers = decoder_layers(torch_model, num_layers)
    graph = model_ir.graph
    prefix = WRAPPER_PREFIX + layers_path  # 'model.model.layers' in the exported scopes
    template = _find_template(graph, prefix, SHALLOW_LAYERS - 1)
    uses = _parameter_uses(template, dict(layers[template.src].named_parameters()), prefix)
    outside = [(u.node, u.idx) for u in template.hidden_out.uses() if u.node not in set(template.nodes)]  # final norm
    new_nodes, new_inputs, new_outputs, last_hidden = _clone_layers(graph, template, uses, layers, prefix, num_layers)
    graph.insert_after(template.nodes[-1], new_nodes)
    for node, idx in outside:
        node.replace_input_with(idx, last_hidden)
    _order_cache_io(graph, num_layers, new_inputs, new_outputs)
    _own_types(graph)
    graph.metadata_props.pop("pkg.torch.export.ExportedProgram.graph_signature", None)
    graph.metadata_props["llmc.export"] = (f"stamp: {SHALLOW_LAYERS}-layer export, layer {template.src} cloned for "
                                           f"layers {SHALLOW_LAYERS}..{num_layers - 1}")


def _find_template(graph, prefix: str, src: int) -> _Template:
    """Layer `src`'s nodes, cache I/O and hidden-state boundary; StampError when they are not that simple."""
    layer_re = re.compile(rf"^{re.escape(prefix)}\.(\d+)$")

    def layer_of(node) -> int | None:
        for scope in _scopes(node):
            if m := layer_re.match(scope):
                return int(m.group(1))
        return None

    template = [n for n in graph if layer_of(n) == src]
    if not template:
        raise StampError(f"no node of layer {src} in the shallow export")
    in_template = set(template)
    produced = {v for n in template for v in n.outputs}
    graph_outputs = {v.name: v for v in graph.outputs}
    graph_inputs = {v.name: v for v in graph.inputs}
    present = [graph_outputs.get(present_name(src, t)) for t in KV]
    past = [graph_inputs.get(past_name(src, t)) for t in KV]
    if any(v is None or v not in produced for v in present) or any(v is None for v in past):
        raise StampError(f"layer {src}'s past/present are not its own graph I/O")

    escaping = [v for v in produced if v.is_graph_output() or any(u.node not in in_template for u in v.uses())]
    hidden_out = [v for v in escaping if not v.is_graph_output()]
    if len(hidden_out) != 1 or any(u.node not in in_template for v in present for u in v.uses()):
        raise StampError(f"layer {src} has escaping values {[v.name for v in escaping]}, expected hidden + present")
    hidden_out = hidden_out[0]
    external = list(dict.fromkeys(v for n in template for v in n.inputs if v is not None and v not in produced))
    hidden_in = [v for v in external if v.producer() is not None and layer_of(v.producer()) == src - 1
                 and v.dtype == hidden_out.dtype and v.shape == hidden_out.shape]
    if len(hidden_in) != 1:
        raise StampError(f"layer {src}'s hidden-state input is ambiguous: {[v.name for v in hidden_in]}")
    return _Template(src, template, past, present, hidden_in[0], hidden_out)


def _parameter_uses(template: _Template, params: dict, prefix: str) -> dict[tuple[int, int], tuple[str, bool]]:
    """(node index, input index) -> (parameter name, transposed?) for every template input that is one of
    layer `src`'s parameters; StampError when a parameter is not found among the initializers."""
    src = template.src
    arrays = {name: p.detach().numpy() for name, p in params.items()}
    uses: dict[tuple[int, int], tuple[str, bool]] = {}
    accounted: set[str] = set()
    for n_index, node in enumerate(template.nodes):
        scopes = _scopes(node)
        module = scopes[-2] if len(scopes) >= 2 else ""
        rel = module[len(f"{prefix}.{src}."):] if module.startswith(f"{prefix}.{src}.") else ""
        for i_index, value in enumerate(node.inputs):
            if value is None or not value.is_initializer() or value.const_value is None:
                continue
            array = value.const_value.numpy()
            local = [k for k in params if rel and k.startswith(rel + ".")]
            match = _match(array, local, arrays) or _match(array, list(params), arrays, unique=True)
            if match:
                uses[(n_index, i_index)] = match
                accounted.add(match[0])
    missing = sorted(set(params) - accounted)
    if missing:
        raise StampError(f"layer {src} parameters not found among its initializers: {missing}")
    return uses


def _clone_layers(graph, template: _Template, uses, layers, prefix: str, num_layers: int):
    """Clones of the template for layers SHALLOW_LAYERS..num_layers-1, each on its own cache inputs and
    weights, chained on the hidden state. Returns (nodes, new inputs, new outputs, last hidden state)."""
    import onnx_ir as ir

    src, past, present = template.src, template.past, template.present
    # Rewrite metadata strings that name layer `src` (scopes, namespace, fx node names).
    dotted = re.compile(rf"(\blayers\.){src}(?!\d)")
    flat = re.compile(rf"(\blayers_){src}(?=_)")

    def relabel(text: str, i: int) -> str:
        return flat.sub(rf"\g<1>{i}", dotted.sub(rf"\g<1>{i}", text))

    nodes = list(graph)
    taken = {v.name for n in nodes for v in n.outputs} | {v.name for v in graph.inputs} | set(graph.initializers)
    node_names = {n.name for n in nodes}
    new_nodes: list = []
    new_inputs: dict[str, Any] = {}
    new_outputs: dict[str, Any] = {}
    prev_hidden = template.hidden_out
    for i in range(SHALLOW_LAYERS, num_layers):
        inputs_i = []
        for t, template_past in zip(KV, past):
            value = ir.Value(name=past_name(i, t), type=ir.TensorType(template_past.dtype),
                             shape=template_past.shape.copy() if template_past.shape is not None else None)
            new_inputs[value.name] = value
            inputs_i.append(value)
        weights: dict[tuple[str, bool], Any] = {}
        value_map = {template.hidden_in: prev_hidden, past[0]: inputs_i[0], past[1]: inputs_i[1]}
        cloner = ir._cloner.Cloner(attr_map={}, value_map=value_map, metadata_props={},
                                   allow_outer_scope_values=True)
        for n_index, node in enumerate(template.nodes):
            clone = cloner.clone_node(node)
            clone.name = _fresh(f"{node.name}_l{i}", node_names)
            for key, text in list(clone.metadata_props.items()):
                clone.metadata_props[key] = relabel(text, i)
            for out, new_out in zip(node.outputs, clone.outputs):
                if out is present[0] or out is present[1]:
                    new_out.name = present_name(i, KV[present.index(out)])
                    new_outputs[new_out.name] = new_out
                else:
                    new_out.name = _fresh(f"{out.name}_l{i}", taken)
            for i_index, value in enumerate(node.inputs):
                if (n_index, i_index) in uses:
                    param, transposed = uses[(n_index, i_index)]
                    if (param, transposed) not in weights:
                        weights[(param, transposed)] = _initializer(
                            graph, layers[i].get_parameter(param), f"{prefix}.{i}.{param}", transposed, value)
                    clone.replace_input_with(i_index, weights[(param, transposed)])
            new_nodes.append(clone)
        prev_hidden = cloner._value_map[template.hidden_out]
    return new_nodes, new_inputs, new_outputs, prev_hidden


def _order_cache_io(graph, num_layers: int, new_inputs: dict, new_outputs: dict) -> None:
    """Graph I/O in a full export's order: the other inputs / outputs, then every layer's cache in order.
    (Shape-only consumers outside the layers keep reading past_key_values.1.*: a full export does the same.)"""
    ins = {v.name: v for v in graph.inputs} | new_inputs
    outs = {v.name: v for v in graph.outputs} | new_outputs
    graph.inputs.clear()
    graph.inputs.extend([v for name, v in ins.items() if not name.startswith(PAST_PREFIX)]
                        + [ins[past_name(i, t)] for i in range(num_layers) for t in KV])
    graph.outputs.clear()
    graph.outputs.extend([v for name, v in outs.items() if not name.startswith(PRESENT_PREFIX)]
                         + [outs[present_name(i, t)] for i in range(num_layers) for t in KV])


def _match(array, names: list[str], arrays: dict, unique: bool = False) -> tuple[str, bool] | None:
    """(parameter name, transposed?) whose value equals `array` as is or transposed (2-D), else None."""
    import numpy as np

    hits = []
    for name in names:
        p = arrays[name]
        if p.dtype != array.dtype:
            continue
        if p.shape == array.shape and np.array_equal(p, array):
            hits.append((name, False))
        elif p.ndim == 2 and p.shape[::-1] == array.shape and np.array_equal(p.T, array):
            hits.append((name, True))
        if hits and not unique:
            return hits[0]
    return hits[0] if len(hits) == 1 else None


def _initializer(graph, param, name: str, transposed: bool, like):
    """Layer i's parameter as a graph initializer, without copying it.

    As is: a zero-copy TorchTensor view (what the exporter itself stores). Transposed (the exporter
    folds `linear`'s weight transpose into a MatMul constant), or half-stored (compiler/frontend/half_storage.py,
    widened to the template's FP32): a ParameterView (compiler/frontend/lazy_weights.py) that transposes / widens
    on demand, so stamping N layers holds no second copy of the weights.
    """
    import onnx_ir as ir
    from torch.onnx._internal.exporter._core import TorchTensor

    from compiler.frontend.lazy_weights import ParameterView, torch_dtype

    tensor = param.detach()
    if transposed:
        name += "_T"
    if transposed or tensor.dtype != (torch_dtype(like) or tensor.dtype):  # a half weight widens on read (exact)
        const = ParameterView(tensor, like.dtype, name, transposed=transposed)
    else:
        const = TorchTensor(tensor, name=name)
    # A type object of its own: passes set `value.dtype` in place (cast-fp16), and a TensorType shared
    # with the template would make the first cast look done for every stamped weight.
    value = ir.Value(name=name, type=ir.TensorType(like.dtype), shape=ir.Shape(const.shape), const_value=const)
    graph.register_initializer(value)
    return value


def _own_types(graph) -> None:
    """Give every value its own type object. Cloned values share their template's TensorType, and
    passes change dtypes in place (cast-fp16 sets `value.dtype`): through a shared type the first
    cast would relabel every copy without converting its data (TensorRT then sees FP32 weights)."""
    import onnx_ir as ir

    seen: set[int] = set()
    values = [*graph.inputs, *graph.initializers.values(), *(out for node in graph for out in node.outputs)]
    for value in values:
        if isinstance(value.type, ir.TensorType):
            if id(value.type) in seen:
                value.type = ir.TensorType(value.dtype)
            seen.add(id(value.type))


def _fresh(name: str, taken: set[str]) -> str:
    candidate, k = name, 0
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate
