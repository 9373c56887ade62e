"""What every engine executor offers, and the graph I/O facts the runner needs.

Executors (onnxruntime over model.onnx, TensorRT over model.plan) hold the fixed-capacity KV
cache themselves: `start(batch)` allocates zeroed buffers, `step(input_ids, position_ids)` runs one
forward pass, updates the cache and returns logits. On TensorRT the cache outputs are bound to
the input buffers (in-place KV_CACHE_UPDATE); on onnxruntime the outputs replace the inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from .types import GraphIO


class Executor(Protocol):
    name: str

    def input_dtype(self, name: str) -> np.dtype: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def start(self, batch: int) -> None: ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray: ...


def io_from_shapes(inputs: dict[str, list], outputs: dict[str, list]) -> GraphIO:
    """GraphIO from I/O names and shapes (ints for static dims, strings for symbolic ones)."""
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    if not layers or "logits" not in outputs:
        raise ValueError("not an llmc graph: no past_key_values.*.key inputs or no logits output")
    past = inputs["past_key_values.0.key"]
    capacity = past[2] if isinstance(past[2], int) and "attention_mask" not in inputs else None
    return GraphIO(num_layers=layers, num_kv_heads=int(past[1]), head_dim=int(past[3]),
                   vocab_size=int(outputs["logits"][2]), capacity=capacity)


def io_from_onnx(path: Path) -> GraphIO:
    """Read the I/O contract of a saved graph without loading its weights."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def dims(vi):
        return [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]

    return io_from_shapes({vi.name: dims(vi) for vi in graph.input}, {vi.name: dims(vi) for vi in graph.output})


def io_from_model(model) -> GraphIO:
    """The same, for an in-memory onnx_ir model (what passes hand on)."""

    def dims(v):
        return [d if isinstance(d, int) else str(d) for d in v.shape]

    return io_from_shapes({v.name: dims(v) for v in model.graph.inputs}, {v.name: dims(v) for v in model.graph.outputs})


class HostKVCache:
    """The cache as numpy arrays: for executors whose outputs come back to the host (onnxruntime)."""

    def __init__(self, io: GraphIO, batch: int, dtype: np.dtype):
        if io.capacity is None:
            raise ValueError("this graph grows its cache by Concat; build it with a recipe that runs "
                             "kv-cache-scatter (e.g. fp16) to use the runner")
        shape = (batch, io.num_kv_heads, io.capacity, io.head_dim)
        self.io = io
        self.buffers = {name: np.zeros(shape, dtype=dtype) for name in io.past_names}

    def feeds(self, input_ids: np.ndarray, position_ids: np.ndarray) -> dict[str, np.ndarray]:
        return {"input_ids": np.asarray(input_ids, np.int64), "position_ids": np.asarray(position_ids, np.int64),
                **self.buffers}

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        self.buffers = {past: outputs[present] for past, present in zip(self.io.past_names, self.io.present_names)}
