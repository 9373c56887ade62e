"""INT8 weight-only quantization, one scale per output channel.

Why: half the bytes of FP16 at an error far below INT4's (255 levels per channel), the safe
fallback when INT4 costs too much accuracy. Emitted as `DequantizeLinear(int8 W[K, N], scale[N],
axis=1)` + MatMul; symmetric (zero point 0) as TensorRT's weight DQ requires.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .weight_quant import QuantizedWeight, Target, WeightQuantPass

INT8_MAX = 127


def quantize_per_channel_int8(weight_KN: np.ndarray) -> QuantizedWeight:
    w = weight_KN.astype(np.float32)
    scale = np.abs(w).max(axis=0) / INT8_MAX
    scale = np.where(scale == 0, 1.0, scale).astype(weight_KN.dtype)
    q = np.clip(np.rint(w / scale.astype(np.float32)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return QuantizedWeight(q, scale, axis=1)


class QuantizeInt8WoPass(WeightQuantPass):
    weight_format = "int8"
    check_tolerance = (1.0, 0.75)
    q_dtype = ir.DataType.INT8
    recipe_name = "quantize-int8-wo"

    def quantize(self, weight_KN: np.ndarray, target: Target) -> QuantizedWeight:
        return quantize_per_channel_int8(weight_KN)
