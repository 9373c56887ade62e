"""The graph I/O contract: the names and shapes every layer of llmc agrees on.

The exported graph, the passes, the executors, the engine build and the Triton repository all address
the same tensors; their names (Optimum / onnxruntime-genai conventions) are defined here once, in a
module that imports nothing of llmc, so any layer can read them without importing the exporter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# Dim names in the exported graph (what users of onnxruntime-genai / Optimum expect to see). 
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


BLOCK_TABLES = "block_tables"  # the paged graph's one block-table input, shared by every layer


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

    @property
    def paged(self) -> bool:
        return self.block_size is not None

    @property
    def max_blocks(self) -> int | None:
        """Block-table width: blocks one sequence can hold (capacity // block_size)."""
        return self.capacity // self.block_size if self.paged and self.capacity is not None else None

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        if self.paged:
            return ["input_ids", "position_ids", BLOCK_TABLES, *self.past_names]
        if self.capacity is not None:
            return ["input_ids", "position_ids", *self.past_names]
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

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
