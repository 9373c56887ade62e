"""Shared machinery of the weight-only quantization passes: which MatMuls, and the DQ+MatMul rewrite.

Why one base: every format (INT4 block-wise RTN / AWQ, INT8 and FP8 per-channel) selects the same
MatMuls and emits the same form, `DequantizeLinear(q W[K, N], scale, axis, [block_size])` feeding
`MatMul`, which TensorRT maps to DEQUANTIZE + MATRIX_MULTIPLY (a weight-only GEMM; symmetric,
because TensorRT's weight DQ needs zero point 0). A format only supplies `quantize(W) -> QuantizedWeight`.

Which MatMuls: a constant 2-D [K, N] weight used once, whose Hugging Face module name (recovered
from the exporter's `pkg.torch.onnx.name_scopes` node metadata, e.g. `model.layers.3.mlp.down_proj`)
matches one of `targets` (fnmatch patterns; default `model.layers.*`: every linear layer of the
decoder blocks) and none of `exclude`. `lm_head` is kept unless `include_lm_head`; embeddings are
Gathers and never touched. A MatMul already fed by a DequantizeLinear is not a candidate, so passes
listed earlier in a recipe win: mixed precision per layer is "int8 for these, then int4 for the rest".
A targeted MatMul the format cannot take (a tied weight; for INT4, a width K no block divides) stays
float with its reason recorded, and too little coverage fails the pass (passes/quant_coverage.py).
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch

import numpy as np
import onnx_ir as ir

from .quant_coverage import DEFAULT_MIN_COVERAGE, Coverage, MatmulPlan, check_min_coverage
from .base import LlmcPass

DEFAULT_TARGETS = ("model.layers.*",)


@dataclasses.dataclass
class QuantizedWeight:
    q: np.ndarray  # int4 / int8 / float8 values, [K, N]
    scale: np.ndarray  # fp16: [K/block, N] (block-wise, axis 0; [V, H/block] on axis 1) or [N] (per output channel)
    axis: int
    block_size: int | None = None

    def dequantize(self) -> np.ndarray:
        s = self.scale.astype(np.float32)
        s = np.repeat(s, self.block_size, axis=self.axis) if self.block_size else s[None, :]
        return (self.q.astype(np.float32) * s).astype(self.scale.dtype)


def module_name(node: ir.Node) -> str | None:
    """The HF module that produced this node (`model.layers.0.self_attn.q_proj`), from export metadata."""
    scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
    if not scopes:
        return None
    try:
        names = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    if len(names) < 2:
        return None
    name = names[-2]  # the last scope is the op itself ('linear')
    return name.removeprefix("model.") if name.startswith("model.model.") or name == "model.lm_head" else name


def is_lm_head(node: ir.Node) -> bool:
    return any(o.name == "logits" for o in node.outputs) or module_name(node) == "lm_head"


@dataclasses.dataclass
class Target:
    """One targeted MatMul: the node, its HF module name, its float weight [K, N], and either the
    block the format chose for it or why it stays float."""

    node: ir.Node
    name: str
    weight: ir.Value
    skipped: str | None = None  # why the MatMul is targeted but cannot be quantized
    block: int | None = None  # the format's block along K for this weight (block-wise formats)


def matching_matmuls(model: ir.Model, targets=DEFAULT_TARGETS, exclude=(), include_lm_head: bool = False) -> list[Target]:
    """Every MatMul with a constant 2-D float weight whose module name is targeted; a weight shared
    with another node (tied) comes back with `skipped` set, since rewriting it would change the other."""
    out = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "":
            continue
        weight = node.inputs[1]
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            continue
        if weight.dtype not in (ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.BFLOAT16) or len(weight.shape) != 2:
            continue
        lm_head = is_lm_head(node)
        name = "lm_head" if lm_head else (module_name(node) or node.name)
        if lm_head:
            if not include_lm_head:
                continue
        elif not any(fnmatch.fnmatchcase(name, p) for p in targets):
            continue
        if any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        uses = len(weight.uses())
        out.append(Target(node, name, weight, None if uses == 1 else f"weight shared by {uses} nodes (tied)"))
    return out


def replace_weight(graph: ir.Graph, target: Target, qw: QuantizedWeight, dtype: ir.DataType) -> None:
    """W -> DequantizeLinear(q, scale) feeding the same MatMul input; the float initializer is dropped."""
    node, weight = target.node, target.weight
    dq = dequantize_linear(graph, weight, qw, dtype, f"{node.name}.dequantize")
    graph.insert_before(node, dq)
    node.replace_input_with(1, dq.outputs[0])
    graph.initializers.pop(weight.name)


def dequantize_linear(graph: ir.Graph, weight: ir.Value, qw: QuantizedWeight, dtype: ir.DataType, name: str) -> ir.Node:
    """A DequantizeLinear (not yet inserted) of q and scale initializers, registered in `graph` under
    `weight`'s name, whose output has `weight`'s type and shape."""
    q_val = ir.Value(name=f"{weight.name}.q", const_value=ir.tensor(qw.q, dtype=dtype, name=f"{weight.name}.q"))
    q_val.type, q_val.shape = ir.TensorType(dtype), ir.Shape(qw.q.shape)
    s_val = ir.Value(name=f"{weight.name}.scale", const_value=ir.tensor(qw.scale, name=f"{weight.name}.scale"))
    s_val.type, s_val.shape = ir.TensorType(ir.DataType.from_numpy(qw.scale.dtype)), ir.Shape(qw.scale.shape)
    graph.register_initializer(q_val)
    graph.register_initializer(s_val)
    attributes = {"axis": qw.axis}
    if qw.block_size:
        attributes["block_size"] = qw.block_size
    dq = ir.node("DequantizeLinear", [q_val, s_val], attributes=attributes, name=name)
    dq.outputs[0].name = f"{weight.name}.dequantized"
    dq.outputs[0].type, dq.outputs[0].shape = weight.type, weight.shape
    return dq


def calibrated_groups(targets: list[Target], activations) -> tuple[list[tuple[list[Target], str]], list[str]]:
    """Targets that read one input (q/k/v, gate/up) grouped, each group with the name its calibration
    sample is stored under (calibrate.py keeps one sample per input); and the names of the targets
    whose group has no sample. The calibrated passes (AWQ, W8A8) scale and measure per group, since
    whatever folds into the input's producer changes every reader of it."""
    groups: dict[int, list[Target]] = {}
    for t in targets:
        groups.setdefault(id(t.node.inputs[0]), []).append(t)
    found, missing = [], []
    for members in groups.values():
        source = next((t.name for t in members if t.name in activations), None)
        if source is None:
            missing.extend(t.name for t in members)
        else:
            found.append((members, source))
    return found, missing


