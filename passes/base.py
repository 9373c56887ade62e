"""What every llmc pass declares about itself, so that no other module keeps a table of pass names.

The driver asks a recipe's pass classes whether the build must calibrate (AWQ reads activations),
whether the graph will need TensorRT plugin layers, which weight format a quantizer writes (the
report's precision map, the precision search) and how far the per-pass check (`--check-passes`)
may let the logits move.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# (max |logit diff| vs the graph before the pass, min greedy agreement with it). Exact rewrites
# (FP32 re-association at most) get 1e-3; lowering and quantization passes state their own.
EXACT = (1e-3, 1.0)


class LlmcPass(ir.passes.InPlacePass):
    needs_calibration: bool = False  # reads PassContext.activations (the calibrate stage must run)
    needs_plugins: bool = False  # writes custom-domain nodes: only a TensorRT with plugin layers builds them
    weight_format: str | None = None  # the weight format a quantizer writes ("int4-awq", "int8", ...)
    check_tolerance: tuple[float, float] = EXACT

    @classmethod
    def from_context(cls, ctx, **options) -> "LlmcPass":
        """The pass as a recipe names it: its options from the recipe, build facts from `ctx`."""
        return cls(**options)


def register_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A typed, shaped initializer holding `array` (shapes, axes, sizes a rewrite feeds its new nodes)."""
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.type, value.shape = ir.TensorType(ir.DataType.from_numpy(array.dtype)), ir.Shape(array.shape)
    graph.register_initializer(value)
    return value
