"""FP32 logits for the K best candidates, so FP16's output rounding does not decide the greedy token.

Why: an FP16 lm_head accumulates in FP32 (TensorRT's FP16 GEMMs; llmc's onnxruntime executor, through
compiler/runtime/ort_widen.py) and then rounds every logit to FP16, whose spacing is 1/64 at |logit| 16-32.
Two candidates closer than that become one value, and argmax takes the lower token id. On Gemma 3 270M
the fp16 build's greedy text for "The capital of France is" left PyTorch FP32's at the 12th new token,
where FP32 ranks " largest" 16.931 over " capital" 16.913 (benchmarks/NOTES.md). A PyTorch emulation
with every decoder matmul, norm, attention, rotary table and GELU rounded to FP16 kept " largest" (gap
+0.011) until the logits themselves were rounded: the output rounding, not the FP16 body, flips it.

What: after the lm_head MatMul (FP16 hidden x FP16 weight -> FP16 logits), TopK(K) of the FP16 logits;
those K weight columns gathered, widened, and multiplied in FP32 with the lm_head's own FP16 input
widened, which is the unrounded FP32 sum the FP16 GEMM computed for them; ScatterElements writes the K
values into the widened logits. `logits` becomes FP32: the K best exact in FP32 (the rest are the FP16
values, which cannot hold the argmax: it is within one FP16 spacing of the FP16 maximum, and K is far
more than the candidates that close). Greedy and top-k sampling then choose as the FP32 product does.
TensorRT-RTX 1.7 parses it to native TOPK, GATHER, MATRIX_MULTIPLY and SCATTER layers.

Cost (benchmarks/logits_refine_cost.py, the same operations in PyTorch on an H100, CUDA graphs; no
TensorRT engine runs here): at Gemma 3 270M's lm_head (hidden 640, vocab 262144; the GEMM alone 121 us
at batch 1) it adds 66 us at batch 1, 89 us at 8 and 289 us at 64, almost all of it torch.topk (45 us
for one 262144-wide row); the K x hidden multiply-adds are nothing. `chunk: C` replaces the one TopK by
each C-wide chunk's max, the K best chunks, and a TopK inside them (C must divide the vocabulary): in
PyTorch slower at batch 1 and 8 (73 against 45 us for the top-k alone) and faster at 64 (89 against
150 us). Hence one TopK by default. On the CPU executor the difference is within noise (Gemma 3 270M,
64 decode steps, benchmarks/NOTES.md). The FP32 logits out are 1 MiB a position at 262144 (serving asks
for the last position only, passes/last_position_logits.py).

Weight source: a lm_head reading Transpose(table) (a tied embedding) gathers the table's rows, so the
[vocab, hidden] table is never materialized transposed; any other [hidden, vocab] weight (initializer or
a DequantizeLinear) is gathered by column.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .base import LlmcPass, register_constant
from .last_position_logits import lm_head

F32 = ir.DataType.FLOAT
PREFIX, LOGITS = "llmc.logits_fp32", "logits"


class LogitsFp32TopKPass(LlmcPass):
    """`logits` FP32, the K largest of each position recomputed from the lm_head's operands in FP32."""

    # Against the graph before it (FP16 logits): the K refined values move by at most half an FP16
    # spacing (0.0078 at |logit| < 16, 0.0156 below 32) and every other logit not at all.
    check_tolerance = (2e-2, 1.0)

    def __init__(self, k: int = 16, chunk: int = 0):
        super().__init__()
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 3840:
            raise ValueError(f"k must be an integer from 1 to 3840, TensorRT's TopK limit (got {k!r})")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0 or k * chunk > (1 << 24):
            raise ValueError(f"chunk must be 0 (one TopK over the vocabulary) or a positive integer with "
                             f"k x chunk <= 2^24 (got {chunk!r})")
        self.k, self.chunk = k, chunk

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        logits = next((v for v in graph.outputs if v.name == LOGITS), None)
        if logits is not None and logits.dtype == F32:
            return ir.passes.PassResult(model, modified=False)  # already FP32 (an FP32 graph, or done)
        matmul = lm_head(graph)
        if logits is not matmul.outputs[0]:
            raise ir.passes.PreconditionError(
                f"logits-fp32-topk needs the lm_head MatMul to write `logits` itself; found "
                f"{logits.producer().op_type} after it (a softcap?), which it cannot refine through: use a recipe "
                f"without logits-fp32-topk for this model")
        hidden, weight = matmul.inputs
        nodes: list[ir.Node] = []

        def add(op, inputs, name, **attributes):
            node = ir.node(op, inputs, attributes=attributes, name=f"{PREFIX}.{name}")
            node.outputs[0].name = f"{PREFIX}.{name}"
            nodes.append(node)
            return node.outputs[0]

        def const(name, values):
            return register_constant(graph, f"{PREFIX}.{name}", np.array(values, np.int64))

        logits.name = f"{PREFIX}.fp16"
        wide = add("Cast", [logits], "wide", to=F32)
        k = const("k", [self.k])

        def topk(values, name):
            top = ir.node("TopK", [values, k], attributes={"axis": -1, "largest": 1, "sorted": 0}, num_outputs=2,
                          name=f"{PREFIX}.{name}")
            top.outputs[0].name, top.outputs[1].name = f"{PREFIX}.{name}.values", f"{PREFIX}.{name}.indices"
            nodes.append(top)
            return top.outputs[1]

        vocab = logits.shape[-1] if logits.shape is not None and len(logits.shape) else None
        chunk = self.chunk
        if not chunk or not isinstance(vocab, int) or vocab % chunk or vocab // chunk < self.k:
            indices = topk(logits, "topk")  # [batch, n, K], over the FP16 logits: half the bytes of the widened
        else:  # each chunk's max, the K best chunks, TopK inside them: every one of the K best values
            # lies in a chunk whose max is among the K best maxima (at most K - 1 chunks hold a larger one).
            # A vocabulary `chunk` does not divide, or of fewer than K chunks, keeps the one TopK.
            chunks = add("Reshape", [logits, const("chunks_shape", [0, 0, vocab // chunk, chunk])], "chunks")
            maxima = add("ReduceMax", [chunks, const("max_axes", [-1])], "maxima", keepdims=0)
            best = topk(maxima, "best_chunks")  # [batch, n, K] chunk ids
            picked = add("GatherND", [chunks, add("Unsqueeze", [best, const("best_axes", [-1])], "best_index")],
                         "picked", batch_dims=2)  # [batch, n, K, chunk]
            flat = add("Reshape", [picked, const("picked_shape", [0, 0, self.k * chunk])], "picked_flat")
            inner = topk(flat, "inner")  # [batch, n, K] into the picked chunks
            size = const("chunk", [chunk])
            owner = add("GatherElements", [best, add("Div", [inner, size], "inner_chunk")], "owner", axis=-1)
            indices = add("Add", [add("Mul", [owner, size], "owner_start"), add("Mod", [inner, size], "inner_offset")],
                          "indices")
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
