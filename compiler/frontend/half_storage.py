"""Keep a half-precision checkpoint's big weights in their own dtype, and compute in FP32 anyway.

Why: the reference, the calibration and the export need the model's FP32 forward, but an FP32 copy
of a BF16 checkpoint is 2x its bytes: at 1B, 4.9 GB, the largest term of the build's peak. BF16 and
FP16 widen to FP32 exactly, so a Linear that widens its weight a block of rows at a time into a
reused FP32 buffer, and multiplies FP32 activations by it, computes the FP32 model's product with
the weights it was given; only the summation order of the GEMM may differ (FP32 rounding, ~1e-6
relative). An Embedding gathers its half rows and widens them (exact).

What: `store_half(model)` turns every nn.Linear / nn.Embedding whose weight is BF16 / FP16 into
`HalfStoredLinear` / `HalfStoredEmbedding` (same parameters, same state dict) and upcasts every other
floating tensor (norms, biases, rotary buffers: small). `restore_fp32(module)` turns a subtree back
into plain FP32 modules in place: the exporter traces those (compiler/frontend/export.py). `upcast_in_place`
is the all-FP32 alternative.

Why blocks of rows: a product reads half the bytes from half-stored weights, so it is faster than
from FP32 weights (a 1B decode-sized product ~1.4x), while widening the whole weight per call costs
several times the FP32 product (benchmarks/NOTES.md, memory at 1B).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import torch

BLOCK_BYTES = 2 << 20  # FP32 bytes of weight widened at a time: stays in cache for the product after it
HALF = (torch.bfloat16, torch.float16)


# Denormals: the blocked products run with them flushed to zero. Without the flush some prompts made
# a decode step ~3x slower (denormal arithmetic on x86; benchmarks/NOTES.md, memory at 1B). Only values
# below 1.2e-38 change, far under anything an FP16 engine represents (its subnormals end at 6e-8).
_BUFFER: list[torch.Tensor] = []  # one widening buffer for every HalfStoredLinear (a forward is serial)
_SCRATCH: list[torch.Tensor] = []  # one product buffer likewise


def _grown(holder: list, numel: int) -> torch.Tensor:
    if not holder or holder[0].numel() < numel:
        holder[:] = [torch.empty(numel, dtype=torch.float32)]
    return holder[0][:numel]


class HalfStoredLinear(torch.nn.Linear):
    """nn.Linear whose weight stays BF16/FP16; the product is FP32, a block of output rows at a time."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype not in HALF:
            return super().forward(x)
        rows = max(1, BLOCK_BYTES // (4 * w.shape[1]))
        buf = _grown(_BUFFER, min(rows, w.shape[0]) * w.shape[1]).view(-1, w.shape[1])
        x2 = x.float().reshape(-1, x.shape[-1])
        out = torch.empty((x2.shape[0], w.shape[0]), dtype=torch.float32)
        torch.set_flush_denormal(True)  # see 'Denormals' above
        try:
            for r in range(0, w.shape[0], rows):
                block = buf[: min(rows, w.shape[0] - r)]
                block.copy_(w[r:r + rows])
                product = _grown(_SCRATCH, x2.shape[0] * len(block)).view(x2.shape[0], len(block))
                torch.mm(x2, block.t(), out=product)
                out[:, r:r + len(block)] = product
        finally:
            torch.set_flush_denormal(False)
        out = out.view(*x.shape[:-1], w.shape[0])
        return out if self.bias is None else out + self.bias


class HalfStoredEmbedding(torch.nn.Embedding):
    """nn.Embedding whose weight stays BF16/FP16; the gathered rows come back in FP32 (exact)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = super().forward(ids)
        return out if out.dtype == torch.float32 else out.float()  # an FP32 stand-in traces as nn.Embedding


def upcast_in_place(model: torch.nn.Module, keep_half=lambda module, name: False) -> None:
    """Every floating parameter and buffer to FP32, one tensor at a time; where `keep_half(module,
    name)`, a copy in its own dtype instead. Tied parameters stay one Parameter.

    Loaded in a half dtype, the parameters are views of the memory-mapped shards; the mapping lives
    until the last view is gone, so each tensor's mapped pages are dropped once its copy exists
    (compiler/host/memory.py: drop_mapped_pages). Without that, at 1B, 1.6 GB of shard pages were resident
    beside the FP32 model at the end of the upcast (peak 6.59 GB instead of 5.22). Half weights are
    copied out of the mapping too: file pages can be paged out behind the build's back (kernels that run
    DAMON's proactive `pageout` do), and re-read from disk at every decode step; anonymous memory (no swap)
    cannot."""
    from compiler.host.memory import drop_mapped_pages, file_mappings, is_mapped

    spans = file_mappings(".safetensors")
    done: set[int] = set()
    for module in model.modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is None or not tensor.is_floating_point() or id(tensor) in done:
                    continue
                keep = tensor.dtype != torch.float32 and keep_half(module, name)
                if tensor.dtype == torch.float32 and not is_mapped(tensor.data_ptr(), 0, spans):
                    continue
                source = tensor.data
                copy = source.clone() if keep or source.dtype == torch.float32 else source.float()
                if isinstance(tensor, torch.nn.Parameter):
                    tensor.data = copy  # the same Parameter object: ties hold
                    done.add(id(tensor))
                else:
                    tensors[name] = copy
                drop_mapped_pages(source.data_ptr(), source.numel() * source.element_size(), spans)
                del source


def store_half(model: torch.nn.Module) -> int:
    """Convert in place (see the module docstring); returns the bytes kept in half precision."""
    kept: dict[int, int] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (isinstance(weight, torch.nn.Parameter) and weight.dtype in HALF):
            continue
        if type(module) is torch.nn.Linear:
            module.__class__ = HalfStoredLinear
        elif type(module) is torch.nn.Embedding:
            module.__class__ = HalfStoredEmbedding
        else:
            continue
        kept[id(weight)] = weight.numel() * weight.element_size()
    upcast_in_place(model, keep_half=lambda module, name: name == "weight" and isinstance(
        module, (HalfStoredLinear, HalfStoredEmbedding)))
    return sum(kept.values())


def restore_fp32(module: torch.nn.Module) -> None:
    """Every HalfStored* module under `module` whose weight is half back to a plain FP32 nn.Linear /
    nn.Embedding, in place (tied weights stay one Parameter; mapped shard pages dropped as in
    upcast_in_place). One whose weight is FP32 already (a stand-in, below) computes as the plain module."""
    for sub in module.modules():
        if getattr(sub, "weight", None) is None or sub.weight.dtype not in HALF:
            continue
        if isinstance(sub, HalfStoredLinear):
            sub.__class__ = torch.nn.Linear
        elif isinstance(sub, HalfStoredEmbedding):
            sub.__class__ = torch.nn.Embedding
    upcast_in_place(module)


@dataclasses.dataclass
class StandIn:
    parameter: torch.nn.Parameter  # the model's (tied: shared) Parameter, FP32 stand-in inside the block
    half: torch.Tensor  # its real values
    users: int  # modules holding the Parameter: the export's uses of the initializer (embedding, tied lm_head)


@contextlib.contextmanager
def fp32_stand_ins(module: torch.nn.Module) -> Iterator[dict[int, StandIn]]:
    """Within the block, every half-stored embedding under `module` has an FP32 weight of its shape
    that occupies no memory (never written, so never paged in); on exit the half weight is back.

    Why: the exporter traces FP32 modules but never reads an embedding's values (its Gather has
    dynamic indices; the Transpose of a tied lm_head has two consumers, which onnxscript's constant
    folding leaves alone), so the 1 GB FP32 copy of a 1B model's embedding only has to exist as a
    shape. Yields {stand-in data_ptr: StandIn}; compiler/frontend/export.py swaps the graph initializer over
    each stand-in for a view of the half weight, and checks that the exporter used it as expected.
    """
    stand_ins: dict[int, StandIn] = {}
    for sub in module.modules():
        weight = getattr(sub, "weight", None)
        if not isinstance(sub, HalfStoredEmbedding) or weight.dtype not in HALF:
            continue
        half = weight.data
        weight.data = torch.empty(half.shape, dtype=torch.float32)
        users = sum(1 for m in module.modules() if getattr(m, "weight", None) is weight)
        stand_ins[weight.data_ptr()] = StandIn(weight, half, users)
    try:
        yield stand_ins
    finally:
        for s in stand_ins.values():
            s.parameter.data = s.half


def is_half_stored(model: torch.nn.Module) -> bool:
    return any(isinstance(m, (HalfStoredLinear, HalfStoredEmbedding)) for m in model.modules())
