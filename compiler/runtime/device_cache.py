"""The scheduler's KV-cache managers for an executor whose cache stays on the device (TensorRT).

The host managers (kv_slots.SlotCache / BlockCache) keep the cache as numpy arrays and feed it to
`executor.run` every step: right for onnxruntime on the CPU, where the cache is host memory anyway,
and ruinous on a GPU, where it would cross PCIe twice per step. Here the buffers are the executor's
own device tensors (`executor.cache_buffers(shape)`), allocated once, and a step calls
`executor.run_in_place(feeds, cache)`: the executor binds each `past_key_values.*` input AND its
`present.*` output to the address of the tensor it is given, so TensorRT's KVCacheUpdate writes the
new entries where they already are ("shares the same device memory address with the cache input",
TensorRT operator docs, KVCacheUpdate) and only the logits come back to the host. The bookkeeping
(who owns which row or block, admission, preemption) is the host managers', inherited unchanged.

Linear cache (`DeviceSlotCache`): a step names a set of batch rows, put in buffer order (the
step's ids and positions permuted to match, its logits permuted back). A contiguous run of rows
[a, b) is the view `buffer[a:b]`, itself contiguous (rows are the outermost dim), so it is bound at
the pointer offset a x row bytes: nothing is copied. TensorRT wants 256-byte aligned addresses
(setTensorAddress); llmc's rows are (kv_heads x capacity x head_dim x 2 bytes, a multiple of 256 for
even capacities at head_dim >= 64), and a row offset that is not is gathered like the case below.
Rows that are not one run (a sequence in the middle retired, or the decode rows of a step are
interleaved with prompt rows) are gathered into a contiguous staging tensor (`index_select`, a device-to-device copy of those rows' whole capacity),
run in place there and scattered back (`index_copy_`): 2 x rows x capacity x bytes_per_token of
device memory traffic for that step (Gemma 3 270M at max_seq 4096, 8 rows: 2 x 8 x 75.5 MB = 1.2 GB,
~0.25 ms at an H200's 4.8 TB/s; never PCIe). The row allocator hands out the lowest free row, so
busy rows stay packed, but the scheduler runs decode rows and prompt chunks as separate calls, whose
rows interleave: on the bundled model's mixed load (tests/test_scheduler_device.py) 25 of 63 calls
gathered. `moved_bytes` and `gathered_steps` count them.

Paged cache (`DeviceBlockCache`): the pool is bound whole every step (the block tables, uploaded per
step, are rows x max_blocks int32: bytes), so no step ever copies cache.
"""

from __future__ import annotations

import numpy as np

from compiler.graph_io import BLOCK_TABLES
from compiler.runtime.executor import at
from compiler.runtime.kv_slots import BlockCache, SlotCache


ALIGN = 256  # bytes; a fresh staging tensor from torch's CUDA allocator is aligned to 512


def _rows_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class DeviceSlotCache(SlotCache):
    """Linear cache on the device: `slots` rows of `capacity` positions, one row per sequence."""

    def _allocate(self, shape: tuple[int, ...]) -> dict:
        self.moved_bytes = 0  # device-to-device bytes of gathered (non-contiguous) steps
        self.gathered_steps = 0
        return self.executor.cache_buffers(shape)

    def run(self, seqs: list, input_ids: np.ndarray, position_ids: np.ndarray,
            logits_at: np.ndarray | None = None) -> np.ndarray:
        rows = np.array([self.row[s] for s in seqs])
        order = np.argsort(rows, kind="stable")  # the graph's batch rows in buffer order; logits given back in seqs'
        rows = rows[order]
        feeds = {"input_ids": input_ids[order], "position_ids": position_ids[order],
                 **at(None if logits_at is None else logits_at[order])}
        if rows[-1] - rows[0] + 1 == len(rows) and self._aligned(int(rows[0])):  # one run: bound at its offset
            start, stop = int(rows[0]), int(rows[-1]) + 1
            logits = self.executor.run_in_place(feeds, {n: b[start:stop] for n, b in self.buffers.items()})
        else:
            logits = self._gathered(rows, feeds)
        out = np.empty_like(logits)
        out[order] = logits
        return out

    def _aligned(self, row: int) -> bool:
        """TensorRT: "The pointer must have at least 256-byte alignment" (NvInferRuntime.h, setTensorAddress). The
        buffers' own addresses are (torch's CUDA allocator: 512 bytes), so the row's offset decides."""
        return all(row * b[0].numel() * b.element_size() % ALIGN == 0 for b in self.buffers.values())

    def _gathered(self, rows: np.ndarray, feeds: dict) -> np.ndarray:
        import torch

        index = torch.as_tensor(rows, dtype=torch.long, device=next(iter(self.buffers.values())).device)
        staged = {n: b.index_select(0, index) for n, b in self.buffers.items()}
        logits = self.executor.run_in_place(feeds, staged)
        for name, buf in self.buffers.items():
            buf.index_copy_(0, index, staged[name])
        self.moved_bytes += 2 * _rows_bytes(staged.values())
        self.gathered_steps += 1
        return logits

    def allocated_bytes(self) -> int:
        return _rows_bytes(self.buffers.values())


class DeviceBlockCache(BlockCache):
    """Paged cache on the device: the pool (+1 scratch block) bound whole; tables uploaded per step."""

    def _allocate(self, shape: tuple[int, ...]) -> dict:
        return self.executor.cache_buffers(shape)

    def run(self, seqs: list, input_ids: np.ndarray, position_ids: np.ndarray,
            logits_at: np.ndarray | None = None) -> np.ndarray:
        feeds = {"input_ids": input_ids, "position_ids": position_ids, BLOCK_TABLES: self.tables(seqs),
                 **at(logits_at)}
        return self.executor.run_in_place(feeds, self.buffers)

    def allocated_bytes(self) -> int:
        return _rows_bytes(self.buffers.values())
