"""Weight bytes of a graph against the floor its formats imply.

Why: "INT4" says little about size until scales, kept-FP16 layers (embeddings, lm_head, norms) and
the container's overhead are counted. The floor is what the chosen formats cost at best:
parameters x bits / 8, plus the scale tensors; the artifact's bytes are then reported as a ratio.
"""

from __future__ import annotations

import onnx_ir as ir

_BITS = {
    ir.DataType.INT4: 4, ir.DataType.UINT4: 4, ir.DataType.INT8: 8, ir.DataType.UINT8: 8,
    ir.DataType.FLOAT8E4M3FN: 8, ir.DataType.FLOAT16: 16, ir.DataType.BFLOAT16: 16, ir.DataType.FLOAT: 32,
    ir.DataType.INT64: 64, ir.DataType.INT32: 32, ir.DataType.BOOL: 8,
}


def weight_footprint(model: ir.Model) -> dict:
    """Parameters and floor bytes per storage dtype, FP16-equivalent bytes, and the floor total."""
    by_dtype: dict[str, dict[str, int]] = {}
    params = floor = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        n = tensor.size
        bits = _BITS.get(value.dtype, 8 * value.dtype.itemsize if hasattr(value.dtype, "itemsize") else 32)
        entry = by_dtype.setdefault(value.dtype.name.lower(), {"elements": 0, "bytes": 0})
        entry["elements"] += n
        entry["bytes"] += (n * bits + 7) // 8
        floor += (n * bits + 7) // 8
        if not value.name.endswith(".scale"):
            params += n
    return {"parameters": params, "floor_bytes": floor, "fp16_bytes": params * 2, "by_dtype": by_dtype}
