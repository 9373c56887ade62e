"""The scheduler's KV-cache managers: which cache memory each in-flight sequence owns, step by step.

The compiled graph addresses the cache by position (compiler/graph_io.py): a linear graph takes
[batch, kv_heads, capacity, head_dim] per layer and writes a row's tokens at slots = positions; a
paged graph takes a block pool plus `block_tables` [batch, capacity // block_size]. Both managers
keep the cache as host arrays and call `executor.run(feeds)`, so any executor with a `run` serves;
an executor that keeps its cache on the device (TensorRT) gets device_cache.py's subclasses, which
share this bookkeeping and never move the cache to the host.

Linear (`SlotCache`): the buffers' batch rows are slots. A sequence owns one row from admission to
retirement and a freed row is handed to the next sequence as it is, unzeroed: its positions restart
at 0 and every query attends to slots <= its own position, each written by the new owner earlier in
the same or an earlier step (TensorScatter writes before Attention reads), so what the previous owner
left beyond the new sequence's length is never read (tests/test_scheduler.py reuses a dirty row).
A step runs only the rows it names: a contiguous run of rows goes in as a view, others are gathered.

Prefix reuse (linear): a freed row still holds its last owner's K/V, and a K/V entry depends only on the
tokens at and before its position (causal attention), so a new sequence whose tokens start with the same
prefix can take that row and start feeding after it: no copy, no recompute. `open` prefers the free row
with the longest common prefix (a multi-turn chat's next turn finds its whole history there; requests
sharing a system prompt find that), keeping one token to feed so the step still yields its logits
(vLLM's and TensorRT-LLM's prefix caching do this per block for the paged pool; not done there here).

Paged (`BlockCache`): the pool's blocks are handed out as a sequence grows (vLLM's block manager,
Kwon et al. 2023, "PagedAttention") and returned when it ends. Every unowned table entry points at
one extra scratch block: a step pads each row to its longest with tokens at the positions after
the row's own, and those writes (and only they) land in the scratch block or in the row's own
blocks past its length, never in another sequence's.
"""

from __future__ import annotations

import heapq

import numpy as np

from compiler.graph_io import BLOCK_TABLES
from compiler.runtime.executor import at


def bytes_per_token(io, dtype: np.dtype) -> int:
    """The floor: one token's K and V in every layer (layers x 2 x kv_heads x head_dim x bytes)."""
    return io.num_layers * 2 * io.num_kv_heads * io.head_dim * np.dtype(dtype).itemsize


class SlotCache:
    """Linear cache: `slots` rows of `capacity` positions; one row per sequence."""

    def __init__(self, executor, slots: int):
        io = executor.io
        if io.capacity is None or io.paged:
            raise ValueError("SlotCache needs a linear fixed-capacity graph (a recipe that runs kv-cache-scatter)")
        if slots < 1:
            raise ValueError(f"slots must be >= 1 (got {slots})")
        self.io, self.executor, self.slots, self.capacity = io, executor, slots, io.capacity
        self.dtype = executor.input_dtype(io.past_names[0])
        self.buffers = self._allocate((slots, io.num_kv_heads, io.capacity, io.head_dim))
        self._free = list(range(slots))  # a heap: the lowest free row first keeps busy rows contiguous
        self.row: dict[object, int] = {}
        self.length: dict[object, int] = {}  # positions each sequence has reserved
        self.history: dict[int, list[int]] = {}  # free row -> the tokens whose K/V its first slots hold
        self.reuse: dict[object, int] = {}  # sequence -> positions it found in its row at admission

    def _allocate(self, shape: tuple[int, ...]) -> dict:
        """One zeroed host buffer per past input (device_cache.py's managers allocate on the device)."""
        return {name: np.zeros(shape, self.dtype) for name in self.io.past_names}

    def open(self, seq, tokens: int, prefix: list[int] | None = None) -> bool:
        """Give `seq` a row if one is free (its first `tokens` positions always fit: capacity is per row):
        the free row holding the longest prefix of `prefix` (its token ids), else the lowest free row."""
        if not self._free:
            return False
        shared = {r: common_prefix(self.history.get(r, ()), prefix or ()) for r in self._free}
        best = max(self._free, key=lambda r: (shared[r], -r))
        if shared[best] == 0:
            best = self._free[0]  # the heap's lowest
        self._free.remove(best)
        heapq.heapify(self._free)
        self.row[seq] = best
        self.length[seq] = tokens
        self.reuse[seq] = min(shared[best], tokens - 1)  # at least one token is fed: its logits are needed
        return True

    def reused(self, seq) -> int:
        """Positions of `seq` already in its row at admission (the scheduler starts feeding after them)."""
        return self.reuse.get(seq, 0)

    def reserve(self, seq, end: int) -> bool:
        self.length[seq] = max(self.length[seq], end)
        return True

    def close(self, seq, valid: list[int] | None = None) -> None:
        """Free `seq`'s row; `valid`: the tokens whose K/V it wrote at slots 0.. (kept for prefix reuse)."""
        row = self.row.pop(seq)
        self.history[row] = list(valid or ())
        heapq.heappush(self._free, row)
        del self.length[seq]
        self.reuse.pop(seq, None)

    def fits(self, tokens: int) -> bool:
        return tokens <= self.capacity

    def run(self, seqs: list, input_ids: np.ndarray, position_ids: np.ndarray,
            logits_at: np.ndarray | None = None) -> np.ndarray:
        rows = np.array([self.row[s] for s in seqs])
        contiguous = bool(np.all(np.diff(rows) == 1))
        pick = slice(int(rows[0]), int(rows[-1]) + 1) if contiguous else rows
        feeds = {"input_ids": input_ids, "position_ids": position_ids, **at(logits_at),
                 **{name: buf[pick] for name, buf in self.buffers.items()}}
        out = self.executor.run(feeds)
        for past, present in zip(self.io.past_names, self.io.present_names):
            if contiguous and len(rows) == self.slots:
                self.buffers[past] = out[present]
            else:
                self.buffers[past][pick] = out[present]
        return out["logits"]

    def allocated_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def in_use_bytes(self) -> int:
        """A row is the sequence's whole capacity, however few tokens it holds."""
        return len(self.row) * self.capacity * bytes_per_token(self.io, self.dtype)