class WeightQuantPass(LlmcPass):
    """Base: select targets, quantize each weight with `quantize`, rewrite to DQ + MatMul."""

    q_dtype: ir.DataType
    recipe_name: str  # the registry name a recipe uses, for error messages

    def __init__(self, targets=DEFAULT_TARGETS, exclude=(), include_lm_head: bool = False,
                 min_coverage: float = DEFAULT_MIN_COVERAGE):
        super().__init__()
        if isinstance(targets, str) or isinstance(exclude, str):
            raise TypeError("targets / exclude must be lists of module-name patterns")
        self.targets, self.exclude, self.include_lm_head = tuple(targets), tuple(exclude), bool(include_lm_head)
        self.min_coverage = check_min_coverage(min_coverage)
        self.quantized: list[str] = []  # module names, for the report's precision map
        self.coverage: Coverage | None = None  # what the last run targeted, quantized and skipped

    def quantize(self, weight_KN: np.ndarray, target: Target) -> QuantizedWeight:
        raise NotImplementedError

    def block_for(self, k: int) -> tuple[int | None, str | None]:
        """(block along K, None) for a weight with K input rows, or (None, why the format can't take it).
        Per-output-channel formats take every K."""
        return None, None

    def plan(self, model: ir.Model) -> tuple[list[Target], Coverage]:
        """The targets to quantize (each with its block) and the coverage record of every targeted MatMul."""
        targets, plans = [], []
        for t in matching_matmuls(model, self.targets, self.exclude, self.include_lm_head):
            k, n = (int(d) for d in t.weight.shape)
            if t.skipped is None:
                t.block, t.skipped = self.block_for(k)
            if t.skipped is None:
                targets.append(t)
            plans.append(MatmulPlan(t.name, k, n, t.block, t.skipped))
        return targets, Coverage(plans, self.min_coverage)

    def requires(self, model: ir.Model) -> None:
        """Too little coverage fails before any weight changes (raised as is: the message is the error)."""
        problem = self.plan(model)[1].shortfall(self.recipe_name)
        if problem:
            raise ir.passes.PreconditionError(problem)

    def prepare(self, model: ir.Model, targets: list[Target]) -> None:
        """Hook for formats that transform weights before quantizing (AWQ's scale folding)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        targets, self.coverage = self.plan(model)
        self.prepare(model, targets)
        for target in targets:
            w = target.weight.const_value.numpy()
            qw = self.quantize(w, target)
            if qw.scale.dtype != w.dtype and w.dtype == np.float16:
                qw.scale = qw.scale.astype(np.float16)
            replace_weight(model.graph, target, qw, self.q_dtype)
            # The dropped initializer's Value still holds the float tensor, and `targets` holds the
            # Value until the pass ends: release it now, or every float weight stays resident beside
            # its quantized form (1B int4-awq: +2 GB by the pass's end).
            target.weight.const_value = w = None
            self.quantized.append(target.name)
        return ir.passes.PassResult(model, modified=bool(targets))
