"""`llm_onnx` (decoupled): llmc's generation runner over the compiled model.onnx with onnxruntime.

The same prefill/decode loop `llmc generate` runs, streaming one token per response, so a
repository serves (and is tested end to end) on machines without TensorRT. Requests are served
one after another by each instance; every response carries one new token.
"""

from __future__ import annotations

import triton_python_backend_utils as pb_utils

from compiler.runtime.runner import Runner, Sampling
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.serving.triton_models.common import RequestError, error_response, ids_tensor, model_config, parameter, scalar, version_dir

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def token_list(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        threads = int(parameter(config, "llmc_intra_op_threads", "0")) or None
        # No spinning: between steps the cores belong to the server and the other models' stubs.
        executor = OnnxRuntimeExecutor(version_dir(args) / "model.onnx", threads=threads, spin=False)
        self.runner = Runner(executor, pad_token_id=int(parameter(config, "llmc_pad_token_id", "0")))
        self.stop_tokens = token_list(parameter(config, "llmc_stop_token_ids", ""))

    def _generate(self, request, sender) -> None:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1).tolist()
        sampling = Sampling(float(scalar(request, "temperature", 0.0)), int(scalar(request, "top_k", 0)),
                            int(scalar(request, "seed", 0)))
        max_tokens = int(scalar(request, "max_tokens", 16))
        try:
            stream = self.runner.stream([ids], max_tokens, sampling, self.stop_tokens)
            for new in stream:
                if new[0] is not None:
                    sender.send(pb_utils.InferenceResponse([ids_tensor("output_ids", [new[0]])]))
        except ValueError as exc:  # the runner's capacity / argument checks
            raise RequestError(str(exc)) from exc
        sender.send(flags=FINAL)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self._generate(request, sender)
            except RequestError as exc:
                sender.send(error_response(str(exc)), flags=FINAL)
            except Exception as exc:  # noqa: BLE001 - a bug must still end the stream, or the client waits forever
                pb_utils.Logger.log_error(f"{type(exc).__name__}: {exc}")
                sender.send(error_response(f"internal error in llm_onnx: {type(exc).__name__}: {exc}"), flags=FINAL)
        return None
