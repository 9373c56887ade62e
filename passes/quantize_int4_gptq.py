"""INT4 weight-only quantization by GPTQ (Frantar et al. 2022, arXiv 2210.17323): rounding with error feedback.

Why: RTN rounds every weight on its own, so the errors of one output channel's K weights add up in
X W^T wherever the inputs are correlated. GPTQ quantizes the input rows of W[K, N] one at a time and
moves each row's rounding error onto the rows not yet quantized, weighted by the inverse Hessian of
the layer's output error, H = 2 X^T X over calibration inputs X (Optimal Brain Surgeon, one row at a
time). The later rows then round the corrected weights, and ||X W - X Q||^2 drops below RTN's.

As in the paper: H is damped by `damp` x mean(diag H) on its diagonal (Cholesky needs it positive
definite; 1024 calibration rows give a rank-deficient H for K = 2048), the inverse is taken through
its upper Cholesky factor, and rows are processed in lazy blocks of LAZY_BLOCK (128) whose error
reaches the remaining rows in one GEMM. One layer's H at a time (K x K float64: 32 MB at K = 2048).

The output is the RTN / AWQ format (passes/quantize_int4_rtn.py): symmetric, `DequantizeLinear(int4
W[K, N], scale[K/block, N], axis=0, block_size)`, FP16 scales rounded up so each q * scale is exact,
the block chosen per matmul by K (`int4_block`). A block's scale is max|W| / 7 of the block's rows
*as error feedback has left them* when its first row is reached (GPTQ's groupwise variant).

`act_order` (the paper's "static groups" variant of descending-diag(H) order): rows are quantized in
order of decreasing H_kk, the most active inputs first while the most rows remain to absorb their
error. Block-wise DequantizeLinear needs a block to be K-contiguous rows of the graph's weight, so
the permutation is undone on the stored weight (no runtime gather, which TensorRT's DQ -> GEMM fusion
could not take) and the scales are fixed up front per original block from the unquantized weights:
a row's scale no longer follows the corrections it receives, the price of keeping the layout.

`clip: true` chooses each block's scale per output column over AWQ's clip grid (1.0 .. 0.65 of
max|w| / 7), minimising that block's rounding error weighted by diag(H) (the inputs' energy per row):
the reference GPTQ code's `mse` grid search, with H's weights. A smaller scale clips the block's
largest weight and rounds the rest more finely; error feedback then carries the clipped part too.

`awq: true` runs AWQ's scale search and folding first (passes/quantize_int4_awq.py), then GPTQ on
the scaled weights with the Hessian of the scaled inputs X / s: AWQ's scaling, GPTQ's rounding.

Results are remembered by content (weight, calibration input, options; `_MEMO`): the precision search
(compiler/measure/precision_search.py) runs this pass on many assignments of one model whose INT4
matmuls mostly repeat, and without it every probe of a real model re-ran minutes of GPTQ.

Calibration activations come from the PyTorch model (compiler/frontend/calibrate.py); a target without them
is quantized by RTN (reported in `self.fallbacks`). Inputs come from the FP model, not from the
already-quantized layers below (the paper's sequential variant), as AWQ's do.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping

import numpy as np
import torch

from .quant_coverage import DEFAULT_MIN_COVERAGE
from .quantize_int4_awq import BIG_WEIGHT, CLIP_GRID, QuantizeInt4AwqPass, _digest
from .quantize_int4_rtn import INT4_MAX, quantize_blockwise
from .weight_quant import DEFAULT_TARGETS, QuantizedWeight, Target

MEMO_BYTES = 512 << 20  # codes + scales remembered across runs of the pass (least recently used dropped)
_MEMO: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
LAZY_BLOCK = 128  # rows per lazy update (the paper's B); a multiple of every INT4 block, so no block straddles two
DAMP_RETRIES = 4  # a Cholesky that fails is retried with 10x the damping, this many times


def check_damp(damp) -> float:
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 < damp < 1:
        raise ValueError(f"damp must be a fraction of the Hessian's mean diagonal in (0, 1) (0.01 = 1%), got {damp!r}")
    return float(damp)


def hessian(x_TK: torch.Tensor) -> torch.Tensor:
    """2 X^T X / T in float64: the layer output error's Hessian, averaged over the calibration rows."""
    x = x_TK.to(torch.float64)
    return (2.0 / max(1, x.shape[0])) * (x.T @ x)


