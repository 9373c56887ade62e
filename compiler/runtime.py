"""What every engine executor offers, and the KV-cache bookkeeping shared by all of them.

Executors (onnxruntime over model.onnx, TensorRT over model.plan) run one forward step on numpy
feeds; `KVCacheSession` turns that into prefill + decode with the graph's cache I/O, so the
validator (and later the generation runner) never care which executor is underneath.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .types import GraphIO


class Executor(Protocol):
    """One forward pass of the compiled graph."""

    name: str

    def input_dtype(self, name: str) -> np.dtype: ...

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class KVCacheSession:
    """Feeds input_ids / attention_mask / position_ids / past K/V and carries present K/V forward.

    Batch 1 or equal-length rows: all sequences share one length (ragged batches come with the
    fixed-capacity cache rewrite).
    """

    def __init__(self, executor: Executor, io: GraphIO, batch: int = 1):
        self.executor = executor
        self.io = io
        self.batch = batch
        self.past_len = 0
        kv_dtype = executor.input_dtype(io.past_names[0])
        empty = np.zeros((batch, io.num_kv_heads, 0, io.head_dim), dtype=kv_dtype)
        self.cache = {name: empty for name in io.past_names}

    def step(self, input_ids: np.ndarray) -> np.ndarray:
        """Run `input_ids` [batch, seq] after everything fed so far; return logits [batch, seq, vocab] (fp32)."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        total = self.past_len + seq
        feeds = {
            "input_ids": input_ids,
            "attention_mask": np.ones((batch, total), dtype=np.int64),
            "position_ids": np.broadcast_to(np.arange(self.past_len, total, dtype=np.int64), (batch, seq)).copy(),
            **self.cache,
        }
        out = self.executor.run(feeds)
        self.cache = {past: out[present] for past, present in zip(self.io.past_names, self.io.present_names)}
        self.past_len = total
        return out["logits"].astype(np.float32)
