"""Lower every FP32 tensor of the graph to FP16.

Why: TensorRT builds strongly typed networks, where the ONNX types *are* the engine's precision,
and its fused attention kernels exist only for FP16/BF16 ("not supported by a dedicated kernel"
in FP32). The model is exported in FP32 so that constant tables (rotary caches) are computed at
full precision first; this pass then converts weights, graph I/O, Cast targets and constants.
Values outside FP16's range (e.g. -3.4e38 mask fills) are clamped to +-65504 instead of
becoming inf, which would turn a fully masked row into NaN.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx_ir as ir
from .base import LlmcPass

F32, F16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
_F16_MAX = float(np.finfo(np.float16).max)


def _to_f16(tensor) -> ir.Tensor:
    """Round to FP16, then clamp: +-inf from overflow become +-65504, exactly as clamping first would.

    torch converts with F16C on every core; numpy's float16 cast is scalar and made this pass take
    two minutes on a 1B model. A tensor that views a BF16/FP16 model parameter (`torch_source()`,
    compiler/frontend/lazy_weights.py) converts from the parameter itself: BF16 widens to FP32 exactly, so
    the result is the same bits, without the FP32 copy in between (1 GB for a 1B model's embedding).
    A view that is the last holder of its parameter (`owned_source()`) is converted in its own memory.
    """
    import torch

    source = getattr(tensor, "torch_source", None)
    if source is not None and source().element_size() == 2:  # FP16's size: its own memory can hold the result
        owned = tensor.owned_source()
        if owned is not None:
            return ir.tensor(_f16_in_place(owned).numpy(), name=tensor.name)
    if source is not None:
        src = source()
    else:
        with warnings.catch_warnings():  # read-only arrays (memory-mapped weights) are only read here
            warnings.simplefilter("ignore", UserWarning)
            src = torch.as_tensor(np.asarray(tensor.numpy(), dtype=np.float32))
    arr = torch.empty(src.shape, dtype=torch.float16).copy_(src).clamp_(-_F16_MAX, _F16_MAX).numpy()
    return ir.tensor(arr, name=tensor.name)


_CHUNK = 1 << 20  # elements converted per step: a 2 MB temporary


def _f16_in_place(half):
    """A contiguous BF16/FP16 tensor's memory rewritten as FP16, chunk by chunk (each chunk is read
    into a temporary before it is written back); returns the FP16 tensor over the same memory.
    Same conversion and clamp as the copying path, so the same bits."""
    import torch

    flat = half.view(-1)
    out = flat.view(torch.float16)
    for start in range(0, flat.numel(), _CHUNK):
        part = flat[start:start + _CHUNK]
        out[start:start + _CHUNK] = torch.empty(part.shape, dtype=torch.float16).copy_(part).clamp_(-_F16_MAX, _F16_MAX)
    return out.view(half.shape)


class CastFp16Pass(LlmcPass):
    """FP32 -> FP16 for initializers, graph I/O, Cast/Constant/ConstantOfShape and every value."""

    check_tolerance = (0.1, 0.9)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph = model.graph
        # FP32-backed tensors first, views of a half parameter last: converting an FP32 tensor frees half
        # its bytes at once, converting a view at best as many as it makes, so this order peaks lower.
        for init in sorted(graph.initializers.values(), key=lambda v: hasattr(v.const_value, "torch_source")):
            if init.dtype == F32 and init.const_value is not None:
                init.const_value = _to_f16(init.const_value)
                init.dtype = F16
                modified = True
        for node in ir.traversal.RecursiveGraphIterator(graph):
            if node.op_type == "Cast" and node.attributes["to"].as_int() == F32:
                node.attributes["to"] = ir.AttrInt64("to", F16)
                modified = True
            elif node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
                tensor = node.attributes["value"].as_tensor()
                if tensor.dtype == F32:
                    node.attributes["value"] = ir.AttrTensor("value", _to_f16(tensor))
                    modified = True
            elif node.op_type == "Constant" and ("value_float" in node.attributes or "value_floats" in node.attributes):
                key = "value_float" if "value_float" in node.attributes else "value_floats"
                data = np.asarray(node.attributes.pop(key).value, dtype=np.float32)
                node.attributes["value"] = ir.AttrTensor("value", _to_f16(ir.tensor(data)))
                modified = True
            for value in node.outputs:
                if value.dtype == F32:
                    value.dtype = F16
                    modified = True
        for value in graph.inputs:
            if value.dtype == F32:
                value.dtype = F16
                modified = True
        return ir.passes.PassResult(model, modified=modified)

    def ensures(self, model: ir.Model) -> None:
        leftovers = [v.name for v in (*model.graph.inputs, *model.graph.initializers.values()) if v.dtype == F32]
        leftovers += [v.name for n in model.graph for v in n.outputs if v.dtype == F32]
        if leftovers:
            raise ir.passes.PostconditionError(f"FP32 tensors remain after cast-fp16: {leftovers[:5]}")
