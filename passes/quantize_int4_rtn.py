"""INT4 weight-only quantization by round-to-nearest, block-wise along the input dimension.

Why: decode is bound by reading weights; 4-bit weights read 4x fewer bytes than FP16. TensorRT
maps `DequantizeLinear(int4 W[K, N], scale[K/block, N], axis=0, block_size)` feeding `MatMul` to
DEQUANTIZE + MATRIX_MULTIPLY and requires zero point 0, so the quantization is symmetric:
scale = max|W_block| / 7, q = clip(round(W / scale), -8, 7). Run after cast-fp16 so that scales
and the dequantized weight are FP16. Target selection: passes/weight_quant.py.

FP16 scales are rounded *up* to 8 significant bits (`exact_product_scale`), so every q * scale is
exact in FP16: the DequantizeLinear's output is the exact product, whoever computes it. That is what
lets the CPU executor run these MatMuls as onnxruntime's 4-bit `MatMulNBits` (compiler/runtime/ort_widen.py),
which dequantizes in FP32 without rounding to FP16, and still compute this graph's numbers. Rounding
up, never down, keeps max|W_block| / scale <= 7 (no extra clipping); the scale moves by < 2**-7.

The block is chosen per matmul (`int4_block`): the recipe's block_size if it divides K, else the
largest smaller power of two, down to 16, that does. A block must divide K: ONNX allows a short last
block (scale rows = ceil(K / block)) and onnxruntime computes it, but TensorRT-RTX 1.7's parser
asserts K % rows == 0 (TensorRT infers the block from the scale's shape, K / rows), so K = 576 at
block 128 (5 rows) is rejected, and K = 100 at block 32 (4 rows) builds, where that rule would make
blocks of 25, not ONNX's (benchmarks/dq_block_probe.py; no engine runs on this machine to see it).
Zero-padding K instead would need a Pad on the activation or a Slice after the DequantizeLinear,
outside the DQ -> MatMul form TensorRT fuses into a weight-only GEMM. 16 is MatMulNBits' smallest
block (the CPU executor's 4-bit kernel). Real widths (576, 960, 1536, 2880) are multiples of 64 or
32; a K no block of 16..128 divides is skipped with that reason (passes/quant_coverage.py).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from .quant_coverage import DEFAULT_MIN_COVERAGE
from .weight_quant import DEFAULT_TARGETS, QuantizedWeight, Target, WeightQuantPass

INT4_MAX = 7
BLOCK_SIZES = (32, 64, 128)  # what a recipe may ask for
MIN_BLOCK = 16  # the smallest a width may fall back to (MatMulNBits' minimum)
# |q| <= 8 has at most 3 significant bits; FP16 has 11: a scale of <= 8 makes every product exact.
_LOW_BITS = 7  # an FP16 bit pattern that is a multiple of 8: 8 significant bits (normal or subnormal)


def exact_product_scale(scale: np.ndarray) -> np.ndarray:
    """Positive FP16 scales rounded up to a bit pattern that is a multiple of 8, so that q * scale is
    exact in FP16 for every int4 q (for subnormal scales too: then the pattern is the multiple of 2**-24).
    Other dtypes are returned as they are (FP32 scales round the same way in every kernel)."""
    if scale.dtype != np.float16:
        return scale
    bits = scale.view(np.uint16)
    up = ((bits.astype(np.uint32) + _LOW_BITS) & ~np.uint32(_LOW_BITS)).astype(np.uint16).view(np.float16)
    return np.where(np.isfinite(up), up, (bits & ~np.uint16(_LOW_BITS)).view(np.float16))


QUANTIZE_CHUNK = 1 << 20  # weight elements (K x columns) quantized per step


def quantize_blockwise(weight_KN: np.ndarray, block: int, clip_KN: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric RTN: (int4 [K, N], scale [K/block, N] in the weight's float dtype).

    `clip_KN` ([K/block, N], in (0, 1]) shrinks each block's range (AWQ's clipping search).
    Blocks run along K, so output columns are independent: they go a chunk at a time, and the
    float32 temporaries are 4 MB instead of ~4 weight-sized arrays (250 MB at once for a 1B
    model's 2048 x 8192 projection; the same numbers either way).
    """
    k, n = weight_KN.shape
    q = np.empty((k, n), ml_dtypes.int4)
    scale = np.empty((k // block, n), weight_KN.dtype)
    for c in column_slices(k, n, QUANTIZE_CHUNK):
        q[:, c], scale[:, c] = _quantize_columns(weight_KN[:, c], block, None if clip_KN is None else clip_KN[:, c])
    return q, scale


def column_slices(k: int, n: int, elements: int) -> list[slice]:
    """Slices of a K x N weight's output columns, K x (at most) `elements` each (at least one column)."""
    step = max(1, elements // max(1, k))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _quantize_columns(weight_KN: np.ndarray, block: int, clip_KN: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    k, n = weight_KN.shape
    blocks = weight_KN.astype(np.float32).reshape(k // block, block, n)
    scale = np.abs(blocks).max(axis=1) / INT4_MAX
    if clip_KN is not None:
        scale = scale * clip_KN
    scale = exact_product_scale(np.where(scale == 0, 1.0, scale).astype(weight_KN.dtype))
    q = np.clip(np.rint(blocks / scale[:, None, :].astype(np.float32)), -8, INT4_MAX)
    return q.reshape(k, n).astype(ml_dtypes.int4), scale


def dequantize_blockwise(q_KN: np.ndarray, scale: np.ndarray, block: int) -> np.ndarray:
    return QuantizedWeight(q_KN, scale, 0, block).dequantize()


def check_block_size(block_size: int) -> int:
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES} (got {block_size})")
    return block_size


def int4_block(k: int, block_size: int) -> tuple[int | None, str | None]:
    """(block, None): the largest power of two <= block_size, and >= MIN_BLOCK, that divides K;
    (None, reason) when there is none."""
    block = block_size
    while block >= MIN_BLOCK:
        if k % block == 0:
            return block, None
        block //= 2
    return None, (f"K={k} is not a multiple of {MIN_BLOCK}, so no INT4 block of {MIN_BLOCK}..{block_size} divides it "
                  "(TensorRT-RTX needs the block to divide K)")


class QuantizeInt4RtnPass(WeightQuantPass):
    weight_format = "int4-rtn"
    check_tolerance = (3.0, 0.5)
    q_dtype = ir.DataType.INT4
    recipe_name = "quantize-int4-rtn"

    def __init__(self, block_size: int = 128, targets=DEFAULT_TARGETS, exclude=(), include_lm_head: bool = False,
                 min_coverage: float = DEFAULT_MIN_COVERAGE):
        super().__init__(targets, exclude, include_lm_head, min_coverage)
        self.block = check_block_size(block_size)  # the largest block; a matmul may get a smaller one

    def block_for(self, k: int) -> tuple[int | None, str | None]:
        return int4_block(k, self.block)

    def quantize(self, weight_KN: np.ndarray, target: Target) -> QuantizedWeight:
        q, scale = quantize_blockwise(weight_KN, target.block)
        return QuantizedWeight(q, scale, axis=0, block_size=target.block)
