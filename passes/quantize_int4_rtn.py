"""INT4 weight-only quantization by round-to-nearest, block-wise along the input dimension.

Why: decode is bound by reading weights; 4-bit weights read 4x fewer bytes than FP16. TensorRT
maps `DequantizeLinear(int4 W[K, N], scale[K/block, N], axis=0, block_size)` feeding `MatMul` to
DEQUANTIZE + MATRIX_MULTIPLY (a fused weight-only GEMM), and requires zero point 0, so the
quantization is symmetric: scale = max|W_block| / 7, q = clip(round(W / scale), -8, 7).

Which MatMuls: those whose weight is a constant [K, N] initializer with K divisible by the block,
except the one producing `logits` (lm_head) unless `include_lm_head`; embeddings are Gathers and
never touched. Run after cast-fp16 so that scales are FP16 and the dequantized weight is FP16.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

INT4_MAX = 7


def quantize_blockwise(weight_KN: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric RTN: returns (int4 [K, N], scale [K/block, N] in the weight's float dtype)."""
    k, n = weight_KN.shape
    blocks = weight_KN.astype(np.float32).reshape(k // block, block, n)
    scale = np.abs(blocks).max(axis=1) / INT4_MAX
    scale = np.where(scale == 0, 1.0, scale).astype(weight_KN.dtype)
    q = np.clip(np.rint(blocks / scale[:, None, :].astype(np.float32)), -8, INT4_MAX)
    return q.reshape(k, n).astype(ml_dtypes.int4), scale


def dequantize_blockwise(q_KN: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    return (q_KN.astype(np.float32) * np.repeat(scale.astype(np.float32), block, axis=0)).astype(scale.dtype)


class QuantizeInt4RtnPass(ir.passes.InPlacePass):
    def __init__(self, block_size: int = 128, include_lm_head: bool = False):
        super().__init__()
        if block_size not in (32, 64, 128):
            raise ValueError(f"block_size must be 32, 64 or 128 (got {block_size})")
        self.block = block_size
        self.include_lm_head = include_lm_head

    def _candidates(self, model: ir.Model) -> list[ir.Node]:
        out = []
        for node in model.graph:
            if node.op_type != "MatMul" or node.domain != "":
                continue
            weight = node.inputs[1]
            if weight is None or not weight.is_initializer() or weight.const_value is None:
                continue
            if weight.dtype not in (ir.DataType.FLOAT16, ir.DataType.FLOAT) or len(weight.shape) != 2:
                continue
            if weight.shape[0] % self.block:
                continue
            if not self.include_lm_head and any(o.name == "logits" for o in node.outputs):
                continue
            if len(weight.uses()) != 1:  # a tied weight: quantizing one use would change the other
                continue
            out.append(node)
        return out

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = self._candidates(model)
        for node in nodes:
            weight = node.inputs[1]
            q, scale = quantize_blockwise(weight.const_value.numpy(), self.block)
            q_val = ir.Value(name=f"{weight.name}.int4", const_value=ir.tensor(q, name=f"{weight.name}.int4"))
            q_val.type, q_val.shape = ir.TensorType(ir.DataType.INT4), ir.Shape(q.shape)
            s_val = ir.Value(name=f"{weight.name}.scale", const_value=ir.tensor(scale, name=f"{weight.name}.scale"))
            s_val.type, s_val.shape = ir.TensorType(ir.DataType.from_numpy(scale.dtype)), ir.Shape(scale.shape)
            graph.register_initializer(q_val)
            graph.register_initializer(s_val)
            dq = ir.node("DequantizeLinear", [q_val, s_val], attributes={"axis": 0, "block_size": self.block},
                         name=f"{node.name}.dequantize")
            dq.outputs[0].name = f"{weight.name}.dequantized"
            dq.outputs[0].type, dq.outputs[0].shape = weight.type, weight.shape
            graph.insert_before(node, dq)
            node.replace_input_with(1, dq.outputs[0])
            graph.initializers.pop(weight.name)
        return ir.passes.PassResult(model, modified=bool(nodes))
