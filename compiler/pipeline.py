"""Stage 3, passes: run the recipe's passes in order over the exported graph, recording each one."""

from __future__ import annotations

import time
from typing import Callable

from passes import PassContext, make_pass

from .runtime import io_from_model
from .types import ExportedGraph, PassRecord, Recipe


def run_passes(
    graph: ExportedGraph,
    recipe: Recipe,
    ctx: PassContext,
    on_pass: Callable[[PassRecord], None] | None = None,
) -> tuple[ExportedGraph, list[PassRecord]]:
    """Apply `recipe.passes`; each pass checks its own pre/postconditions (onnx-ir requires/ensures)."""
    model = graph.model
    records = []
    for index, name in enumerate(recipe.passes):
        before = len(model.graph)
        start = time.perf_counter()
        pass_ = make_pass(name, ctx, recipe.options_for(index))
        result = pass_(model)
        model = result.model
        record = PassRecord(name, bool(result.modified), time.perf_counter() - start, before, len(model.graph),
                            _details(pass_))
        records.append(record)
        if on_pass:
            on_pass(record)
    return ExportedGraph(model=model, io=io_from_model(model), seconds=graph.seconds), records


def _details(pass_) -> dict:
    """What a quantizer did, for the report's precision map (empty for other passes)."""
    details = {}
    for attr in ("quantized", "fallbacks"):
        if getattr(pass_, attr, None):
            details[attr] = list(getattr(pass_, attr))
    if getattr(pass_, "search_log", None):
        details["awq_alpha"] = {k: v["alpha"] for k, v in pass_.search_log.items()}
    return details
