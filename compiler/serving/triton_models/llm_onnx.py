"""`llm_onnx` (decoupled): token ids in, token ids out, llmc's generation over model.onnx with onnxruntime.

For clients that tokenize themselves, and for `generate` where `llm` (the same model over model.plan,
llm.py) could not load. Requests go to llmc's in-flight scheduler (inflight.py): concurrent clients share
every graph call and each new token goes back as one response, sent from the scheduler's thread. The
scheduler (and its copy of the weights) starts with the first request: in a CPU-fallback repository
`generate` usually runs its own. `llmc_scheduler_max_batch` 0 (or a graph whose cache grows by Concat)
serves one request's whole generation after another with the plain runner, as before the scheduler.
"""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.runtime.runner import Runner, Sampling
from compiler.serving.triton_models.common import (RequestError, answer_errors, ids_tensor, model_config,
                                                   no_scheduler_for, parameter, scalar, speculate, version_dir)
from compiler.serving.triton_models.inflight import FINAL, InflightModel, quiet, scheduler_limits, static_batching


def token_list(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


class TritonPythonModel:
    name = "llm_onnx"

    def initialize(self, args):
        config = model_config(args)
        self.path = version_dir(args) / "model.onnx"
        self.threads = int(parameter(config, "llmc_intra_op_threads", "0")) or None
        self.pad = int(parameter(config, "llmc_pad_token_id", "0"))
        self.stop_tokens = token_list(parameter(config, "llmc_stop_token_ids", ""))
        self.max_batch, self.per_step = scheduler_limits(config)
        self.static = static_batching(config)
        self.inflight = self.runner = None
        self.lock = threading.Lock()

    def _executor(self):
        # No spinning: between steps the cores belong to the server and the other models' stubs.
        return OnnxRuntimeExecutor(self.path, threads=self.threads, spin=False)

    def _start(self) -> None:
        with self.lock:
            if self.inflight is not None or self.runner is not None:
                return
            executor = self._executor()
            if self.max_batch > 0:
                try:
                    self.inflight = InflightModel(executor, self.name, self.max_batch, self.per_step, self.pad,
                                                  static=self.static)
                    return
                except ValueError as exc:  # a Concat-grown cache (no fixed rows to schedule)
                    pb_utils.Logger.log_warn(f"{self.name}: no in-flight scheduler ({exc}); one request at a time")
            self.runner = Runner(executor, pad_token_id=self.pad)

    def _submit(self, request, sender) -> None:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1).tolist()
        self.inflight.submit(sender, ids, int(scalar(request, "max_tokens", 16)), _sampling(request), self.stop_tokens,
                             on_token=lambda token: quiet(lambda: sender.send(
                                 pb_utils.InferenceResponse([ids_tensor("output_ids", [token])]))),
                             on_done=lambda handle: quiet(lambda: sender.send(flags=FINAL)),
                             name=request.request_id(), speculate=speculate(request))

    def _generate(self, request, sender) -> None:
        """One at a time: this request's whole generation before the next."""
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1).tolist()
        no_scheduler_for(speculate(request), self.name)
        try:
            stream = self.runner.stream([ids], int(scalar(request, "max_tokens", 16)), _sampling(request),
                                        self.stop_tokens)
            for new in stream:
                if new[0] is not None:
                    sender.send(pb_utils.InferenceResponse([ids_tensor("output_ids", [new[0]])]))
        except ValueError as exc:  # the runner's capacity / argument checks
            raise RequestError(str(exc)) from exc
        sender.send(flags=FINAL)

    def execute(self, requests):
        self._start()
        for request in requests:
            sender = request.get_response_sender()
            work = self._submit if self.inflight is not None else self._generate
            answer_errors(sender, self.name, lambda: work(request, sender))
        return None

    def finalize(self):
        if self.inflight is not None:
            self.inflight.close()


def _sampling(request) -> Sampling:
    return Sampling(float(scalar(request, "temperature", 0.0)), int(scalar(request, "top_k", 0)),
                    int(scalar(request, "seed", 0)))
