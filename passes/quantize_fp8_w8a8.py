"""FP8 (E4M3) weights and activations (W8A8): FP8 GEMMs instead of weight-only dequantize + FP16 GEMM.

Why: on GPUs with FP8 tensor cores (Ada, Hopper, Blackwell) a GEMM whose two operands are FP8 runs
at twice the FP16 rate, and prefill is GEMM-bound; weight-only FP8 (quantize_fp8_wo.py) halves the
weight bytes but still multiplies in FP16. Weights are per output channel as in fp8-wo
(quantize_per_channel_fp8); each MatMul's input gets a calibrated per-tensor scale as an explicit
Q/DQ pair (activation_quant.py says why explicit, which scale, and what saturates). E4M3's 3
mantissa bits keep relative precision uniform, so a per-tensor activation scale loses little
below amax; smoothing (SmoothQuant) is off by default and a recipe option.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from .activation_quant import ActivationQuantPass
from .quantize_fp8_wo import E4M3_MAX, quantize_per_channel_fp8
from .weight_quant import QuantizedWeight, Target


class QuantizeFp8Pass(ActivationQuantPass):
    weight_format = "fp8-w8a8"
    check_tolerance = (2.0, 0.6)
    q_dtype = ir.DataType.FLOAT8E4M3FN
    act_dtype = ir.DataType.FLOAT8E4M3FN
    act_max = E4M3_MAX
    act_zero = np.array(0, ml_dtypes.float8_e4m3fn)
    recipe_name = "quantize-fp8"

    def quantize(self, weight_KN: np.ndarray, target: Target) -> QuantizedWeight:
        return quantize_per_channel_fp8(weight_KN)
