"""Executor over model.plan with the TensorRT runtime (real code; needs a GPU TensorRT can run on).

Deserializes the engine, sets every input's shape per step, binds device buffers (torch CUDA
tensors) for inputs and outputs, and runs `execute_async_v3` on a CUDA stream. For generation the
KV cache stays on the device: each `present.{i}.*` output is bound to the address of its
`past_key_values.{i}.*` input, so KV_CACHE_UPDATE writes the new entries in place and only the
logits come back to the host (a paged engine's pools likewise, with its block tables uploaded with
each step's ids; not run here: paged engines need the llmc plugins of full TensorRT). Where no runnable
TensorRT exists (no GPU, or TensorRT-RTX on a data-center GPU) it raises `ExecutionUnavailable`
with the reason; it never pretends to have run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compiler.engine.backend import Backend, get_backend
from compiler.engine.trt_logger import process_logger
from compiler.graph_io import io_from_shapes
from compiler.runtime.executor import BlockAllocator, at, block_tables_for, cache_shape, every_position
from compiler.graph_io import BLOCK_TABLES


def torch_dtypes(trt, torch) -> dict:
    """TensorRT DataType -> torch dtype, for the device buffers bound to an engine's tensors.

    Not through `trt.nptype`: it raises TypeError for BF16 and FP8 ("Could not resolve TensorRT datatype
    to an equivalent numpy datatype"; numpy has neither), which are a BF16 engine's I/O and the fp8kv
    recipe's cache. torch has both, with the same element sizes as TensorRT's `DataType.itemsize`."""
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "fp8": torch.float8_e4m3fn, "int8": torch.int8, "uint8": torch.uint8, "int32": torch.int32,
             "int64": torch.int64, "bool": torch.bool}
    return {getattr(trt, name): dtype for name, dtype in names.items() if hasattr(trt, name)}


def host_dtype(dtype) -> np.dtype:
    """What a tensor of torch `dtype` is on the host: FP8 as its bytes (uint8, as compiler/runtime/onnx_executor.py
    carries the FP8 cache), BF16 widened to float32 (exact); the rest as numpy's own."""
    import torch

    if dtype == torch.float8_e4m3fn:
        return np.dtype(np.uint8)
    if dtype == torch.bfloat16:
        return np.dtype(np.float32)
    return torch.empty(0, dtype=dtype).numpy().dtype


def to_device(array: np.ndarray, dtype, device: str = "cuda"):
    """A host array (in `host_dtype(dtype)`) as a contiguous torch tensor of `dtype` on `device`."""
    import torch

    host = torch.from_numpy(np.ascontiguousarray(array, dtype=host_dtype(dtype)))
    if dtype == torch.float8_e4m3fn:
        return host.view(dtype).to(device)  # the bytes, reinterpreted
    return host.to(device=device, dtype=dtype)


def to_host(tensor) -> np.ndarray:
    """A torch tensor as a numpy array in `host_dtype(tensor.dtype)`."""
    import torch

    if tensor.dtype == torch.float8_e4m3fn:
        return tensor.cpu().view(torch.uint8).numpy()
    if tensor.dtype == torch.bfloat16:
        return tensor.float().cpu().numpy()
    return tensor.cpu().numpy()


class ExecutionUnavailable(RuntimeError):
    """No TensorRT engine can execute on this machine; the message says why."""


class TensorRTExecutor:
    def __init__(self, plan_path: Path, backend: Backend | None = None, block_allocator: BlockAllocator | None = None):
        backend = backend or get_backend()
        reason = backend.execution_unavailable_reason()
        if reason:
            raise ExecutionUnavailable(reason)
        import torch

        trt = backend.trt
        self._torch = torch
        self._trt = trt
        self.logger = process_logger(trt)  # TensorRT keeps the first logger for the process (trt_logger.py)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
        if self.engine is None:
            raise ExecutionUnavailable(
                f"{backend.name} {backend.version} could not deserialize {plan_path} "
                "(engines load only in the TensorRT version and GPU family that built them)"
            )
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.name = f"{backend.name} {backend.version}"
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        shapes = {n: [int(d) if d >= 0 else "dynamic" for d in self.engine.get_tensor_shape(n)] for n in names}
        self.io = io_from_shapes({n: shapes[n] for n in self.inputs}, {n: shapes[n] for n in self.outputs})
        self.cache: dict | None = None
        self.cache_on_device = True  # the scheduler's cache managers: compiler/runtime/device_cache.py
        self.block_allocator = block_allocator
        self.block_tables = None

    def input_dtype(self, name: str) -> np.dtype:
        """The host dtype of a tensor's values (FP8: its bytes as uint8; BF16: float32), see host_dtype."""
        return host_dtype(self._torch_dtype(name))

    def _torch_dtype(self, name: str):
        dtype = self.engine.get_tensor_dtype(name)
        table = torch_dtypes(self._trt, self._torch)
        if dtype not in table:
            raise ValueError(f"engine tensor {name} is {dtype}, which llmc's TensorRT executor cannot bind")
        return table[dtype]

    def cache_buffers(self, shape: tuple[int, ...]) -> dict:
        """Zeroed device tensors of `shape`, one per past input, in the engine's cache dtype: the memory the
        scheduler's device cache manager (compiler/runtime/device_cache.py) hands back to `run_in_place`."""
        return {n: self._torch.zeros(shape, dtype=self._torch_dtype(n), device="cuda") for n in self.io.past_names}

    def start(self, batch: int) -> None:
        """Zeroed device cache buffers [batch, kv_heads, capacity, head_dim] (paged: pools of batch x max_blocks
        blocks and the block tables), one per past input."""
        io = self.io
        self.cache = self.cache_buffers(cache_shape(io, batch))
        self.block_tables = None
        if io.paged:
            self.block_tables = block_tables_for(io, batch, self.block_allocator)

    def _set_input(self, name: str, tensor) -> None:
        if not self.context.set_input_shape(name, tuple(tensor.shape)):
            raise ValueError(f"shape {tuple(tensor.shape)} for {name} is outside the engine's optimization profile")
        self.context.set_tensor_address(name, tensor.data_ptr())

    def run_in_place(self, feeds: dict[str, np.ndarray], cache: dict) -> np.ndarray:
        """One forward pass over `cache` (past name -> device tensor, e.g. a run of a larger buffer's rows):
        each `present.*` output is bound to its past tensor's address, so the engine's KVCacheUpdate writes
        there (in place); the small host inputs (ids, positions, block tables) are uploaded; only the logits
        come back, as float32 on the host."""
        torch = self._torch
        keep = []
        for name, arr in every_position(self.io, feeds).items():
            tensor = to_device(arr, self._torch_dtype(name))
            keep.append(tensor)
            self._set_input(name, tensor)
        for past, present in zip(self.io.past_names, self.io.present_names):
            buf = cache[past]
            if not buf.is_contiguous():  # TensorRT binds an address with the engine's packed strides
                raise ValueError(f"{past}: the cache tensor bound in place must be contiguous")
            self._set_input(past, buf)
            self.context.set_tensor_address(present, buf.data_ptr())  # in place
        logits = torch.empty(tuple(self.context.get_tensor_shape("logits")), dtype=self._torch_dtype("logits"),
                             device="cuda")
        self.context.set_tensor_address("logits", logits.data_ptr())
        self.stream.wait_stream(torch.cuda.current_stream())  # uploads and cache zero-fill ran on the default stream
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return logits.float().cpu().numpy()

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray, logits_at: np.ndarray | None = None) -> np.ndarray:
        """One forward pass with the cache of `start` updated in place (outputs aliased to inputs)."""
        feeds = {"input_ids": input_ids, "position_ids": position_ids, **at(logits_at)}
        if self.block_tables is not None:
            feeds[BLOCK_TABLES] = self.block_tables
        return self.run_in_place(feeds, self.cache)

    def _bind(self, name: str, tensor) -> None:
        # A zero-size tensor (empty past at prefill) still needs a valid, non-null address.
        ptr = tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr()
        self.context.set_tensor_address(name, ptr)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        self._dummy = torch.empty(16, dtype=torch.uint8, device="cuda")
        keep = []
        feeds = every_position(self.io, feeds)
        for name in self.inputs:
            tensor = to_device(feeds[name], self._torch_dtype(name))
            keep.append(tensor)
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(f"shape {tuple(tensor.shape)} for {name} is outside the engine's optimization profile")
            self._bind(name, tensor)
        missing = self.context.infer_shapes()
        if missing:
            raise ValueError(f"TensorRT could not infer output shapes; unset inputs: {missing}")
        results = {}
        aliased = dict(zip(self.io.present_names, self.io.past_names)) if self.io.capacity is not None else {}
        for name in self.outputs:
            if name in aliased:  # KV_CACHE_UPDATE outputs must share the cache input's memory (in place)
                tensor = keep[self.inputs.index(aliased[name])]
                results[name] = tensor
                self._bind(name, tensor)
                continue
            shape = tuple(self.context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            results[name] = tensor
            self._bind(name, tensor)
        self.stream.wait_stream(torch.cuda.current_stream())
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return {name: to_host(t) for name, t in results.items()}
