"""Shared machinery of the weight-and-activation (W8A8) passes: calibrated per-tensor activation
scales as explicit QuantizeLinear -> DequantizeLinear pairs, optional SmoothQuant smoothing.

Why explicit Q/DQ: TensorRT(-RTX) builds strongly typed networks only and has no implicit
(calibrator) quantization; a low-precision GEMM is chosen when both MatMul inputs come out of a
DequantizeLinear. So each targeted MatMul becomes

  x -> QuantizeLinear(scale_x, zero 0) -> DequantizeLinear(scale_x, zero 0) -> MatMul <- DequantizeLinear(q W, scale_W[N], axis=1)

with the weight per output channel (the weight-only passes' form, weight_quant.py) and the
activation per tensor: scale_x = amax / q_max, amax the largest |x| in that MatMul's calibration
sample (compiler/frontend/calibrate.py: an evenly strided sample of the calibration text's rows).
Values beyond amax saturate (E4M3 and INT8 QuantizeLinear both clamp), which is what the scale
buys: the full code range spent on what calibration saw. Both scales have the activation's dtype
(FP16 in the fp16 recipe): TensorRT's strongly typed MatMul needs both operands in one type, and
the Q/DQ scale type sets the DQ output type. The zero point is explicit: without it QuantizeLinear
means uint8 (TensorRT reads INT8), never FP8. MatMuls sharing one input (q/k/v, gate/up) share one
Q/DQ pair, since their sample, and so their scale, is the same.

Smoothing (SmoothQuant, Xiao et al. 2022): activation outliers sit in a few channels, which a
per-tensor scale spends its range on. Dividing input channel j by s_j = max|X_j|^a / max|W_j|^(1-a)
and multiplying weight row j by s_j is exact in real arithmetic and moves the difficulty to the
weights, which are quantized per output channel. The 1/s is folded into the op producing the
input exactly as AWQ folds its scales (QuantizeInt4AwqPass._fold_target): into the RMSNorm gamma
for q/k/v and gate/up, into up_proj's columns for down_proj; o_proj's input comes out of attention
and is not smoothed, nor is a group whose input also feeds a MatMul outside it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from .quant_coverage import DEFAULT_MIN_COVERAGE
from .quantize_int4_awq import QuantizeInt4AwqPass, _set_const
from .weight_quant import DEFAULT_TARGETS, Target, WeightQuantPass, calibrated_groups

_NUMPY = {ir.DataType.FLOAT16: np.float16, ir.DataType.FLOAT: np.float32}  # scale types = activation types


def smoothing_scales(amax_x_K: np.ndarray, amax_w_K: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel s = max|X|^alpha / max|W|^(1 - alpha) (clamped away from 0,
    as the reference implementation does: a dead channel gets s = 1e-5, not a division by zero)."""
    s = np.power(np.maximum(amax_x_K, 1e-5), alpha) / np.power(np.maximum(amax_w_K, 1e-5), 1.0 - alpha)
    return np.maximum(s, 1e-5).astype(np.float32)


def activation_scale(x_TK: np.ndarray, q_max: float) -> float:
    """Per-tensor scale: the sample's largest |x| maps to the format's largest value."""
    amax = float(np.abs(x_TK).max()) if x_TK.size else 0.0
    return amax / q_max if amax > 0 else 1.0


