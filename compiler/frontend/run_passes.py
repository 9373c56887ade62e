"""Run the recipe's passes in order over the exported graph, recording each one.

The result is renamed canonically at the end: onnx-ir names new values from a counter that
carries over from whatever the graph went through before (an in-memory export, or one re-loaded
from the stage cache), so the same inputs would otherwise give different names, and different bytes.
"""

from __future__ import annotations

import dataclasses

import re
import time
from typing import Callable

import onnx_ir as ir

from passes import PassContext, make_pass

from compiler.errors import UnsupportedModelError

from compiler.graph_io import io_from_model
from compiler.graph_io import ExportedGraph
from compiler.recipe import Recipe


@dataclasses.dataclass
class PassRecord:
    """What one pass did: for the report and for debugging a pipeline."""

    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    details: dict = dataclasses.field(default_factory=dict)  # e.g. which modules a quantizer touched
    check: dict = dataclasses.field(default_factory=dict)  # --check-passes: compiler/pass_check.PassCheck as a dict


def run_passes(
    graph: ExportedGraph,
    recipe: Recipe,
    ctx: PassContext,
    on_pass: Callable[[PassRecord], None] | None = None,
    checker: Callable | None = None,
) -> tuple[ExportedGraph, list[PassRecord]]:
    """Apply `recipe.passes`; each pass checks its own pre/postconditions (onnx-ir requires/ensures),
    and a failed one is reported as a recipe that does not fit this graph.

    `checker(model)`, when given, returns an object whose `after(name, model)` measures each pass's
    effect on the logits (compiler/measure/pass_check.PassChecker, for --check-passes).
    """
    try:
        return _run(graph, recipe, ctx, on_pass, checker)
    except (ir.passes.PreconditionError, ir.passes.PostconditionError) as exc:
        raise UnsupportedModelError(f"recipe '{recipe.name}' cannot be applied to this graph: {exc}") from exc


def _run(graph, recipe, ctx, on_pass, checker):
    model = graph.model
    records = []
    checker = checker(model) if checker else None
    for index, name in enumerate(recipe.passes):
        before = len(model.graph)
        start = time.perf_counter()
        pass_ = make_pass(name, ctx, recipe.options_for(index))
        result = pass_(model)
        model = result.model
        record = PassRecord(name, bool(result.modified), time.perf_counter() - start, before, len(model.graph),
                            _details(pass_))
        if checker:
            record.check = checker.after(name, model).as_dict()
        records.append(record)
        if on_pass:
            on_pass(record)
    stable_names(model)
    return ExportedGraph(model=model, io=io_from_model(model), seconds=graph.seconds), records


def _details(pass_) -> dict:
    """What a quantizer did, for the report's precision map and coverage (empty for other passes)."""
    details = {}
    for attr in ("quantized", "fallbacks"):
        if getattr(pass_, attr, None):
            details[attr] = list(getattr(pass_, attr))
    if getattr(pass_, "search_log", None):
        details["awq_alpha"] = {k: v["alpha"] for k, v in pass_.search_log.items()}
    if getattr(pass_, "coverage", None) is not None:  # targeted / quantized / skipped matmuls (passes/quant_coverage.py)
        details["coverage"] = pass_.coverage.as_dict()
    return details


_GENERATED_VALUE = re.compile(r"^val_\d+$")
_GENERATED_NODE = re.compile(r"^node_(\w+_)?\d+$")
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def stable_names(model) -> None:
    """Rename generated names (`val_123`, `node_Attention_45`) by position in the graph: same graph, same names."""
    graph = model.graph
    values = [v for v in graph.initializers.values()]
    values += [out for node in graph for out in node.outputs]
    values = [v for v in values if v.name and _GENERATED_VALUE.match(v.name)
              and v not in graph.inputs and v not in graph.outputs]
    nodes = [n for n in graph if n.name and _GENERATED_NODE.match(n.name)]
    # Two steps, so that a new name never collides with an old one not yet renamed.
    for i, value in enumerate(values):
        value.name = f"__llmc_tmp_val_{i}"
    for i, value in enumerate(values):
        value.name = f"val_{i}"
    for i, node in enumerate(nodes):
        node.name = f"node_{node.op_type}_{i}"
    # The optimizer records the names it folded away; those are the history-dependent ones.
    for value in [*graph.initializers.values(), *(out for node in graph for out in node.outputs)]:
        value.metadata_props.pop(_FOLDED_FROM, None)
    for node in graph:
        node.metadata_props.pop(_FOLDED_FROM, None)
