"""Per-pass differential check (`llmc build --check-passes`): which pass changed the numbers, and by how much.

Why: a final "mismatch vs PyTorch" says nothing about where the error came from. Running the graph
before and after every pass on the same inputs (onnxruntime) gives each pass its own error, so a
failing build can name the first pass that moved the logits beyond what that kind of pass may.

Only `logits` of one prefill with an empty cache is compared: passes change the graph's I/O
(kv-cache-scatter replaces the Concat-grown cache + attention_mask by fixed-capacity buffers,
cast-fp16 changes dtypes), so each graph is fed the inputs it declares: past length 0 for a
Concat-form graph, zeroed buffers of its capacity for a scatter-form one, each cast to its dtype.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from passes import pass_class
from passes.base import EXACT

from compiler.graph_io import io_from_model
from compiler.runtime.executor import block_tables_for, cache_shape
from compiler.graph_io import BLOCK_TABLES, LOGITS_AT

BATCH, TOKENS = 2, 12
_PROTO_LIMIT = 1 << 30  # serialize in memory below this many weight bytes


def tolerance_for(name: str) -> tuple[float, float]:
    """The pass's own check_tolerance (passes/base.py); unknown passes are held to the exact-rewrite default."""
    return pass_class(name).check_tolerance


@dataclasses.dataclass
class PassCheck:
    """One pass's numerics: vs the graph before it (`max_abs`...) and vs the export (`total_max_abs`)."""

    max_abs: float | None = None
    mean_abs: float | None = None
    agreement: float | None = None
    total_max_abs: float | None = None
    tolerance_max_abs: float = EXACT[0]
    min_agreement: float = EXACT[1]
    within: bool | None = None  # None: not measured (skipped)
    skipped: str = ""

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _session(model: ir.Model):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC  # see runtime_onnx.py: no fusions
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes < _PROTO_LIMIT:
        return ort.InferenceSession(ir.to_proto(model).SerializeToString(), opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="llmc-check-") as tmp:  # protobuf's 2 GiB cap: weights beside it
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")  # leaves the in-memory model unchanged
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
          "tensor(int32)": np.int32, "tensor(bool)": np.bool_}


def prefill_logits(model: ir.Model, input_ids: np.ndarray) -> np.ndarray:
    """`logits` (float32) of one prefill with an empty cache, fed in the form this graph declares."""
    io = io_from_model(model)
    session = _session(model)
    batch, tokens = input_ids.shape
    empty = cache_shape(io, batch) if io.capacity is not None else (batch, io.num_kv_heads, 0, io.head_dim)
    values = {"input_ids": input_ids, "position_ids": np.tile(np.arange(tokens, dtype=np.int64), (batch, 1)),
              "attention_mask": np.ones((batch, tokens), np.int64), **{n: np.zeros(empty) for n in io.past_names}}
    values[LOGITS_AT] = values["position_ids"]  # after last-position-logits: every position's logits
    if io.paged:  # the pool and its block tables (the executor's default, shuffled layout)
        values[BLOCK_TABLES] = block_tables_for(io, batch)
    feeds = {}
    for inp in session.get_inputs():
        if inp.name not in values:
            raise ValueError(f"graph input {inp.name!r} is not part of llmc's I/O contract")
        if inp.type not in _TYPES:
            raise ValueError(f"graph input {inp.name!r} has type {inp.type} that numpy cannot feed")
        feeds[inp.name] = np.ascontiguousarray(values[inp.name], dtype=_TYPES[inp.type])
    return session.run(["logits"], feeds)[0].astype(np.float32)


def compare(before: np.ndarray, after: np.ndarray) -> tuple[float, float, float]:
    """(max |diff|, mean |diff|, greedy agreement) of two logits arrays [batch, seq, vocab]."""
    diff = np.abs(before.astype(np.float64) - after.astype(np.float64))
    return float(diff.max()), float(diff.mean()), float((before.argmax(-1) == after.argmax(-1)).mean())


class PassChecker:
    """Keeps the last graph's logits; `after(name, model)` measures the pass that just ran."""

    def __init__(self, model: ir.Model, seed: int = 0):
        io = io_from_model(model)
        tokens = TOKENS if io.capacity is None else min(TOKENS, io.capacity)
        self.input_ids = np.random.default_rng(seed).integers(0, io.vocab_size, (BATCH, tokens)).astype(np.int64)
        self.skip_reason = ""
        self.reference = self.previous = self._logits(model)

    def _logits(self, model: ir.Model) -> np.ndarray | None:
        if self.skip_reason:
            return None
        try:
            return prefill_logits(model, self.input_ids)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types; the reason is recorded
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            self.skip_reason = f"onnxruntime cannot run this graph: {first[:200]}"
            return None

    def after(self, name: str, model: ir.Model) -> PassCheck:
        tol_max, tol_agree = tolerance_for(name)
        logits = self._logits(model)
        if logits is None or self.previous is None:
            self.previous = logits
            return PassCheck(tolerance_max_abs=tol_max, min_agreement=tol_agree, skipped=self.skip_reason)
        max_abs, mean_abs, agreement = compare(self.previous, logits)
        total = compare(self.reference, logits)[0] if self.reference is not None else None
        self.previous = logits
        within = bool(max_abs <= tol_max and agreement >= tol_agree)
        return PassCheck(max_abs, mean_abs, agreement, total, tol_max, tol_agree, within)


def first_divergent(records) -> tuple[int, object] | None:
    """The bisect over recorded checks: (index, record) of the first pass beyond its tolerance, or None."""
    for index, record in enumerate(records):
        check = getattr(record, "check", None) or {}
        if check.get("within") is False:
            return index, record
    return None


def describe_divergence(records) -> str:
    """One clause for an accuracy error: which pass diverged first, or that none did."""
    checked = [r for r in records if getattr(r, "check", None)]
    if not checked:
        return ""
    found = first_divergent(records)
    if found is None:
        return ("per-pass check: every pass stayed within its tolerance, so the difference is between PyTorch "
                "and the exported graph (or beyond the one prefill the check runs)")
    index, record = found
    c = record.check
    return (f"per-pass check: first pass beyond its tolerance is '{record.name}' (pass #{index + 1} of the recipe): "
            f"max |logit diff| {c['max_abs']:.4g} (tolerance {c['tolerance_max_abs']:.4g}), greedy agreement "
            f"{c['agreement']:.1%} (min {c['min_agreement']:.0%}) vs the graph before it")
