"""Saving a graph the way every stage saves one: inline, or with its weights beside it when big."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

EXTERNAL_DATA_THRESHOLD = 256 << 20  # weights beside the graph above this: protobuf's 2 GiB cap, and an
# inline save builds the whole proto in memory (+2x the graph at the end of the passes: 1B INT4, 360M)


def save_onnx(model: ir.Model, path: Path, threshold: int | None = None) -> list[Path]:
    threshold = EXTERNAL_DATA_THRESHOLD if threshold is None else threshold
    weight_bytes = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weight_bytes > threshold:
        ir.save(model, path, external_data=path.name + ".data")
        return [path, path.with_name(path.name + ".data")]
    ir.save(model, path)
    return [path]


def onnx_files(folder: Path) -> dict[str, Path]:
    """model.onnx and, when its weights are beside it, model.onnx.data."""
    return {p.name: p for p in (folder / "model.onnx", folder / "model.onnx.data") if p.is_file()}
