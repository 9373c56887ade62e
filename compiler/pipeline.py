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
    for name in recipe.passes:
        before = len(model.graph)
        start = time.perf_counter()
        result = make_pass(name, ctx)(model)
        model = result.model
        record = PassRecord(name, bool(result.modified), time.perf_counter() - start, before, len(model.graph))
        records.append(record)
        if on_pass:
            on_pass(record)
    return ExportedGraph(model=model, io=io_from_model(model), seconds=graph.seconds), records
