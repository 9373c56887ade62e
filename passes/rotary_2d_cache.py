"""Rewrite RotaryEmbedding to take 2-D cos/sin caches + position_ids: the form TensorRT maps natively.

Why: torch.onnx's exporter emits `RotaryEmbedding(x, cos, sin)` whose 3-D cos/sin
`[batch, seq, rotary_dim/2]` are recomputed from position_ids in every layer (Cos/Sin of
positions x inv_freq). TensorRT's ONNX parser maps the opset-23 form with a 2-D cache
`[max_positions, rotary_dim/2]` and position_ids to one ROTARY_EMBEDDING layer, and the table
is a constant computed once.

How: pattern = a RotaryEmbedding with no position_ids whose cos/sin depend only on the graph
input `position_ids` (checked by walking their producer cone); the table is obtained by
*evaluating that cone* with onnxruntime at positions 0..max_positions-1, so any rope variant the
exporter wrote (default, llama3, linear, dynamic-at-export, attention scaling) is tabulated
exactly as the model computes it. Replacement = the same node with the shared tables and
position_ids as inputs; the dead Cos/Sin chains are removed.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
from .base import LlmcPass

POSITION_IDS = "position_ids"


def _needs_rewrite(node: ir.Node) -> bool:
    return (
        node.op_type == "RotaryEmbedding"
        and node.domain == ""
        and (len(node.inputs) < 4 or node.inputs[3] is None)
    )


def _cone_graph_inputs(value: ir.Value) -> set[str]:
    """Names of graph inputs that `value` depends on (initializers and constants excluded)."""
    seen: set[int] = set()
    found: set[str] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if v is None or id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input():
            found.add(v.name)
            continue
        producer = v.producer()
        if producer is not None:
            stack.extend(producer.inputs)
    return found


def _evaluate(model: ir.Model, values: list[ir.Value], max_positions: int) -> dict[str, np.ndarray]:
    """Run the cos/sin producer cone for position_ids = [[0, 1, ..., max_positions-1]]."""
    import onnxruntime as ort

    sub = ir.convenience.extract(model.graph, inputs=[POSITION_IDS], outputs=values)
    sub_model = ir.Model(sub, ir_version=model.ir_version)
    sub_model.opset_imports.update(model.opset_imports)
    # A model loaded from disk (the stage cache's export) keeps its weights as external references
    # relative to its file; a session made from bytes has no directory to resolve them in, so the
    # cone's few initializers (inv_freq, attention scaling) go in as values.
    for v in sub.initializers.values():
        if isinstance(v.const_value, ir.ExternalTensor):
            v.const_value = ir.tensor(v.const_value.numpy(), name=v.name)
    proto = ir.serde.serialize_model(sub_model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    positions = np.arange(max_positions, dtype=np.int64)[None, :]
    outs = session.run([v.name for v in values], {POSITION_IDS: positions})
    return {v.name: out.reshape(max_positions, -1) for v, out in zip(values, outs)}


class Rotary2DCachePass(LlmcPass):
    """RotaryEmbedding(x, cos3d, sin3d) -> RotaryEmbedding(x, cos_cache, sin_cache, position_ids)."""


    @classmethod
    def from_context(cls, ctx, **options):
        return cls(max_positions=ctx.max_positions, **options)

    def __init__(self, max_positions: int):
        super().__init__()
        self.max_positions = max_positions

    def requires(self, model: ir.Model) -> None:
        if any(_needs_rewrite(n) for n in model.graph) and POSITION_IDS not in {v.name for v in model.graph.inputs}:
            raise ir.passes.PreconditionError(f"graph has RotaryEmbedding but no '{POSITION_IDS}' input")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = [n for n in graph if _needs_rewrite(n)]
        if not nodes:
            return ir.passes.PassResult(model, modified=False)
        position_ids = next(v for v in graph.inputs if v.name == POSITION_IDS)
        tables_needed: dict[str, ir.Value] = {}
        for node in nodes:
            for value in node.inputs[1:3]:
                deps = _cone_graph_inputs(value)
                if deps != {POSITION_IDS}:
                    raise ir.passes.PreconditionError(
                        f"{node.name}: cos/sin input {value.name} depends on {sorted(deps)}, not only "
                        f"'{POSITION_IDS}'; cannot tabulate it"
                    )
                tables_needed[value.name] = value
        tables = _evaluate(model, list(tables_needed.values()), self.max_positions)

        # One initializer per distinct table: every layer normally shares the same cos and sin.
        by_digest: dict[str, ir.Value] = {}

        def table_value(name: str, kind: str) -> ir.Value:
            arr = np.ascontiguousarray(tables[name])
            digest = hashlib.sha256(arr.tobytes() + str(arr.shape).encode()).hexdigest()
            if digest not in by_digest:
                suffix = "" if not any(k.startswith(kind) for k in (v.name for v in by_digest.values())) else f"_{len(by_digest)}"
                init = ir.Value(name=f"{kind}{suffix}", const_value=ir.tensor(arr, name=f"{kind}{suffix}"))
                init.shape = ir.Shape(arr.shape)
                init.type = ir.TensorType(ir.DataType.from_numpy(arr.dtype))
                graph.register_initializer(init)
                by_digest[digest] = init
            return by_digest[digest]

        for node in nodes:
            cos = table_value(node.inputs[1].name, "rotary_emb.cos_cache")
            sin = table_value(node.inputs[2].name, "rotary_emb.sin_cache")
            node.resize_inputs(4)
            node.replace_input_with(1, cos)
            node.replace_input_with(2, sin)
            node.replace_input_with(3, position_ids)
        ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=True)

    def ensures(self, model: ir.Model) -> None:
        if any(_needs_rewrite(n) for n in model.graph):
            raise ir.passes.PostconditionError("a RotaryEmbedding without position_ids remains")
