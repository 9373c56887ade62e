"""Graph initializers that view a model parameter instead of copying it.

Why: an exported graph's weights are the model's weights. Stamped layers (compiler/frontend/stamp.py) and a
half-stored embedding (compiler/frontend/export.py) become initializers that hold the parameter itself, not
a second copy: a reader gets the values in the graph's dtype (widened from BF16/FP16, transposed)
one transient copy per read. A pass that lowers precision anyway (passes/cast_fp16.py) reads
`torch_source()` instead and converts BF16 -> FP16 directly, so the FP32 copy never exists: for a
1B model's 128256 x 2048 embedding that copy is 1.05 GB, the largest term of the export's peak.
Once the model is dropped (after the export), a view may be the only holder of its parameter's
memory: `owned_source()` then hands that memory over to be overwritten (BF16 -> FP16 in place), so
not even a second half-precision copy exists (0.53 GB for that embedding, llmc's own peak at 1B).
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
        holder = [view]  # a list, not self: a closure over self would make every view a gc cycle,
        # and a replaced view's parameter would then outlive it until the next collection
        super().__init__(lambda: TorchTensor(_live(holder, name).to(target).contiguous(), name=name), dtype=dtype,
                         shape=ir.Shape(view.shape), name=name)
        self._holder = holder

    def torch_source(self) -> torch.Tensor:
        """The same values in the parameter's own dtype, as a (possibly strided) view: read, never write."""
        return _live(self._holder, self.name)

    def owned_source(self) -> torch.Tensor | None:
        """The parameter itself, for the caller to overwrite, if nothing else can see its memory.

        That is: no other tensor shares its storage (the model that held it is gone), the view is
        the whole storage untransposed and contiguous, and its dtype differs from the graph's, so no
        read of this view ever returned an alias of it (`.to()` copies). From then on this view is
        spent: a read raises instead of returning overwritten bytes. None (and nothing changes) otherwise."""
        view = _live(self._holder, self.name)
        if (view.dtype == TORCH_DTYPES.get(self.dtype) or not view.is_contiguous() or view.storage_offset() != 0
                or view.untyped_storage().nbytes() != view.numel() * view.element_size() or not sole_holder(view)):
            return None
        self._holder[0] = None
        return view


def _live(holder: list, name: str) -> torch.Tensor:
    if holder[0] is None:
        raise RuntimeError(f"{name}: read after its memory was handed over (owned_source) and overwritten")
    return holder[0]


def _storage_holders(tensor: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata)


def sole_holder(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is the only tensor over its storage (counted like a fresh tensor's, since asking
    adds a reference of its own). False where this torch cannot tell."""
    if not hasattr(torch._C, "_storage_Use_Count"):
        return False
    return _storage_holders(tensor) == _storage_holders(torch.empty(1))


def torch_dtype(value: ir.Value) -> torch.dtype | None:
    """The torch dtype of an ir value's element type (FP32 / FP16 / BF16: what an export holds)."""
    return TORCH_DTYPES.get(value.dtype)
