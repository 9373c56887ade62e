"""Graph initializers that view a model parameter instead of copying it.

Why: an exported graph's weights are the model's weights. Stamped layers (compiler/stamp.py) and a
half-stored embedding (compiler/export.py) become initializers that hold the parameter itself, not
a second copy: a reader gets the values in the graph's dtype (widened from BF16/FP16, transposed)
one transient copy per read. A pass that lowers precision anyway (passes/cast_fp16.py) reads
`torch_source()` instead and converts BF16 -> FP16 directly, so the FP32 copy never exists: for a
1B model's 128256 x 2048 embedding that copy is 1.05 GB, the largest term of the export's peak.
"""

from __future__ import annotations

import onnx_ir as ir
import torch

TORCH_DTYPES = {ir.DataType.FLOAT: torch.float32, ir.DataType.FLOAT16: torch.float16,
                ir.DataType.BFLOAT16: torch.bfloat16}


class ParameterView(ir.LazyTensor):
    """`tensor` (optionally transposed) as an initializer of element type `dtype`, computed on read."""

    def __init__(self, tensor: torch.Tensor, dtype: ir.DataType, name: str, transposed: bool = False):
        from torch.onnx._internal.exporter._core import TorchTensor

        view = tensor.detach().t() if transposed else tensor.detach()
        target = TORCH_DTYPES[dtype]
        super().__init__(lambda: TorchTensor(view.to(target).contiguous(), name=name), dtype=dtype,
                         shape=ir.Shape(view.shape), name=name)
        self._view = view

    def torch_source(self) -> torch.Tensor:
        """The same values in the parameter's own dtype, as a (possibly strided) view: read, never write."""
        return self._view


def torch_dtype(value: ir.Value) -> torch.dtype | None:
    """The torch dtype of an ir value's element type (FP32 / FP16 / BF16: what an export holds)."""
    return TORCH_DTYPES.get(value.dtype)
