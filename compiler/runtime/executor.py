"""What every engine executor offers, and the graph I/O facts the runner needs.

Executors (onnxruntime over model.onnx, TensorRT over model.plan) hold the fixed-capacity KV
cache themselves: `start(batch)` allocates zeroed buffers, `step(input_ids, position_ids)` runs one
forward pass, updates the cache and returns logits. On TensorRT the cache outputs are bound to
the input buffers (in-place KV_CACHE_UPDATE); on onnxruntime the outputs replace the inputs.

A paged graph (GraphIO.paged) takes each layer's cache as a block pool shared by the batch plus
one `block_tables` input; the executor owns both: the pool holds batch x max_blocks blocks and each
sequence gets max_blocks of them, handed out by a block allocator (`shuffled_block_tables` by
default: scattered over the pool as a real allocator's free list leaves them, so the indirection
is exercised, never the identity layout).
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np

from compiler.graph_io import BLOCK_TABLES, LOGITS_AT, GraphIO


class Executor(Protocol):
    name: str

    def input_dtype(self, name: str) -> np.dtype: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def start(self, batch: int) -> None: ...

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, logits_at: np.ndarray | None = None) -> np.ndarray: ...


BlockAllocator = Callable[[int, int], np.ndarray]  # (batch, max_blocks) -> block tables [batch, max_blocks]


def shuffled_block_tables(batch: int, max_blocks: int, seed: int = 0) -> np.ndarray:
    """Every sequence gets max_blocks distinct blocks of a batch x max_blocks pool, in a seeded random order."""
    order = np.random.default_rng(seed).permutation(batch * max_blocks)
    return order.reshape(batch, max_blocks).astype(np.int32)


def identity_block_tables(batch: int, max_blocks: int) -> np.ndarray:
    """Sequence b owns blocks b*max_blocks .. (b+1)*max_blocks-1 in order: the linear cache's layout."""
    return np.arange(batch * max_blocks, dtype=np.int32).reshape(batch, max_blocks)


def at(logits_at: np.ndarray | None) -> dict:
    """The step's `logits_positions` feed (graphs after last-position-logits), or nothing."""
    return {} if logits_at is None else {LOGITS_AT: logits_at}


def every_position(io: GraphIO, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`feeds`, with `logits_positions` asking for every position where the graph takes it and the caller
    named none (the runner, validation, quality: they read all positions' logits, as before the pass)."""
    if not io.logits_positions or LOGITS_AT in feeds:
        return feeds
    batch, seq = np.shape(feeds["input_ids"])
    return {**feeds, LOGITS_AT: np.tile(np.arange(seq, dtype=np.int64), (batch, 1))}


def cache_shape(io: GraphIO, batch: int) -> tuple[int, ...]:
    """Shape of one layer's K (or V) cache for `batch` sequences at full capacity."""
    if io.capacity is None:
        raise ValueError("this graph grows its cache by Concat; build it with a recipe that runs "
                         "kv-cache-scatter (e.g. fp16) to use the runner")
    if io.paged:
        return (batch * io.max_blocks, io.num_kv_heads, io.block_size, io.head_dim)
    return (batch, io.num_kv_heads, io.capacity, io.head_dim)


def block_tables_for(io: GraphIO, batch: int, allocate: BlockAllocator | None = None) -> np.ndarray:
    """The allocator's tables, checked: the shape the graph takes, ids inside the pool, no block shared."""
    tables = np.asarray((allocate or shuffled_block_tables)(batch, io.max_blocks))
    pool = batch * io.max_blocks
    if tables.shape != (batch, io.max_blocks):
        raise ValueError(f"block allocator returned {tables.shape}, expected {(batch, io.max_blocks)}")
    if tables.size and (tables.min() < 0 or tables.max() >= pool):
        raise ValueError(f"block ids must lie in [0, {pool}) (the pool's blocks); got {tables.min()}..{tables.max()}")
    return tables.astype(np.int32)


class HostKVCache:
    """The cache as numpy arrays: for executors whose outputs come back to the host (onnxruntime).

    Linear graphs: one [batch, kv_heads, capacity, head_dim] buffer per past input. Paged graphs: one
    pool per past input plus the block tables (fixed for the batch's lifetime: `start` allocates).
    """

    def __init__(self, io: GraphIO, batch: int, dtype: np.dtype, allocate: BlockAllocator | None = None):
        shape = cache_shape(io, batch)
        self.io = io
        self.buffers = {name: np.zeros(shape, dtype=dtype) for name in io.past_names}
        self.block_tables = block_tables_for(io, batch, allocate) if io.paged else None

    def feeds(self, input_ids: np.ndarray, position_ids: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"input_ids": np.asarray(input_ids, np.int64), "position_ids": np.asarray(position_ids, np.int64),
                 **self.buffers}
        if self.block_tables is not None:
            feeds[BLOCK_TABLES] = self.block_tables
        return feeds

    def update(self, outputs: dict[str, np.ndarray]) -> None:
        self.buffers = {past: outputs[present] for past, present in zip(self.io.past_names, self.io.present_names)}
