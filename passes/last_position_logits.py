"""Logits only at the positions asked for: the lm_head reads gathered hidden states, not every position.

Why: a prefill of S tokens computes S x vocab logits and ships them out, while generation samples
from one row per sequence. At Gemma 3 270M (vocab 262144, hidden 640) a 2048-token prompt's lm_head
is 2048 x 640 x 262144 = 344 GMAC, more than the rest of its prefill (~100M non-embedding
parameters x 2048 tokens = 205 GMAC, plus attention), and 1 GiB of FP16 logits; gathered to the
last position it is 1/2048 of both.

What: a graph input `logits_positions` int64 [batch, n] (indices into the step's sequence dim, per
row) and a GatherND(batch_dims=1) on the hidden state that feeds the lm_head MatMul, so the MatMul
and anything after it (softcap, casts: position-wise ops) run on [batch, n, hidden]; `logits`
becomes [batch, n, vocab]. One graph serves both uses: validation feeds every position
(arange(S) per row: the logits of the graph before the pass, exactly), serving feeds the last real
position of each row (n = 1). TensorRT parses GatherND with batch_dims=1 as a native GATHER layer
(../shared/probes/trt_onnx_ops.py run on tensorrt_rtx 1.7: layers CAST, GATHER; no plugin).
"""

from __future__ import annotations

import onnx_ir as ir

from compiler.graph_io import BATCH, LOGITS_AT, LOGITS_AT_DIM

from .base import LlmcPass

# ops allowed between the lm_head MatMul and the logits output: position-wise, so gathering first is exact
_POSITIONWISE = {"Cast", "Div", "Mul", "Tanh", "Identity"}


def lm_head(graph: ir.Graph) -> ir.Node:
    """The MatMul whose output becomes `logits` (through position-wise ops only)."""
    value = next((v for v in graph.outputs if v.name == "logits"), None)
    for _ in range(8):
        producer = value.producer() if value is not None else None
        if producer is None:
            break
        if producer.op_type == "MatMul":
            return producer
        if producer.op_type not in _POSITIONWISE:
            raise ir.passes.PreconditionError(f"{producer.op_type} between the lm_head and the logits is not "
                                              "position-wise: gathering before it would change the logits")
        value = producer.inputs[0]
    raise ir.passes.PreconditionError("no lm_head MatMul found before the logits (not a decoder graph?)")


class LastPositionLogitsPass(LlmcPass):
    """Add `logits_positions` [batch, n] and gather the lm_head's input rows; logits [batch, n, vocab].

    The gathered rows' logits are the same dot products, but a GEMM of fewer rows may run another
    kernel: bit-identical with FP32 accumulation (llmc's onnxruntime executor), one FP16 ulp apart with
    onnxruntime's own FP16 MatMul (measured 0.0078 at |logit| 8-16 on the bundled model, by
    `--check-passes`), as TensorRT may pick another tactic for another M. Hence cleanup's FP16 bound.
    """

    check_tolerance = (2e-2, 1.0)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        if any(v.name == LOGITS_AT for v in graph.inputs):
            return ir.passes.PassResult(model, modified=False)
        matmul = lm_head(graph)
        hidden = matmul.inputs[0]
        positions = ir.Value(name=LOGITS_AT, shape=ir.Shape([BATCH, LOGITS_AT_DIM]),
                             type=ir.TensorType(ir.DataType.INT64))
        graph.inputs.append(positions)
        axes = ir.Value(name="llmc.logits_positions.axes", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.INT64),
                        const_value=ir.tensor([2], dtype=ir.DataType.INT64))
        graph.register_initializer(axes)
        unsqueeze = ir.node("Unsqueeze", [positions, axes], name="llmc.logits_positions.unsqueeze")
        gather = ir.node("GatherND", [hidden, unsqueeze.outputs[0]], attributes={"batch_dims": 1},
                         name="llmc.logits_positions.gather")
        gather.outputs[0].dtype = hidden.dtype
        if hidden.shape is not None and len(hidden.shape) == 3:
            gather.outputs[0].shape = ir.Shape([BATCH, LOGITS_AT_DIM, hidden.shape[2]])
        graph.insert_before(matmul, [unsqueeze, gather])
        matmul.replace_input_with(0, gather.outputs[0])
        value = next(v for v in graph.outputs if v.name == "logits")
        while True:  # the MatMul's output and the position-wise ops after it: their sequence dim is n now
            if value.shape is not None and len(value.shape) == 3:
                value.shape = ir.Shape([BATCH, LOGITS_AT_DIM, value.shape[2]])
            if value.producer() is matmul:
                break
            value = value.producer().inputs[0]
        return ir.passes.PassResult(model, modified=True)
