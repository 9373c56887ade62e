"""Executor over the compiled ONNX with onnxruntime: the CI executor for every numerics claim.

The graph it runs is the one TensorRT parsed, so its outputs are what the engine is supposed to
compute; on the CPU provider, FP16 MatMuls run as FP32 products with FP16 in and out, as
TensorRT's FP16 GEMMs accumulate (compiler/runtime/ort_widen.py: onnxruntime has no x86 FP16 GEMM), and
INT4 weight-only MatMuls as MatMulNBits on the same 4-bit weights, whose dequantized values are
exactly the graph's (the scales make every product exact in FP16).
Only onnxruntime's *basic* graph optimizations (constant
folding, redundant-node removal) are on by default: its extended fusions rewrite numerics (on the
INT4 graph against the same graph with its weights dequantized ahead: max |logit diff| 0.0 at basic,
5.39 at extended; benchmarks/NOTES.md).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from compiler.host.memory import release_freed_memory
from compiler.host.scratch import on_disk_or_none, scratch_directory
from compiler.runtime.ort_widen import widened
from compiler.graph_io import io_from_onnx
from compiler.runtime.executor import BlockAllocator, HostKVCache, at, every_position

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
    "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
    "tensor(float8e4m3fn)": np.uint8,  # numpy has no FP8: the bytes travel as uint8 (the FP8-KV recipe's cache)
}
_FP8_E4M3 = 17  # onnx.TensorProto.FLOAT8E4M3FN


# onnxruntime threads when the caller names none (default: every core). Set by processes that share the
# machine with others, e.g. parallel test workers (tests/conftest.py), where spinning threads would fight.
THREADS_ENV = "LLMC_ORT_THREADS"


RELEASE_ABOVE = 256 << 20  # graphs this big are collected before their session exists (a full gc: ~0.1-0.5 s)


def _graph_bytes(onnx_path: Path) -> int:
    data = onnx_path.with_name(onnx_path.name + ".data")
    return onnx_path.stat().st_size + (data.stat().st_size if data.exists() else 0)


class OnnxRuntimeExecutor:
    """CPU by default; the CUDA provider when present and asked for.

    block_allocator: for paged graphs, how `start` hands blocks to sequences (default: shuffled over
    the pool, compiler/runtime/executor.py); ignored for linear caches.
    arena: onnxruntime's CPU memory arena, which keeps the largest intermediates a run ever needed
    (grown in powers of two) for the session's life. Good for serving; a build's checks (validate,
    quality, precision probes) turn it off: at 1B INT4, prefilling 4 x 128 tokens, the arena kept
    ~0.8 GB beyond what the runs need (llmc's peak, in the quality stage), and without it the runs
    were no slower (7.0-7.7 s against 7.4-8.2 s a batch).
    """

    def __init__(self, onnx_path: Path, providers: list[str] | None = None, threads: int | None = None,
                 optimization: str = "basic", spin: bool = True, block_allocator: BlockAllocator | None = None,
                 widen_fp16_matmul: bool | None = None, int4_matmul: bool = True, arena: bool = True):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = arena
        opts.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[optimization]
        threads = threads or int(os.environ.get(THREADS_ENV, "0") or 0)
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:  # idle threads sleep instead of spinning: for processes that share cores (Triton stubs)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = [p for p in (providers or ["CPUExecutionProvider"]) if p in available] or ["CPUExecutionProvider"]
        if widen_fp16_matmul is None:  # the CPU provider has no FP16 GEMM (compiler/runtime/ort_widen.py)
            widen_fp16_matmul = providers[0] == "CPUExecutionProvider"
        self.widened = self.int4_matmuls = 0  # FP16 MatMuls run in FP32; of them, on 4-bit weights
        if widen_fp16_matmul:
            self.session = self._widened_session(Path(onnx_path), opts, providers, int4_matmul)
        else:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        self.name = f"onnxruntime ({self.session.get_providers()[0]})"
        self._types = {i.name: _ORT_TYPES[i.type] for i in self.session.get_inputs()}
        self._fp8 = {i.name for i in self.session.get_inputs() if i.type == "tensor(float8e4m3fn)"}
        self._outputs = [o.name for o in self.session.get_outputs()]
        self.io = io_from_onnx(Path(onnx_path))
        self.cache: HostKVCache | None = None
        self.block_allocator = block_allocator

    def _widened_session(self, onnx_path: Path, opts, providers, int4: bool):
        """The session over the widened graph; its FP32 weights pass through a scratch file (under
        $LLMC_SCRATCH_DIR, else the system temp dir) that is deleted once the session holds them.
        Without a usable scratch folder they stay arrays in memory (2x while the session is created)."""
        import onnxruntime as ort

        with contextlib.ExitStack() as scratch_folder:  # kept until the session holds the weights
            wide = on_disk_or_none(
                lambda: widened(onnx_path, Path(scratch_folder.enter_context(scratch_directory("llmc-widened-"))), int4),
                "the widened FP32 weights", "they stay in memory, 2x while the onnxruntime session is created")
            if wide is None:
                wide = widened(onnx_path, int4=int4)
            self.widened, self.int4_matmuls = wide.matmuls, wide.int4_matmuls
            if _graph_bytes(onnx_path) > RELEASE_ABOVE:  # the loaded graph is garbage now, in cycles: at
                release_freed_memory()  # 1B INT4, 1 GB off the peak of the session's creation
            return ort.InferenceSession(wide.model_bytes, wide.session_options(opts), providers=providers)

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._types[name])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import onnxruntime as ort

        feeds = {k: np.ascontiguousarray(v, dtype=self._types[k]) for k, v in every_position(self.io, feeds).items()
                 if k in self._types}
        for name in self._fp8 & feeds.keys():  # FP8 bytes go in as FP8 tensors; FP8 outputs come back as uint8
            feeds[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(feeds[name], _FP8_E4M3)
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds)))

    def start(self, batch: int) -> None:
        self.cache = HostKVCache(self.io, batch, self.input_dtype(self.io.past_names[0]), self.block_allocator)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, logits_at: np.ndarray | None = None) -> np.ndarray:
        """One step over the started cache; `logits_at` [batch, n]: the positions whose logits come back
        (graphs after last-position-logits; default every position)."""
        out = self.run({**self.cache.feeds(input_ids, position_ids), **at(logits_at)})
        self.cache.update(out)
        return out["logits"].astype(np.float32)
