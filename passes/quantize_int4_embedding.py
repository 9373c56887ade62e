"""INT4 embedding table, block-wise along the hidden axis, stored once for the Gather and a tied lm_head.

Why: with the decoder in INT4, an INT8 table (quantize-int8-embedding) is still the largest tensor of
a small model (Gemma 3 270M: 168 MB of 262144 x 640); INT4 halves it again. The table finding and
the rewrite are quantize-int8-embedding's (one DequantizeLinear that the Gather and lm_head's
Transpose -> MatMul both read); only the rounding differs:
`DequantizeLinear(int4 q[V, H], scale[V, H/block], axis=1, block_size=block)`. Blocks run along H,
the lm_head's reduction axis (its K), so each scale belongs to one token (one Gather row, one logit),
as int4-rtn's blocks run along a matmul's K. Rounding is int4-rtn's `quantize_blockwise` on E^T
(symmetric, FP16 scales rounded up by `exact_product_scale`); the block is `int4_block(H, block_size)`.

TensorRT-RTX 1.7 parses and builds this DequantizeLinear feeding both a Gather and a
Transpose -> MatMul (tests/test_pass_quantize_int4_embedding.py builds it). No shipped recipe uses it:
on Gemma 3 270M the INT4 table alone costs +11.8% perplexity at block 32 (+15.3% at 64, +25.6% at 128)
against INT8's +0.47% (benchmarks/NOTES.md), so the default block is 32, the least lossy.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .quantize_int4_rtn import check_block_size, int4_block, quantize_blockwise
from .quantize_int8_embedding import QuantizeInt8EmbeddingPass
from .weight_quant import QuantizedWeight


def quantize_rows_int4(table_VH: np.ndarray, block: int) -> QuantizedWeight:
    """Block-wise symmetric INT4 of each row of E [V, H]: q [V, H], scale [V, H/block], axis 1."""
    q, scale = quantize_blockwise(np.ascontiguousarray(table_VH.T), block)  # blocks along K = H of E^T
    return QuantizedWeight(np.ascontiguousarray(q.T), np.ascontiguousarray(scale.T), axis=1, block_size=block)


class QuantizeInt4EmbeddingPass(QuantizeInt8EmbeddingPass):
    weight_format = "int4-rtn"
    check_tolerance = (3.0, 0.5)
    recipe_name = "quantize-int4-embedding"
    q_dtype = ir.DataType.INT4

    def __init__(self, block_size: int = 32):
        super().__init__()
        self.block = check_block_size(block_size)  # the largest block; a width may get a smaller one
        self.skipped: list[str] = []  # why a table stayed float

    def quantize_table(self, table_VH: np.ndarray) -> QuantizedWeight | None:
        block, why = int4_block(table_VH.shape[1], self.block)
        if block is None:
            self.skipped.append(f"embedding table [{table_VH.shape[0]}, {table_VH.shape[1]}]: {why}")
            return None
        return quantize_rows_int4(table_VH, block)
