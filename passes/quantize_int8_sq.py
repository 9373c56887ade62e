"""INT8 weights and activations with SmoothQuant smoothing (W8A8; Xiao et al. 2022).

Why: INT8 tensor-core GEMMs (every NVIDIA GPU since Turing) at twice the FP16 rate, where FP8 needs
Ada or later. INT8's 255 uniform levels make a per-tensor activation scale fragile: a few outlier
channels (LLM activations carry some 10-100x the rest) set amax and leave the other channels a handful
of levels. SmoothQuant divides each input channel by s = max|X|^alpha / max|W|^(1-alpha) (alpha 0.5,
the paper's default for most models) and multiplies the weight's row by it, folded into the preceding
RMSNorm / up_proj (activation_quant.py); the weights, quantized per output channel, absorb it.
Weights: symmetric per-output-channel INT8 (quantize_int8_wo.py); activations: per tensor, symmetric
(zero point 0, scale amax / 127) as TensorRT's INT8 Q/DQ requires.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .activation_quant import ActivationQuantPass
from .quant_coverage import DEFAULT_MIN_COVERAGE
from .quantize_int8_wo import INT8_MAX, quantize_per_channel_int8
from .weight_quant import DEFAULT_TARGETS, QuantizedWeight, Target

DEFAULT_ALPHA = 0.5


class QuantizeInt8SqPass(ActivationQuantPass):
    weight_format = "int8-sq"
    check_tolerance = (3.0, 0.5)
    q_dtype = ir.DataType.INT8
    act_dtype = ir.DataType.INT8
    act_max = float(INT8_MAX)
    act_zero = np.array(0, np.int8)
    recipe_name = "quantize-int8-sq"

    def __init__(self, activations, smoothing_alpha: float | None = DEFAULT_ALPHA, targets=DEFAULT_TARGETS,
                 exclude=(), include_lm_head: bool = False, min_coverage: float = DEFAULT_MIN_COVERAGE):
        super().__init__(activations, smoothing_alpha, targets, exclude, include_lm_head, min_coverage)

    def quantize(self, weight_KN: np.ndarray, target: Target) -> QuantizedWeight:
        return quantize_per_channel_int8(weight_KN)