def insert_qdq(graph: ir.Graph, value: ir.Value, consumers: list[ir.Node], scale: float,
               q_dtype: ir.DataType, zero: np.ndarray, name: str) -> tuple[ir.Node, ir.Node]:
    """QuantizeLinear -> DequantizeLinear of `value` (per tensor, zero point 0), feeding input 0 of `consumers`."""
    dtype = _NUMPY.get(value.dtype)
    if dtype is None:
        raise ValueError(f"{name}: a {value.dtype} activation gets no Q/DQ scale here (FP16 or FP32 only); "
                         "run cast-fp16 before the pass")
    s_val = ir.Value(name=f"{name}.scale", const_value=ir.tensor(np.array(scale, dtype), name=f"{name}.scale"))
    s_val.type, s_val.shape = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype))), ir.Shape([])
    z_val = ir.Value(name=f"{name}.zero", const_value=ir.tensor(zero, dtype=q_dtype, name=f"{name}.zero"))
    z_val.type, z_val.shape = ir.TensorType(q_dtype), ir.Shape([])
    graph.register_initializer(s_val)
    graph.register_initializer(z_val)
    q = ir.node("QuantizeLinear", [value, s_val, z_val], name=f"{name}.quantize")
    q.outputs[0].name = f"{name}.quantized"
    q.outputs[0].type, q.outputs[0].shape = ir.TensorType(q_dtype), value.shape
    dq = ir.node("DequantizeLinear", [q.outputs[0], s_val, z_val], name=f"{name}.dequantize")
    dq.outputs[0].name = f"{name}.dequantized"
    dq.outputs[0].type, dq.outputs[0].shape = value.type, value.shape
    first = next(n for n in graph if any(n is c for c in consumers))
    graph.insert_before(first, [q, dq])
    for node in consumers:
        node.replace_input_with(0, dq.outputs[0])
    return q, dq


class ActivationQuantPass(WeightQuantPass):
    """Base: weights as the weight-only passes quantize them, plus a calibrated Q/DQ on each input."""

    needs_calibration = True
    act_dtype: ir.DataType  # QuantizeLinear's output type
    act_max: float  # the format's largest magnitude (E4M3: 448, INT8: 127)
    act_zero: np.ndarray  # a zero of that type, the explicit zero point

    @classmethod
    def from_context(cls, ctx, **options):
        return cls(ctx.activations, **options)

    def __init__(self, activations: Mapping[str, np.ndarray] | None, smoothing_alpha: float | None = None,
                 targets=DEFAULT_TARGETS, exclude=(), include_lm_head: bool = False,
                 min_coverage: float = DEFAULT_MIN_COVERAGE):
        super().__init__(targets, exclude, include_lm_head, min_coverage)
        alpha = smoothing_alpha
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
            raise ValueError(f"smoothing_alpha must be a number in [0, 1], or null for no smoothing (got {alpha!r})")
        self.activations, self.alpha = activations, alpha
        self.fallbacks: list[str] = []  # targets without a calibration sample: weight-only, input left float
        self.activation_scales: dict[str, float] = {}  # target -> its input's per-tensor scale
        self.smoothed: dict[str, np.ndarray] = {}  # target -> s, for the groups smoothing was folded into

    def requires(self, model: ir.Model) -> None:
        if self.activations is None:
            raise ValueError(f"{self.recipe_name} needs calibration activations (the driver runs the calibrate stage)")
        super().requires(model)

    def prepare(self, model: ir.Model, targets: list[Target]) -> None:
        groups, missing = calibrated_groups(targets, self.activations)
        self.fallbacks.extend(missing)
        for members, source in groups:
            shared = members[0].node.inputs[0]
            x = np.asarray(self.activations[source], np.float32)
            s = self._smooth(model, shared, members, x) if self.alpha is not None else None
            if s is not None:
                x = x / s
            scale = activation_scale(x, self.act_max)
            insert_qdq(model.graph, shared, [t.node for t in members], scale, self.act_dtype, self.act_zero,
                       f"{members[0].node.name}.input")
            for t in members:
                self.activation_scales[t.name] = scale

    def _smooth(self, model: ir.Model, shared: ir.Value, members: list[Target], x: np.ndarray) -> np.ndarray | None:
        """Fold SmoothQuant's s into the group's producer and weights; None where nothing can absorb 1/s."""
        others = {id(node) for node, _ in shared.uses()} - {id(t.node) for t in members}
        fold = None if others else QuantizeInt4AwqPass._fold_target(shared, model)
        if fold is None:
            return None
        weights = [t.weight.const_value.numpy() for t in members]
        amax_w = np.max([np.abs(w.astype(np.float32)).max(axis=1) for w in weights], axis=0)
        s = smoothing_scales(np.abs(x).max(axis=0), amax_w, self.alpha)
        for t, w in zip(members, weights):
            _set_const(t.weight, (w.astype(np.float32) * s[:, None]).astype(w.dtype))
            self.smoothed[t.name] = s
        fold(s)
        return s
