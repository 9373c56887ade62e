"""INT4 weight-only quantization with activation-aware scaling (AWQ, Lin et al. 2023) and clipping search.

Why: a few input channels carry large activations; RTN spends the same 4 bits on them as on the
rest. AWQ scales those weight rows up by s (so they keep more precision) and the activations down
by 1/s, which is exact in real arithmetic. The 1/s is folded into the op that produces the
activation, so the graph gains no node:

  RMSNormalization(x, gamma)  -> gamma / s        (q/k/v after input_layernorm, gate/up after post_attention_layernorm)
  Mul(act(gate), up @ W_up)   -> W_up[:, c] / s_c (down_proj: its input is a product with up_proj's output)

Other producers (o_proj's input comes out of attention) keep s = 1, and so does a group whose input
also feeds a MatMul outside the group (a sibling kept FP16 or quantized by another pass in a
mixed-precision recipe): folding would scale that sibling's input too. Per group of MatMuls sharing one
input, s = mean|x|^alpha (normalized) with alpha searched on a grid to minimise
|| X W - (X / s) Q(diag(s) W) ||^2 over calibration activations X; then (optionally) each
(block, output channel) range is shrunk by the clip ratio that minimises the same output error.
Quantization itself is the RTN of quantize_int4_rtn.py: symmetric, block-wise, FP16 scales, the
block chosen per matmul by K (`int4_block`); a group shares its input, so K and the block.

Calibration activations come from the PyTorch model (compiler/frontend/calibrate.py), keyed by Hugging Face
module name; a target without activations falls back to RTN (reported in `self.fallbacks`).
"""

from __future__ import annotations

import collections
import hashlib
import warnings
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import torch

from .quant_coverage import DEFAULT_MIN_COVERAGE
from .quantize_int4_rtn import INT4_MAX, check_block_size, column_slices, int4_block, quantize_blockwise
from .weight_quant import DEFAULT_TARGETS, QuantizedWeight, Target, WeightQuantPass, calibrated_groups

ALPHA_GRID = tuple(i / 20 for i in range(21))
CLIP_GRID = tuple(1.0 - i * 0.05 for i in range(8))  # 1.0 .. 0.65
SEARCH_BUDGET, MIN_SEARCH_ROWS = 1 << 30, 128  # rows x K x N per search (search_rows)
SCALE_SEARCH_ELEMENTS = 1 << 23  # K x N of the weight the alpha grid is scored on (search_columns)
BIG_WEIGHT = 1 << 22  # elements from which a search runs on every thread (see QuantizeInt4AwqPass.call)
COARSE_STRIDE = 4  # groups of BIG_WEIGHT+ elements score ALPHA_GRID coarse to fine (search_scales)
CHUNK_ELEMENTS = 1 << 20  # K x columns a search step works on (column_chunks)