def inverse_hessian_factor(h_KK: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1, lambda = damp x mean(diag H) (raised 10x per
    failed factorisation); returns (factor in float32, the damp used). Dead inputs (H_kk = 0, never
    active in the sample) get H_kk = 1: their rows are rounded like RTN and pass no error on."""
    h = h_KK.clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    mean = float(diag.mean())
    for attempt in range(DAMP_RETRIES + 1):
        damped = h + (damp * mean) * torch.eye(h.shape[0], dtype=h.dtype)
        chol, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            factor, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return factor.to(torch.float32), damp
        if attempt < DAMP_RETRIES:
            damp *= 10
    raise ValueError(f"the calibration Hessian is not positive definite even with damp {damp:g}")


def _scales(w_bN: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    """RTN's scale of each column of one block ([rows, N] float32 -> [N] float32): max|w| / 7 in the
    weight's dtype, rounded up to an exact-product FP16 scale (quantize_blockwise's own rule)."""
    _, scale = quantize_blockwise(w_bN.numpy().astype(dtype), w_bN.shape[0])
    return torch.from_numpy(scale[0].astype(np.float32))


def _clipped_scales(w_bN: torch.Tensor, d_b: torch.Tensor, dtype: np.dtype) -> torch.Tensor:
    """Per column of one block, the scale over CLIP_GRID x RTN's that minimises the block's rounding
    error weighted by the inputs' energy, sum_k H_kk (w_k - q_k s)^2 (GPTQ's reference quantizer
    searches its grid on the plain squared error). [rows, N], [rows] -> [N] float32."""
    best_err, best = None, None
    for ratio in CLIP_GRID:
        s = _scales(w_bN * ratio, dtype)  # max|ratio w| / 7 = ratio x RTN's scale, rounded as RTN rounds
        err = (d_b[:, None] * (w_bN - torch.clamp(torch.round(w_bN / s), -8, INT4_MAX) * s) ** 2).sum(0)
        if best is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


def gptq(w_KN: np.ndarray, h_KK: torch.Tensor, block: int, damp: float = 0.01,
         act_order: bool = False, clip: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """GPTQ of one weight [K, N] (rows = input features) against Hessian H [K, K]: returns
    (q [K, N] int values in -8..7 as int8, scale [K/block, N] in w's dtype, the damp used).
    clip: each block's scale searched over CLIP_GRID (`_clipped_scales`) instead of max|w| / 7."""
    k, n = w_KN.shape
    w = torch.from_numpy(np.ascontiguousarray(w_KN, dtype=np.float32))
    energy = torch.diagonal(h_KK).to(torch.float32)
    block_scales = (lambda rows, at: _clipped_scales(rows, energy[at:at + len(rows)], w_KN.dtype)) if clip else (
        lambda rows, at: _scales(rows, w_KN.dtype))
    order = torch.argsort(torch.diagonal(h_KK), descending=True, stable=True) if act_order else torch.arange(k)
    if act_order:  # static groups: each original block's scale, fixed before any row moves
        fixed = torch.stack([block_scales(w[i:i + block], i) for i in range(0, k, block)])
        row_scale = fixed[torch.arange(k) // block][order]  # [K, N], in processing order
        w, h_KK = w[order], h_KK[order][:, order]
    hinv, damp = inverse_hessian_factor(h_KK, damp)
    q = torch.empty(k, n)
    scale = torch.empty(k // block, n)
    for i1 in range(0, k, LAZY_BLOCK):
        i2 = min(k, i1 + LAZY_BLOCK)
        w1, err1 = w[i1:i2].clone(), torch.empty(i2 - i1, n)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = i1 + i
            if act_order:
                s = row_scale[row]
            elif row % block == 0:  # the block's scale, from its rows as the corrections left them
                s = scale[row // block] = block_scales(w1[i:i + block], row)
            code = torch.clamp(torch.round(w1[i] / s), -8, INT4_MAX)
            q[row] = code
            err = (w1[i] - code * s) / h1[i, i]
            w1[i + 1:] -= h1[i, i + 1:, None] * err[None, :]  # OBS update of this lazy block's later rows
            err1[i] = err
        w[i2:] -= hinv[i1:i2, i2:].T @ err1  # ... and of every row after it, in one GEMM
    if act_order:
        q[order] = q.clone()
        scale = fixed
    return q.to(torch.int8).numpy(), scale.numpy().astype(w_KN.dtype), damp


def output_error(w_KN: np.ndarray, dq_KN: np.ndarray, h_KK: torch.Tensor) -> float:
    """||X W - X W_q||^2 / (T N) from H = 2 X^T X / T: tr(D^T H D) / (2 N), D = W - W_q."""
    d = torch.from_numpy(w_KN.astype(np.float64) - dq_KN.astype(np.float64))
    return float((d * (h_KK @ d)).sum()) / (2 * w_KN.shape[1])


class QuantizeInt4GptqPass(QuantizeInt4AwqPass):
    weight_format = "int4-gptq"
    check_tolerance = (3.0, 0.5)
    needs_calibration = True
    recipe_name = "quantize-int4-gptq"

    def __init__(self, activations: Mapping[str, np.ndarray] | None, block_size: int = 128, damp: float = 0.01,
                 act_order: bool = False, awq: bool = False, clip: bool = False, targets=DEFAULT_TARGETS,
                 exclude=(), include_lm_head: bool = False, min_coverage: float = DEFAULT_MIN_COVERAGE):
        # AWQ's own clip search stays off: GPTQ chooses the rounding (and, with clip, each block's scale).
        super().__init__(activations, block_size, clip=False, targets=targets, exclude=exclude,
                         include_lm_head=include_lm_head, min_coverage=min_coverage)
        self.damp = check_damp(damp)
        for option, value in (("act_order", act_order), ("awq", awq), ("clip", clip)):
            if not isinstance(value, bool):
                raise ValueError(f"{option} must be true or false (got {value!r})")
        self.act_order, self.awq, self.clip_scales = act_order, awq, clip
        # target name -> {"loss_rtn", "loss_gptq" (calibration output error per element), "damp"}
        self.gptq_log: dict[str, dict] = {}
        self._hessian: tuple[tuple, torch.Tensor] | None = None  # the last group's, shared by its members
        self._input_digests: dict[tuple, bytes] = {}

    def requires(self, model) -> None:
        if self.activations is None:
            raise ValueError("quantize-int4-gptq needs calibration activations (the driver runs the calibrate stage)")
        super().requires(model)

    def prepare(self, model, targets: list[Target]) -> None:
        if self.awq:  # AWQ's scale search and folding
            return super().prepare(model, targets)
        for t in targets:
            source = t.name if t.name in self.activations else None
            if source is None:
                self.fallbacks.append(t.name)
            else:
                self._inputs[t.name] = (source, None)

    def _group_hessian(self, name: str) -> torch.Tensor:
        source, s = self._inputs[name]
        key = (source, None if s is None else id(s))
        if self._hessian is None or self._hessian[0] != key:
            x = self._activation(source)
            self._hessian = (key, hessian(x if s is None else x / s))
        return self._hessian[1]

    def _input_digest(self, name: str) -> bytes:
        source, s = self._inputs[name]
        key = (source, None if s is None else id(s))
        if key not in self._input_digests:
            x = self._activation(source)
            self._input_digests[key] = _digest(x) + (b"" if s is None else _digest(s))
        return self._input_digests[key]

    def quantize(self, weight_KN: np.ndarray, target: Target) -> QuantizedWeight:
        if target.name not in self._inputs:
            rtn_q, rtn_scale = quantize_blockwise(weight_KN, target.block)
            return QuantizedWeight(rtn_q, rtn_scale, axis=0, block_size=target.block)
        key = (_digest(torch.from_numpy(np.ascontiguousarray(weight_KN))), self._input_digest(target.name),
               weight_KN.shape, str(weight_KN.dtype), target.block, self.damp, self.act_order, self.clip_scales)
        if key in _MEMO:
            _MEMO.move_to_end(key)
            qw, log = _MEMO[key]
            self.gptq_log[target.name] = dict(log)
            return QuantizedWeight(qw.q.copy(), qw.scale.copy(), qw.axis, qw.block_size)
        qw = self._gptq(weight_KN, target)
        _MEMO[key] = (QuantizedWeight(qw.q.copy(), qw.scale.copy(), qw.axis, qw.block_size), dict(self.gptq_log[target.name]))
        while sum(v[0].q.nbytes + v[0].scale.nbytes for v in _MEMO.values()) > MEMO_BYTES and len(_MEMO) > 1:
            _MEMO.popitem(last=False)
        return qw

    def _gptq(self, weight_KN: np.ndarray, target: Target) -> QuantizedWeight:
        rtn_q, rtn_scale = quantize_blockwise(weight_KN, target.block)
        h = self._group_hessian(target.name)
        torch.set_num_threads(self._threads if weight_KN.size >= BIG_WEIGHT else 1)
        try:
            q, scale, damp = gptq(weight_KN, h, target.block, self.damp, self.act_order, self.clip_scales)
        finally:
            torch.set_num_threads(1)
        import ml_dtypes

        qw = QuantizedWeight(q.astype(ml_dtypes.int4), scale, axis=0, block_size=target.block)
        rtn = QuantizedWeight(rtn_q, rtn_scale, axis=0, block_size=target.block)
        self.gptq_log[target.name] = {"loss_rtn": output_error(weight_KN, rtn.dequantize(), h),
                                      "loss_gptq": output_error(weight_KN, qw.dequantize(), h), "damp": damp}
        return qw
