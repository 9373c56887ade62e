"""FP32 logits for the K best candidates, so FP16's output rounding does not decide the greedy token.

Why: an FP16 lm_head accumulates in FP32 (TensorRT's FP16 GEMMs; llmc's onnxruntime executor, through
compiler/runtime/ort_widen.py) and then rounds every logit to FP16, whose spacing is 1/64 at |logit| 16-32.
Two candidates closer than that become one value, and argmax takes the lower token id. On Gemma 3 270M
the fp16 build's greedy text for "The capital of France is" left PyTorch FP32's at the 12th new token,
where FP32 ranks " largest" 16.931 over " capital" 16.913 (benchmarks/NOTES.md). A PyTorch emulation
with every decoder matmul, norm, attention, rotary table and GELU rounded to FP16 kept " largest" (gap
+0.011) until the logits themselves were rounded: the output rounding, not the FP16 body, flips it.

What: after the lm_head MatMul (FP16 hidden x FP16 weight -> FP16 logits), TopK(K) of the logits widened
to FP32; those K weight columns gathered, widened, and multiplied in FP32 with the lm_head's own FP16
input widened, which is the unrounded FP32 sum the FP16 GEMM computed for them; ScatterElements writes
the K values into the widened logits. `logits` becomes FP32: the K best exact in FP32 (the rest are the
FP16 values, which cannot hold the argmax: it is within one FP16 spacing of the FP16 maximum, and K is
far more than the candidates that close). Greedy and top-k sampling then choose as the FP32 product does.

Cost per logits position: a TopK over the vocabulary and K x hidden multiply-adds (Gemma 3 270M, K 16:
10,240 against the lm_head's 168M), plus FP32 logits out (1 MiB per position at a 262,144 vocabulary;
serving asks for the last position only, passes/last_position_logits.py). TensorRT-RTX 1.7 parses it
to native TOPK, GATHER, MATRIX_MULTIPLY and SCATTER layers (tests/test_pass_logits_fp32_topk.py).

Weight source: a lm_head reading Transpose(table) (a tied embedding) gathers the table's rows, so the
[vocab, hidden] table is never materialized transposed; any other [hidden, vocab] weight (initializer or
a DequantizeLinear) is gathered by column.
"""

from __future__ import annotations

import onnx_ir as ir



from .base import LlmcPass
from .last_position_logits import lm_head

F32, I64 = ir.DataType.FLOAT, ir.DataType.INT64
PREFIX, LOGITS = "llmc.logits_fp32", "logits"


class LogitsFp32TopKPass(LlmcPass):
    """`logits` FP32, the K largest of each position recomputed from the lm_head's operands in FP32."""

    # Against the graph before it (FP16 logits): the K refined values move by at most half an FP16
    # spacing (0.0078 at |logit| < 16, 0.0156 below 32) and every other logit not at all.
    check_tolerance = (2e-2, 1.0)

    def __init__(self, k: int = 16):
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 3840:
            raise ValueError(f"k must be an integer from 1 to 3840, TensorRT's TopK limit (got {k!r})")
        self.k = k

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        logits = next((v for v in graph.outputs if v.name == LOGITS), None)
        if logits is not None and logits.dtype == F32:
            return ir.passes.PassResult(model, modified=False)  # already FP32 (an FP32 graph, or done)
        matmul = lm_head(graph)
        if logits is not matmul.outputs[0]:
            raise ir.passes.PreconditionError(
                f"logits-fp32-topk needs the lm_head MatMul to write `logits` itself; found "
                f"{logits.producer().op_type} after it (a softcap?): put the pass before those ops are added")
        hidden, weight = matmul.inputs
        nodes: list[ir.Node] = []

        def add(op, inputs, name, **attributes):
            node = ir.node(op, inputs, attributes=attributes, name=f"{PREFIX}.{name}")
            node.outputs[0].name = f"{PREFIX}.{name}"
            nodes.append(node)
            return node.outputs[0]

        def const(name, values):
            value = ir.Value(name=f"{PREFIX}.{name}", shape=ir.Shape([len(values)]), type=ir.TensorType(I64),
                             const_value=ir.tensor(values, dtype=I64))
            graph.register_initializer(value)
            return value

        logits.name = f"{PREFIX}.fp16"
        wide = add("Cast", [logits], "wide", to=F32)
        k = const("k", [self.k])
        top = ir.node("TopK", [wide, k], attributes={"axis": -1, "largest": 1, "sorted": 0}, num_outputs=2,
                      name=f"{PREFIX}.topk")
        top.outputs[0].name, top.outputs[1].name = f"{PREFIX}.topk.values", f"{PREFIX}.topk.indices"
        nodes.append(top)
        indices = top.outputs[1]  # [batch, n, K]
        transpose = weight.producer()
        if (transpose is not None and transpose.op_type == "Transpose" and transpose.domain == ""
                and list(transpose.attributes.get_ints("perm", [1, 0])) == [1, 0]):
            rows = add("Gather", [transpose.inputs[0], indices], "rows", axis=0)  # [batch, n, K, hidden]
        else:
            columns = add("Gather", [weight, indices], "columns", axis=1)  # [hidden, batch, n, K]
            rows = add("Transpose", [columns], "rows", perm=[1, 2, 3, 0])
        rows32 = add("Cast", [rows], "rows32", to=F32)
        hidden32 = add("Cast", [hidden], "hidden32", to=F32)  # [batch, n, hidden]
        column = add("Unsqueeze", [hidden32, const("axes", [-1])], "column")  # [batch, n, hidden, 1]
        products = add("MatMul", [rows32, column], "products")  # [batch, n, K, 1]
        refined = add("Squeeze", [products, const("squeeze_axes", [-1])], "refined")
        scatter = ir.node("ScatterElements", [wide, indices, refined], attributes={"axis": -1},
                          name=f"{PREFIX}.scatter")
        out = scatter.outputs[0]
        out.name, out.dtype, out.shape = LOGITS, F32, logits.shape
        nodes.append(scatter)
        graph.insert_after(matmul, nodes)
        graph.outputs[graph.outputs.index(logits)] = out
        return ir.passes.PassResult(model, modified=True)
