"""Executor over model.plan with the TensorRT runtime (real code; needs a GPU TensorRT can run on).

Deserializes the engine, sets every input's shape per step, binds device buffers (torch CUDA
tensors) for inputs and outputs, and runs `execute_async_v3` on a CUDA stream. Where no runnable
TensorRT exists (no GPU, or TensorRT-RTX on a data-center GPU) it raises `ExecutionUnavailable`
with the reason; it never pretends to have run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .backend import Backend, get_backend


class ExecutionUnavailable(RuntimeError):
    """No TensorRT engine can execute on this machine; the message says why."""


class TensorRTExecutor:
    def __init__(self, plan_path: Path, backend: Backend | None = None):
        backend = backend or get_backend()
        reason = backend.execution_unavailable_reason()
        if reason:
            raise ExecutionUnavailable(reason)
        import torch

        trt = backend.trt
        self._torch = torch
        self._trt = trt
        self.logger = trt.Logger(trt.Logger.ERROR)
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

    def input_dtype(self, name: str) -> np.dtype:
        return np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name)))

    def _bind(self, name: str, tensor) -> None:
        # A zero-size tensor (empty past at prefill) still needs a valid, non-null address.
        ptr = tensor.data_ptr() if tensor.numel() else self._dummy.data_ptr()
        self.context.set_tensor_address(name, ptr)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        self._dummy = torch.empty(16, dtype=torch.uint8, device="cuda")
        keep = []
        for name in self.inputs:
            arr = np.ascontiguousarray(feeds[name], dtype=self.input_dtype(name))
            tensor = torch.from_numpy(arr).to("cuda", non_blocking=False)
            keep.append(tensor)
            if not self.context.set_input_shape(name, tuple(arr.shape)):
                raise ValueError(f"shape {arr.shape} for {name} is outside the engine's optimization profile")
            self._bind(name, tensor)
        missing = self.context.infer_shapes()
        if missing:
            raise ValueError(f"TensorRT could not infer output shapes; unset inputs: {missing}")
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = torch.from_numpy(np.empty(0, dtype=np.dtype(self._trt.nptype(self.engine.get_tensor_dtype(name))))).dtype
            tensor = torch.empty(shape, dtype=dtype, device="cuda")
            results[name] = tensor
            self._bind(name, tensor)
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        self.stream.synchronize()
        return {name: t.cpu().numpy() for name, t in results.items()}
