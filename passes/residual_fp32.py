"""Keep the residual stream in FP32 after cast-fp16, for models whose hidden states exceed FP16's range.

Why: Gemma 3 scales its embeddings by sqrt(hidden) and its blocks add post-normed branches that keep
growing the residual sum: on Gemma 3 270M |hidden| reaches ~1.0e5 by layer 14 (FP16 holds 65504), so an
all-FP16 graph turns it into inf and the logits into NaN (benchmarks/NOTES.md). Every branch output and
every norm output stays well inside FP16, so only the sum itself, and the norms that read it, need FP32:
the matmuls, attention and the KV cache stay FP16.

What: the stream is found from the final norm back: its input is an Add of the previous stream value
(the operand with more than one use: it also feeds the layer's norm) and a branch output, down to the
embedding. Stream values become FP32 (branch outputs are Cast up into the Adds, the embedding's output
once); RMSNormalization reading the stream computes in FP32 with an FP32 copy of its scale (AWQ then
folds into that scale as before) and its output is Cast back to FP16. Other readers get a Cast to FP16.

Which models: the export marks them (`MARK` in the graph metadata, `mark` below): the architectures in
`ARCHITECTURES`. Elsewhere the pass changes nothing, so recipes can list it for every model.
"""

from __future__ import annotations

import onnx_ir as ir
from .base import LlmcPass

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
MARK = "llmc.residual_fp32"
ARCHITECTURES = frozenset({"Gemma3ForCausalLM"})


def mark(model: ir.Model, architecture: str) -> None:
    """Called by the export: flag the graph of an architecture whose residual stream overflows FP16."""
    if architecture in ARCHITECTURES:
        model.graph.metadata_props[MARK] = "1"


def _logits_norm(graph: ir.Graph) -> ir.Node:
    """The final RMSNormalization: the one the logits are computed from (through the lm_head MatMul)."""
    logits = next((v for v in graph.outputs if v.name == "logits"), None)
    value = logits
    for _ in range(8):  # lm_head MatMul, maybe a softcap's Div/Tanh/Mul or a Cast in between
        producer = value.producer() if value is not None else None
        if producer is None:
            break
        if producer.op_type == "RMSNormalization":
            return producer
        value = producer.inputs[0]
    raise ir.passes.PreconditionError("no RMSNormalization found before the logits (not a decoder graph?)")


def residual_stream(graph: ir.Graph) -> list[ir.Value]:
    """The residual stream's values, last (the final norm's input) to first (the embedding's output)."""
    stream = [_logits_norm(graph).inputs[0]]
    while (producer := stream[-1].producer()) is not None and producer.op_type == "Add":
        shared = [v for v in producer.inputs if v is not None and len(v.uses()) > 1]
        if len(shared) != 1:
            raise ir.passes.PreconditionError(f"{producer.name}: cannot tell the residual operand from the branch "
                                              f"({len(shared)} operands have other uses)")
        stream.append(shared[0])
    return stream


def _cast(graph: ir.Graph, value: ir.Value, to: ir.DataType, before: ir.Node, name: str) -> ir.Value:
    node = ir.node("Cast", [value], attributes={"to": to}, name=name)
    node.outputs[0].name = name
    node.outputs[0].dtype, node.outputs[0].shape = to, value.shape.copy() if value.shape is not None else None
    graph.insert_before(before, node)
    return node.outputs[0]


class ResidualFp32Pass(LlmcPass):
    """FP16 graph -> the same graph with its residual stream (and the norms reading it) in FP32."""

    check_tolerance = (0.1, 0.9)  # FP16 -> FP32 sums: the graph before it rounded them (or overflowed)

    def __init__(self, always: bool = False):
        """always: convert even an unmarked graph (tests; models that are not in ARCHITECTURES)."""
        super().__init__()
        self.always = always

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if not (self.always or graph.metadata_props.get(MARK)):
            return ir.passes.PassResult(model, modified=False)
        stream = residual_stream(graph)
        if any(v.dtype != F16 for v in stream):
            return ir.passes.PassResult(model, modified=False)  # not lowered to FP16, or converted already
        in_stream = set(stream)
        adds = {v.producer() for v in stream if v.producer() is not None and v.producer().op_type == "Add"}
        for k, value in enumerate(stream):
            readers = [(u.node, u.idx) for u in value.uses() if u.node not in adds]
            producer = value.producer()
            if producer in adds:
                for i, operand in enumerate(producer.inputs):
                    if operand not in in_stream:  # the branch output, up into the FP32 sum
                        producer.replace_input_with(i, _cast(graph, operand, F32, producer, f"{producer.name}.branch_fp32"))
                value.dtype = F32
            else:  # the embedding: its FP16 output, Cast once into the stream
                uses = [(u.node, u.idx) for u in value.uses()]
                cast = ir.node("Cast", [value], attributes={"to": F32}, name="residual_fp32.embedding")
                wide = cast.outputs[0]
                wide.name, wide.dtype = "residual_fp32.embedding", F32
                wide.shape = value.shape.copy() if value.shape is not None else None
                if producer is None:
                    graph.insert_before(graph.node(0), cast)
                else:
                    graph.insert_after(producer, cast)
                for node, idx in uses:
                    node.replace_input_with(idx, wide)
                value = wide
            for node, idx in readers:
                if node.op_type == "RMSNormalization" and idx == 0:
                    self._norm_in_fp32(graph, node)
                else:
                    node.replace_input_with(idx, _cast(graph, value, F16, node, f"{node.name}.input{idx}_fp16"))
        return ir.passes.PassResult(model, modified=True)

    @staticmethod
    def _norm_in_fp32(graph: ir.Graph, node: ir.Node) -> None:
        """RMSNormalization(x FP32, scale FP32) -> FP32, Cast to FP16 for its readers."""
        scale = node.inputs[1]
        if scale is not None and scale.dtype == F16:
            if scale.is_initializer() and scale.const_value is not None and len(scale.uses()) == 1:
                wide = ir.tensor(scale.const_value.numpy().astype("float32"), name=scale.name)
                scale.const_value, scale.dtype = wide, F32
            else:
                node.replace_input_with(1, _cast(graph, scale, F32, node, f"{node.name}.scale_fp32"))
        out = node.outputs[0]
        readers = [(u.node, u.idx) for u in out.uses()]
        narrow = ir.node("Cast", [out], attributes={"to": F16}, name=f"{node.name}.output_fp16")
        narrow.outputs[0].name = f"{out.name}_fp16"
        narrow.outputs[0].dtype, narrow.outputs[0].shape = F16, out.shape.copy() if out.shape is not None else None
        graph.insert_after(node, narrow)
        for reader, idx in readers:
            reader.replace_input_with(idx, narrow.outputs[0])
        out.dtype = F32

    def ensures(self, model: ir.Model) -> None:
        if self.always or model.graph.metadata_props.get(MARK):
            left = [v.name for v in residual_stream(model.graph) if v.dtype == F16]
            if left:
                raise ir.passes.PostconditionError(f"residual stream values still FP16: {left[:4]}")
