"""`llm_onnx` (decoupled): llmc's generation over the compiled model.onnx with onnxruntime, in-flight batched.

Every request is handed to one in-flight scheduler (compiler/runtime/scheduler.py) that runs on its
own thread: concurrent clients share each graph call (a decode row each, prompts chunked in beside
them), and every new token goes straight back as one response. `execute` only submits and returns,
which a decoupled Python model may do: its response senders stay usable from any thread.

Config parameters: `llmc_scheduler_max_batch` (sequences in flight; 0 serves one request's whole
generation after another with the plain runner, as before the scheduler), `llmc_scheduler_tokens_per_step`
(real tokens per graph call). A graph without a fixed-capacity cache (Concat-grown) falls back to
one at a time.

Cancellation: the scheduler polls each client's `is_cancelled()` (Triton marks a request cancelled
when its gRPC stream is cancelled or the client goes away) and frees its cache row at the next step.
A BLS caller (the `generate` model) cannot cancel the request it sent (the 2.51 Python backend's
response iterator has no cancel), so it sends a second request with `cancel` true and the same
request id; that one ends the first and is answered with an empty final response.
"""

from __future__ import annotations

import threading

import triton_python_backend_utils as pb_utils

from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.runtime.runner import Runner, Sampling
from compiler.runtime.scheduler import Request, Scheduler
from compiler.serving.triton_models.common import RequestError, error_response, ids_tensor, model_config, parameter, scalar, version_dir

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MAX_BATCH = 16
DEFAULT_TOKENS_PER_STEP = 256


def token_list(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t.strip())


def _quiet(send) -> bool:
    """Send, and say whether it went: a client that went away must not stop the scheduler's thread."""
    try:
        send()
        return True
    except Exception as exc:  # noqa: BLE001 - the sender's errors (closed, cancelled) all mean the same here
        pb_utils.Logger.log_warn(f"llm_onnx: a response could not be sent ({type(exc).__name__}: {exc})")
        return False


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        threads = int(parameter(config, "llmc_intra_op_threads", "0")) or None
        # No spinning: between steps the cores belong to the server and the other models' stubs.
        executor = OnnxRuntimeExecutor(version_dir(args) / "model.onnx", threads=threads, spin=False)
        pad = int(parameter(config, "llmc_pad_token_id", "0"))
        self.stop_tokens = token_list(parameter(config, "llmc_stop_token_ids", ""))
        max_batch = int(parameter(config, "llmc_scheduler_max_batch", str(DEFAULT_MAX_BATCH)))
        per_step = int(parameter(config, "llmc_scheduler_tokens_per_step", str(DEFAULT_TOKENS_PER_STEP)))
        self.scheduler = self.runner = None
        self.in_flight: dict[str, object] = {}  # request id -> Handle, for the BLS caller's cancel requests
        self.lock = threading.Lock()
        if max_batch > 0 and executor.io.capacity is not None:
            self.scheduler = Scheduler(executor, max_batch=max_batch, max_tokens_per_step=max(per_step, max_batch),
                                       pad_token_id=pad)
            self.stop = threading.Event()
            self.thread = threading.Thread(target=self.scheduler.serve_forever, args=(self.stop,), daemon=True,
                                           name="llmc-scheduler")
            self.thread.start()
            pb_utils.Logger.log_info(f"llm_onnx: in-flight batching, up to {max_batch} sequences and "
                                     f"{self.scheduler.max_tokens_per_step} tokens per step")
        else:
            self.runner = Runner(executor, pad_token_id=pad)
            pb_utils.Logger.log_info("llm_onnx: one request at a time" + (
                "" if max_batch <= 0 else " (the graph's cache grows by Concat: no fixed rows to schedule)"))

    # --- in-flight -----------------------------------------------------------------------------------
    def _submit(self, request, sender) -> None:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1).tolist()
        request_id = request.request_id()
        submitted = []  # the handle, once submit returns (tokens can come before it does)

        def on_token(token: int) -> None:
            if not _quiet(lambda: sender.send(pb_utils.InferenceResponse([ids_tensor("output_ids", [token])]))):
                for handle in submitted:
                    handle.cancel()

        def on_finish(done) -> None:
            with self.lock:
                if request_id and self.in_flight.get(request_id) is done:
                    del self.in_flight[request_id]
            pb_utils.Logger.log_info(f"llm_onnx: request {request_id or done.id} {done.finish_reason} after "
                                     f"{len(done.tokens)} of {done.request.max_tokens} tokens, in graph calls of up to "
                                     f"{done.peak_rows} sequences; its cache row is free")
            if done.finish_reason == "error":
                pb_utils.Logger.log_error(f"llm_onnx: {done.error}")
                _quiet(lambda: sender.send(error_response(f"internal error in llm_onnx: {done.error}"), flags=FINAL))
            else:
                _quiet(lambda: sender.send(flags=FINAL))

        max_tokens, sampling = int(scalar(request, "max_tokens", 16)), _sampling(request)
        with self.lock:  # registered before on_finish (which takes the lock) can look for it
            try:
                handle = self.scheduler.submit(Request(ids, max_tokens, sampling, self.stop_tokens, on_token=on_token,
                                                       on_finish=on_finish, client_gone=sender.is_cancelled))
            except ValueError as exc:  # the scheduler's capacity / argument checks
                raise RequestError(str(exc)) from exc
            submitted.append(handle)
            if request_id:
                self.in_flight[request_id] = handle

    def _cancel(self, request, sender) -> None:
        with self.lock:
            handle = self.in_flight.get(request.request_id())
        if handle is not None:
            handle.cancel()
        sender.send(flags=FINAL)

    # --- one at a time -------------------------------------------------------------------------------
    def _generate(self, request, sender) -> None:
        ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().reshape(-1).tolist()
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
        for request in requests:
            sender = request.get_response_sender()
            try:
                if bool(scalar(request, "cancel", False)):
                    self._cancel(request, sender)
                elif self.scheduler is not None:
                    self._submit(request, sender)
                else:
                    self._generate(request, sender)
            except RequestError as exc:
                sender.send(error_response(str(exc)), flags=FINAL)
            except Exception as exc:  # noqa: BLE001 - a bug must still end the stream, or the client waits forever
                pb_utils.Logger.log_error(f"{type(exc).__name__}: {exc}")
                sender.send(error_response(f"internal error in llm_onnx: {type(exc).__name__}: {exc}"), flags=FINAL)
        return None

    def finalize(self):
        if self.scheduler is not None:
            self.stop.set()
            self.thread.join(timeout=10)
            self.scheduler.abort("the server is shutting down")


def _sampling(request) -> Sampling:
    return Sampling(float(scalar(request, "temperature", 0.0)), int(scalar(request, "top_k", 0)),
                    int(scalar(request, "seed", 0)))
