"""The graph I/O contract: the names and shapes every layer of llmc agrees on.

The exported graph, the passes, the executors, the engine build and the Triton repository all address
the same tensors; their names (Optimum / onnxruntime-genai conventions) are defined here once, in a
module that imports nothing of llmc, so any layer can read them without importing the exporter.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

# Dim names in the exported graph (what users of onnxruntime-genai / Optimum expect to see). 
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


BLOCK_TABLES = "block_tables"  # the paged graph's one block-table input, shared by every layer
# passes/last_position_logits.py: which positions' logits a step returns ([batch, n] indices into its sequence)
LOGITS_AT, LOGITS_AT_DIM = "logits_positions", "logits_positions_length"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."  # per-layer cache input / output name prefixes
KV = ("key", "value")
PRESENT_RE = re.compile(rf"{re.escape(PRESENT_PREFIX)}(\d+)\.(key|value)")  # groups: layer, key|value


def past_name(layer: int, kv: str) -> str:
    return f"{PAST_PREFIX}{layer}.{kv}"


def present_name(layer: int, kv: str) -> str:
    return f"{PRESENT_PREFIX}{layer}.{kv}"


def present_for(past: str) -> str:
    """The output that carries an input cache tensor's update: past_key_values.{i}.{kv} -> present.{i}.{kv}."""
    return PRESENT_PREFIX + past[len(PAST_PREFIX):]


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """The public I/O contract of the exported graph (names follow Optimum / onnxruntime-genai)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    capacity: int | None = None  # fixed KV-cache slots (kv-cache-scatter); None: Concat-grown cache
    # Paged cache (attention-plugin with paged: true): past/present are block pools
    # [num_blocks, kv_heads, block_size, head_dim] shared by the batch, addressed through the one
    # `block_tables` input [batch, capacity // block_size]. None: linear [batch, kv_heads, capacity, head_dim].
    block_size: int | None = None
    # passes/last_position_logits.py ran: a `logits_positions` input picks the positions whose logits come back
    logits_positions: bool = False

    @property
    def paged(self) -> bool:
        return self.block_size is not None

    @property
    def max_blocks(self) -> int | None:
        """Block-table width: blocks one sequence can hold (capacity // block_size)."""
        return self.capacity // self.block_size if self.paged and self.capacity is not None else None

    @property
    def past_names(self) -> list[str]:
        return [past_name(i, kv) for i in range(self.num_layers) for kv in KV]

    @property
    def present_names(self) -> list[str]:
        return [present_name(i, kv) for i in range(self.num_layers) for kv in KV]

    @property
    def input_names(self) -> list[str]:
        at = [LOGITS_AT] if self.logits_positions else []
        if self.paged:
            return ["input_ids", "position_ids", BLOCK_TABLES, *self.past_names, *at]
        if self.capacity is not None:
            return ["input_ids", "position_ids", *self.past_names, *at]
        return ["input_ids", "attention_mask", "position_ids", *self.past_names, *at]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]


@dataclasses.dataclass
class ExportedGraph:
    """Output of export (and of each pass): an in-memory ONNX model plus its I/O contract."""

    model: Any  # onnx_ir.Model
    io: GraphIO
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor as the built network declares it (-1 = dynamic)."""

    name: str
    dtype: str  # numpy-style name: float16, int64, bool, ...
    shape: tuple[int, ...]
    is_input: bool


def io_from_shapes(inputs: dict[str, list], outputs: dict[str, list]) -> GraphIO:
    """GraphIO from I/O names and shapes (ints for static dims, strings for symbolic ones)."""
    layers = sum(1 for n in inputs if n.startswith(PAST_PREFIX) and n.endswith(".key"))
    if not layers or "logits" not in outputs:
        raise ValueError("not an llmc graph: no past_key_values.*.key inputs or no logits output")
    past = inputs[past_name(0, "key")]
    common = dict(num_layers=layers, num_kv_heads=int(past[1]), head_dim=int(past[3]),
                  vocab_size=int(outputs["logits"][2]), logits_positions=LOGITS_AT in inputs)
    if BLOCK_TABLES in inputs:  # paged: past is a pool [num_blocks, kv_heads, block_size, head_dim]
        table = inputs[BLOCK_TABLES]
        if len(table) != 2 or not isinstance(table[1], int) or not isinstance(past[2], int):
            raise ValueError(f"paged graph: {BLOCK_TABLES} {table} needs a static width and the pool "
                             f"{past} a static block size (rebuild with the attention-plugin pass's paged option)")
        return GraphIO(**common, capacity=table[1] * past[2], block_size=past[2])
    capacity = past[2] if isinstance(past[2], int) and "attention_mask" not in inputs else None
    return GraphIO(**common, capacity=capacity)


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