def _fake_quant(w_KN: torch.Tensor, block: int, clip: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize in float32 (torch), same arithmetic as quantize_blockwise."""
    k, n = w_KN.shape
    blocks = w_KN.reshape(k // block, block, n)
    scale = blocks.abs().amax(dim=1, keepdim=True) / INT4_MAX
    if clip is not None:
        scale = scale * clip[:, None, :]
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    return (torch.clamp(torch.round(blocks / scale), -8, INT4_MAX) * scale).reshape(k, n)


def column_chunks(k: int, n: int) -> list[slice]:
    """Output-column slices of K x (at most) CHUNK_ELEMENTS each, for the searches to work through.

    Why: each search step makes ~10 temporaries the size of the weight. For a 1B model's 2048 x 8192
    projection those are 64 MB each: malloc maps every one fresh and the first touch of each page
    faults, which can cost more than the arithmetic (benchmarks/NOTES.md: a fresh 64 MB fill ~40x a
    reused one). 4 MB steps reuse heap memory that stays in cache.
    Both searches are exact per column (blocks run along K), so chunking changes no result beyond
    float summation order. Weights up to CHUNK_ELEMENTS (every small model's) are one chunk.
    """
    return column_slices(k, n, CHUNK_ELEMENTS)


def search_scales(x_TK: torch.Tensor, w_KN: torch.Tensor, block: int,
                  duo: bool = False) -> tuple[torch.Tensor, float, float, float]:
    """Best per-input-channel scale s over ALPHA_GRID: returns (s, alpha, loss(alpha=0), best loss).

    duo: AutoAWQ's "duo scaling", s = mean|x|^alpha / mean|w / block max|^(1 - alpha) (alpha = 0 stays
    s = 1). Not used by the pass: on Gemma 3 270M it screened 3.5 points worse than mean|x|^alpha at block
    128, 2.2 worse at block 32 without the clip search and 0.6 better with it (benchmarks/gptq_sweep.py
    awq-duo-*, NOTES.md); kept for that screen."""
    chunks = column_chunks(*w_KN.shape)
    w_chunks = [w_KN[:, c].contiguous() for c in chunks] if len(chunks) > 1 else [w_KN]
    references = [x_TK @ w for w in w_chunks]
    count = x_TK.shape[0] * w_KN.shape[1]
    mean_abs = x_TK.abs().mean(dim=0).clamp(min=1e-8)
    scores: dict[float, tuple[float, torch.Tensor]] = {}
    if duo:
        k, n = w_KN.shape
        wb = w_KN.abs().reshape(k // block, block, n)
        w_mean = (wb / (wb.amax(dim=1, keepdim=True) + 1e-6)).reshape(k, n).mean(dim=1)

    def score(alpha: float) -> None:
        if alpha in scores:
            return
        s = mean_abs.pow(alpha) / (w_mean.pow(1 - alpha) + 1e-4) if duo and alpha > 0 else mean_abs.pow(alpha)
        s = (s / (s.max() * s.min()).sqrt()).clamp(min=1e-4)
        x_scaled = x_TK / s
        scores[alpha] = (sum(float((x_scaled @ _fake_quant(w * s[:, None], block) - ref).pow(2).sum())
                             for w, ref in zip(w_chunks, references)) / count, s)

    if w_KN.numel() < BIG_WEIGHT:
        for alpha in ALPHA_GRID:
            score(alpha)
    else:  # coarse to fine: every 4th grid point, then the 3 either side of the best (at most 12 of 21 evaluations)
        for alpha in ALPHA_GRID[::COARSE_STRIDE]:
            score(alpha)
        i = ALPHA_GRID.index(min(scores, key=lambda a: scores[a][0]))
        for j in range(max(0, i - COARSE_STRIDE + 1), min(len(ALPHA_GRID), i + COARSE_STRIDE)):
            score(ALPHA_GRID[j])
    alpha = min(sorted(scores), key=lambda a: scores[a][0])  # ties: the smaller alpha, as the full grid's first-best
    return scores[alpha][1], alpha, scores[0.0][0], scores[alpha][0]


def search_clip(x_TK: torch.Tensor, w_KN: torch.Tensor, block: int) -> torch.Tensor:
    """Per (block, output channel) clip ratio over CLIP_GRID minimising that block's output error."""
    k, n = w_KN.shape
    nb = k // block
    xb = x_TK.reshape(-1, nb, block).transpose(0, 1).contiguous()  # [nb, T, block]
    best_ratio = torch.ones(nb, n)
    for c in column_chunks(k, n):
        wb = w_KN[:, c].reshape(nb, block, -1)
        best_err = torch.full(wb.shape[::2], float("inf"))
        base_scale = wb.abs().amax(dim=1) / INT4_MAX  # [nb, columns]
        for ratio in CLIP_GRID:
            scale = torch.where(base_scale == 0, torch.ones_like(base_scale), base_scale * ratio)[:, None, :]
            dq = torch.clamp(torch.round(wb / scale), -8, INT4_MAX) * scale
            err = torch.bmm(xb, dq - wb).pow(2).sum(dim=1)  # [nb, columns]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio[:, c] = torch.where(better, torch.full_like(err, ratio), best_ratio[:, c])
    return best_ratio


def search_rows(x_TK: torch.Tensor, w_KN: torch.Tensor) -> torch.Tensor:
    """An evenly strided subset of x's rows, so that rows x K x N stays within SEARCH_BUDGET.

    A search costs ~ rows x K x N x grid points. On a 1B model (2 cores) the full 1024 rows made
    the scale search alone ~70 minutes; capped, a 2048 x 16384 group searches on 128 rows. Small
    models (every weight under SEARCH_BUDGET / 1024 elements) keep all their rows.
    """
    rows = max(MIN_SEARCH_ROWS, SEARCH_BUDGET // max(1, w_KN.shape[0] * w_KN.shape[1]))
    if x_TK.shape[0] <= rows:
        return x_TK
    return x_TK[:: x_TK.shape[0] // rows][:rows].contiguous()


def search_columns(w_KN: torch.Tensor) -> torch.Tensor:
    """An evenly strided subset of w's output columns, K x N within SCALE_SEARCH_ELEMENTS, for the alpha search.

    s is per *input* channel and alpha one number per group: the output error averaged over a
    strided quarter of a 2048 x 16384 gate/up group ranks the 21 grid points as the whole does, at a
    quarter of the fake-quantization work (on a 1B model, 21 x 33M-element quantize-dequantize per
    group was the AWQ pass's hot spot). Weights up to 8M elements (every small model's) keep all columns.
    """
    k, n = w_KN.shape
    step = _column_step(k, n)
    return w_KN if step == 1 else w_KN[:, ::step].contiguous()


def _column_step(k: int, n: int) -> int:
    columns = max(1, SCALE_SEARCH_ELEMENTS // max(1, k))
    return 1 if n <= columns else -(-n // columns)


def group_search_weight(weights: list[np.ndarray]) -> torch.Tensor:
    """`search_columns` of the members' weights side by side, in float32, made from each member's
    own columns: the FP32 concatenation of a 1B gate/up group (134 MB, plus each member's FP32 copy
    on the way) is never built, only the strided quarter the search scores."""
    k, n = weights[0].shape[0], sum(w.shape[1] for w in weights)
    step, offset, parts = _column_step(k, n), 0, []
    for w in weights:
        parts.append(_f32(w[:, (-offset) % step::step]))
        offset += w.shape[1]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _f32(array: np.ndarray) -> torch.Tensor:
    """A float32 copy of a (possibly strided, read-only) FP16/FP32 array, converted by torch (F16C)."""
    with warnings.catch_warnings():  # torch only reads the array here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(torch.float32, copy=True).contiguous()


class QuantizeInt4AwqPass(WeightQuantPass):
    weight_format = "int4-awq"
    check_tolerance = (3.0, 0.5)
    needs_calibration = True

    @classmethod
    def from_context(cls, ctx, **options):
        return cls(ctx.activations, **options)
    q_dtype = ir.DataType.INT4
    recipe_name = "quantize-int4-awq"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # On small models the searches are thousands of small tensor ops: one thread avoids OpenMP
        # barrier stalls (measured on 2 shared cores: 161 s with torch's default threads vs 15 s with
        # one). Weights of 4M+ elements (a 1B model's projections) are GEMM-bound: they get every thread.
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return super().call(model)
        finally:
            torch.set_num_threads(self._threads)

    def _search(self, fn, x: torch.Tensor, w: torch.Tensor, block: int):
        x = search_rows(x, w)
        torch.set_num_threads(self._threads if w.numel() >= BIG_WEIGHT else 1)
        try:
            return _memoized(fn, x, w, block)
        finally:
            torch.set_num_threads(1)

    def __init__(self, activations: Mapping[str, np.ndarray] | None, block_size: int = 128, clip: bool = True,
                 targets=DEFAULT_TARGETS, exclude=(), include_lm_head: bool = False,
                 min_coverage: float = DEFAULT_MIN_COVERAGE):
        super().__init__(targets, exclude, include_lm_head, min_coverage)
        self.block = check_block_size(block_size)  # the largest block; a matmul may get a smaller one
        self.activations = activations
        if clip not in (True, False):
            raise ValueError(f"clip must be true or false (got {clip!r})")
        self.clip = clip
        self._threads = torch.get_num_threads()
        self.fallbacks: list[str] = []
        self.search_log: dict[str, dict] = {}
        # target name -> (activation name, s or None): its calibration input is activations[name] / s.
        # Kept as a recipe, not a tensor: at 1B the scaled inputs were 1.3 GB held through the whole pass.
        self._inputs: dict[str, tuple[str, torch.Tensor | None]] = {}

    def requires(self, model: ir.Model) -> None:
        if self.activations is None:
            raise ValueError("quantize-int4-awq needs calibration activations (the driver runs the calibrate stage)")
        super().requires(model)

    def block_for(self, k: int) -> tuple[int | None, str | None]:
        return int4_block(k, self.block)

    # -- scale search and folding ------------------------------------------------------------------
    def prepare(self, model: ir.Model, targets: list[Target]) -> None:
        groups, missing = calibrated_groups(targets, self.activations)
        self.fallbacks.extend(missing)
        for members, source in groups:
            x = self._activation(source)
            # Folding 1/s into the producer changes its output for every consumer: only when all of
            # them are in this group (a sibling kept FP16 or quantized by another pass would be off by s).
            shared = members[0].node.inputs[0]
            others = {id(node) for node, _ in shared.uses()} - {id(t.node) for t in members}
            fold = None if others else self._fold_target(shared, model)
            if fold is None:  # nothing to absorb 1/s: quantize these as they are (clip search still applies)
                for t in members:
                    self._inputs[t.name] = (source, None)
                continue
            w_search = group_search_weight([t.weight.const_value.numpy() for t in members])
            s, alpha, loss0, loss = self._search(search_scales, x, w_search, members[0].block)
            del w_search
            for t in members:
                self.search_log[t.name] = {"alpha": alpha, "loss_rtn": loss0, "loss_awq": loss}
                w = t.weight.const_value.numpy()
                _set_const(t.weight, _f32(w).mul_(s[:, None]).numpy().astype(w.dtype))
                self._inputs[t.name] = (source, s)
            fold(s.numpy())

    @staticmethod
    def _fold_target(value: ir.Value, model: ir.Model):
        """A function that divides the producer of `value` by s per channel, or None if it can't."""
        producer = value.producer()
        if producer is None or len(value.uses()) == 0:
            return None
        if producer.op_type == "Cast" and producer.domain == "" and len(producer.inputs[0].uses()) == 1:
            # residual-fp32 (Gemma 3) leaves RMSNormalization(FP32) -> Cast(FP16) -> the group's MatMuls:
            # a cast commutes with a per-channel scale, so the norm still absorbs 1/s.
            return QuantizeInt4AwqPass._fold_target(producer.inputs[0], model)
        if producer.op_type == "RMSNormalization" and producer.domain == "":
            gamma = producer.inputs[1]
            if gamma is not None and gamma.is_initializer() and gamma.const_value is not None and len(gamma.uses()) == 1:
                def fold(s, gamma=gamma):
                    g = gamma.const_value.numpy()
                    _set_const(gamma, (g.astype(np.float32) / s).astype(g.dtype))
                return fold
        if producer.op_type == "Mul" and producer.domain == "":
            for operand in producer.inputs:
                mm = operand.producer() if operand is not None else None
                if mm is None or mm.op_type != "MatMul" or len(operand.uses()) != 1:
                    continue
                w = mm.inputs[1]
                if w is not None and w.is_initializer() and w.const_value is not None and len(w.uses()) == 1:
                    def fold(s, w=w):
                        arr = w.const_value.numpy()
                        _set_const(w, (arr.astype(np.float32) / s[None, :]).astype(arr.dtype))
                    return fold
        return None

    # -- quantization ---------------------------------------------------------------------------
    def _activation(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.activations[name], dtype=np.float32))

    def quantize(self, weight_KN: np.ndarray, target: Target) -> QuantizedWeight:
        clip = None
        if self.clip and target.name in self._inputs:
            source, s = self._inputs[target.name]
            x = self._activation(source) if s is None else self._activation(source) / s
            clip = self._search(search_clip, x, _f32(weight_KN), target.block).numpy()
        q, scale = quantize_blockwise(weight_KN, target.block, clip)
        return QuantizedWeight(q, scale, axis=0, block_size=target.block)


# The searches are pure functions of (activations, weights, block). The precision search
# (compiler/measure/precision_search.py) runs this pass on dozens of assignments of the same model whose
# groups mostly repeat; remembering results by content makes each repeat a hash instead of a search.
_MEMO: "collections.OrderedDict[tuple, object]" = collections.OrderedDict()
_MEMO_ENTRIES = 256


def _memoized(fn, x: torch.Tensor, w: torch.Tensor, block: int):
    key = (fn.__name__, block, tuple(x.shape), tuple(w.shape), _digest(x), _digest(w))
    if key in _MEMO:
        _MEMO.move_to_end(key)
        return _MEMO[key]
    result = fn(x, w, block)
    _MEMO[key] = result
    if len(_MEMO) > _MEMO_ENTRIES:
        _MEMO.popitem(last=False)
    return result


def _digest(t: torch.Tensor) -> bytes:
    return hashlib.blake2b(t.contiguous().numpy().reshape(-1).view(np.uint8), digest_size=16).digest()  # no bytes copy


def _set_const(value: ir.Value, array: np.ndarray) -> None:
    value.const_value = ir.tensor(array, name=value.name)
