"""`llm` (decoupled): token ids in, token ids out, llmc's generation over model.plan with TensorRT.

The engine runs in this model's own stub through llmc's TensorRT executor
(compiler/runtime/trt_executor.py), driven by the in-flight scheduler as `llm_onnx` is (inflight.py),
with the KV cache resident on the GPU: the scheduler's cache manager is device_cache.py's, whose
buffers are the executor's device tensors, bound as `past_key_values.*` AND `present.*` so the
engine's KVCacheUpdate writes in place; per step only ids and positions go up and the logits come
back. Not a `tensorrt_plan` model: Triton's TensorRT backend gives a state input and its output
separate buffers and copies between them around every request (tensorrt_backend
src/instance_state.cc; model_config.proto State: "Without this option, Triton allocates separate
buffers for input and output state"), which KVCacheUpdate's in-place contract forbids, and a
whole cache per sequence per token is what the README's serving section counts against this design.

The executor is made at load, so a server without a GPU TensorRT can run on marks `llm` UNAVAILABLE
with the executor's reason (ExecutionUnavailable), and `generate` uses `llm_onnx`. Not run here: no
engine runs on this machine (benchmarks/NOTES.md, "verified by reading").
"""

from __future__ import annotations

from compiler.runtime.trt_executor import TensorRTExecutor
from compiler.serving.triton_models import llm_onnx
from compiler.serving.triton_models.common import version_dir


class TritonPythonModel(llm_onnx.TritonPythonModel):
    name = "llm"

    def initialize(self, args):
        super().initialize(args)
        self.path = version_dir(args) / "model.plan"
        if args.get("model_instance_kind") == "GPU":  # Triton's placement of this instance
            import torch

            if torch.cuda.is_available():
                torch.cuda.set_device(int(args["model_instance_device_id"]))
        self._start()  # at load: ExecutionUnavailable (and a plan this TensorRT can't read) fail the load

    def _executor(self):
        return TensorRTExecutor(self.path)
