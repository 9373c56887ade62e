"""FP8 (E4M3) weight-only quantization, one scale per output channel.

Why: same bytes as INT8, but a floating format: relative precision is uniform across magnitudes
(3 mantissa bits), which suits weights with outliers. scale = max|W[:, n]| / 448 maps each
channel's largest weight to E4M3's largest finite value. Emitted as
`DequantizeLinear(float8e4m3fn W[K, N], scale[N], axis=1)` + MatMul.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from .weight_quant import QuantizedWeight, Target, WeightQuantPass

E4M3_MAX = 448.0


def quantize_per_channel_fp8(weight_KN: np.ndarray) -> QuantizedWeight:
    w = weight_KN.astype(np.float32)
    scale = np.abs(w).max(axis=0) / E4M3_MAX
    scale = np.where(scale == 0, 1.0, scale).astype(weight_KN.dtype)
    q = np.clip(w / scale.astype(np.float32), -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
    return QuantizedWeight(q, scale, axis=1)


class QuantizeFp8WoPass(WeightQuantPass):
    weight_format = "fp8"
    check_tolerance = (2.0, 0.6)
    q_dtype = ir.DataType.FLOAT8E4M3FN
    recipe_name = "quantize-fp8-wo"

    def quantize(self, weight_KN: np.ndarray, target: Target) -> QuantizedWeight:
        return quantize_per_channel_fp8(weight_KN)