def common_prefix(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BlockCache:
    """Paged cache: a pool of `num_blocks` blocks (+1 scratch) handed out per block as sequences grow."""

    def __init__(self, executor, num_blocks: int):
        io = executor.io
        if not io.paged:
            raise ValueError("BlockCache needs a paged graph (the fp16-paged or fp8kv-paged recipe)")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (got {num_blocks})")
        self.io, self.executor, self.capacity = io, executor, io.capacity
        self.block_size, self.num_blocks, self.scratch = io.block_size, num_blocks, num_blocks
        self.dtype = executor.input_dtype(io.past_names[0])
        self.buffers = self._allocate((num_blocks + 1, io.num_kv_heads, io.block_size, io.head_dim))
        self._free = list(range(num_blocks))
        self.blocks: dict[object, list[int]] = {}

    def _allocate(self, shape: tuple[int, ...]) -> dict:
        """One zeroed host buffer per past input (device_cache.py's managers allocate on the device)."""
        return {name: np.zeros(shape, self.dtype) for name in self.io.past_names}

    def _needed(self, seq, end: int) -> int:
        return -(-end // self.block_size) - len(self.blocks[seq])

    def open(self, seq, tokens: int, prefix: list[int] | None = None) -> bool:
        """Admit `seq` only if its first `tokens` positions' blocks are free now (no prefix reuse here)."""
        self.blocks[seq] = []
        if self._needed(seq, tokens) > len(self._free):
            del self.blocks[seq]
            return False
        return self.reserve(seq, tokens)

    def reserve(self, seq, end: int) -> bool:
        """Blocks for positions [0, end); False (and nothing taken) when the pool has too few free."""
        need = self._needed(seq, end)
        if need > len(self._free):
            return False
        for _ in range(max(need, 0)):
            self.blocks[seq].append(heapq.heappop(self._free))
        return True

    def reused(self, seq) -> int:
        return 0

    def close(self, seq, valid: list[int] | None = None) -> None:
        for block in self.blocks.pop(seq):
            heapq.heappush(self._free, block)

    def fits(self, tokens: int) -> bool:
        """Whether a sequence of `tokens` positions could ever run: the table's width and the whole pool."""
        return tokens <= self.capacity and -(-tokens // self.block_size) <= self.num_blocks

    def tables(self, seqs: list) -> np.ndarray:
        tables = np.full((len(seqs), self.io.max_blocks), self.scratch, np.int32)
        for row, seq in enumerate(seqs):
            owned = self.blocks[seq]
            tables[row, : len(owned)] = owned
        return tables

    def run(self, seqs: list, input_ids: np.ndarray, position_ids: np.ndarray,
            logits_at: np.ndarray | None = None) -> np.ndarray:
        feeds = {"input_ids": input_ids, "position_ids": position_ids, BLOCK_TABLES: self.tables(seqs),
                 **at(logits_at), **self.buffers}
        out = self.executor.run(feeds)
        self.buffers = {past: out[present] for past, present in zip(self.io.past_names, self.io.present_names)}
        return out["logits"]

    def allocated_bytes(self) -> int:
        return sum(b.nbytes for b in self.buffers.values())

    def in_use_bytes(self) -> int:
        used = sum(len(b) for b in self.blocks.values())
        return used * self.block_size * bytes_per_token(self.io, self.dtype)


def cache_for(executor, max_batch: int, num_blocks: int | None = None):
    """The manager the graph needs: row slots for a linear cache, blocks (default: enough for
    max_batch full-length sequences) for a paged one; on the device (device_cache.py) where the
    executor keeps its cache there (`cache_on_device`: TensorRT), as host arrays otherwise."""
    slots, blocks = SlotCache, BlockCache
    if getattr(executor, "cache_on_device", False):
        from compiler.runtime.device_cache import DeviceBlockCache, DeviceSlotCache

        slots, blocks = DeviceSlotCache, DeviceBlockCache
    if executor.io.paged:
        return blocks(executor, num_blocks or max_batch * executor.io.max_blocks)
    if num_blocks is not None:
        raise ValueError("num_blocks applies to paged graphs only; this graph's cache is linear (one row per sequence)")
    return slots(executor, max_batch)
