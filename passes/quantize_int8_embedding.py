"""INT8 embedding table, one scale per row, stored once for the embedding Gather and a tied lm_head.

Why: with the decoder in INT4 the FP16 embedding dominates a small model's bytes (Gemma 3 270M: the
262144 x 640 table is 335 MB of a 389 MB int4-awq artifact). The exporter leaves a tied table as one
initializer E[V, H] read twice, by the embedding `Gather` and by lm_head through `Transpose -> MatMul`;
the weight-only passes skip it as shared (passes/weight_quant.py). Here E becomes
`DequantizeLinear(int8 q[V, H], scale[V], axis=0)` and every reader takes its output, so one INT8
copy serves both: a row's scale is that token's, for the Gather, and that logit's output-channel
scale, for lm_head (the per-output-channel form of quantize-int8-wo). Symmetric, as TensorRT's weight
DQ requires; quantized by `quantize_per_channel_int8`, the same rule as int8-wo.

An untied lm_head is a separate MatMul weight: quantize it with `quantize-int8-wo` (`include_lm_head`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import LlmcPass
from .quantize_int8_wo import quantize_per_channel_int8
from .weight_quant import QuantizedWeight, dequantize_linear, is_lm_head

FLOATS = (ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.BFLOAT16)


def embedding_tables(model: ir.Model) -> list[ir.Value]:
    """Float 2-D initializers gathered along axis 0 (token embeddings), each once."""
    out: dict[str, ir.Value] = {}
    for node in model.graph:
        if node.op_type != "Gather" or node.domain != "":
            continue
        table = node.inputs[0]
        axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 0
        if (axis == 0 and table is not None and table.is_initializer() and table.const_value is not None
                and table.dtype in FLOATS and len(table.shape) == 2):
            out[table.name] = table
    return list(out.values())


def readers(table: ir.Value) -> list[str]:
    """What reads the table, by HF module: a Gather is `model.embed_tokens`, a Transpose feeding the
    logits MatMul `lm_head`; anything else by its op type."""
    names = []
    for node, _ in table.uses():
        if node.op_type == "Gather":
            names.append("model.embed_tokens")
        elif node.op_type == "Transpose" and any(is_lm_head(u) for o in node.outputs for u, _ in o.uses()):
            names.append("lm_head")
        else:
            names.append(node.op_type)
    return names


class QuantizeInt8EmbeddingPass(LlmcPass):
    weight_format = "int8"
    check_tolerance = (1.0, 0.75)
    recipe_name = "quantize-int8-embedding"
    q_dtype = ir.DataType.INT8

    def __init__(self):
        super().__init__()
        self.quantized: list[str] = []  # model.embed_tokens, and lm_head when tied: the report's precision map

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for table in embedding_tables(model):
            what = readers(table)
            if any(r not in ("model.embed_tokens", "lm_head") for r in what):
                continue  # read by something else too: a DQ there is not what that reader was tested with
            qw = self.quantize_table(table.const_value.numpy())
            if qw is None:
                continue
            _replace_table(model.graph, table, qw, self.q_dtype)
            self.quantized.extend(sorted(set(what)))
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def quantize_table(self, table_VH: np.ndarray) -> QuantizedWeight | None:
        """The table's quantized form (q [V, H] and its DequantizeLinear attributes), or None to leave it."""
        qw = quantize_per_channel_int8(table_VH.T)  # per column of E^T = per row of E
        return QuantizedWeight(np.ascontiguousarray(qw.q.T), qw.scale, axis=0)


def _replace_table(graph: ir.Graph, table: ir.Value, qw: QuantizedWeight, dtype: ir.DataType) -> None:
    dq = dequantize_linear(graph, table, qw, dtype, f"{table.name}.dequantize")
    first = min((node for node, _ in table.uses()), key=list(graph).index)
    graph.insert_before(first, dq)
    table.replace_all_uses_with(dq.outputs[0])
    graph.initializers.pop(table.name)
    table.const_value = None
