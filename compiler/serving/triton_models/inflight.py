"""The in-flight scheduler inside a Triton Python model, with every call into the server on one thread.

`llm` (model.plan, llmc's TensorRT executor, the cache on the GPU), `llm_onnx` (model.onnx,
onnxruntime, the cache in host memory) and `generate` (text in, text out, the onnxruntime route
in-process) run llmc's scheduler (compiler/runtime/scheduler.py) over the executor they are given:
one code path, the cache manager chosen by where the executor keeps its cache (kv_slots.cache_for).
Requests are submitted from `execute`, which returns at once (decoupled), and the scheduler's thread
steps all of them together.

Every response and every `is_cancelled()` of a streaming request is made from the scheduler's thread
(in `on_token` / `on_finish` and the scheduler's `client_gone` poll). Triton 2.51's Python stub is not
safe otherwise under load: with 64 concurrent streams, `generate` answering from one thread per
request while asking `is_cancelled()` (or streaming from a BLS call to `llm_onnx`) ended with a
corrupted stub heap (glibc "malloc_consolidate(): unaligned fastbin chunk detected", "corrupted size
vs. prev_size") or a tritonserver SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled, after which
every client waits (benchmarks/NOTES.md, issue 24). A request whose final response is sent is never
asked again: it has left the scheduler first.
"""

from __future__ import annotations

import threading
from typing import Callable

import triton_python_backend_utils as pb_utils

from compiler.runtime.runner import Sampling
from compiler.runtime.scheduler import Handle, Request, Scheduler
from compiler.serving.triton_models.common import RequestError, error_response, parameter

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
DEFAULT_MAX_BATCH = 16
DEFAULT_TOKENS_PER_STEP = 256


def scheduler_limits(config: dict) -> tuple[int, int]:
    """(max_batch, max_tokens_per_step) from the model config (`llmc_scheduler_*`); max_batch 0: no scheduler."""
    max_batch = int(parameter(config, "llmc_scheduler_max_batch", str(DEFAULT_MAX_BATCH)))
    per_step = int(parameter(config, "llmc_scheduler_tokens_per_step", str(DEFAULT_TOKENS_PER_STEP)))
    return max_batch, max(per_step, max_batch)


def static_batching(config: dict) -> bool:
    """`llmc_scheduler_policy` static: a new batch only when the last has finished (the comparison baseline)."""
    policy = parameter(config, "llmc_scheduler_policy", "inflight")
    if policy not in ("inflight", "static"):
        raise ValueError(f"llmc_scheduler_policy must be inflight or static (got {policy!r})")
    return policy == "static"


def quiet(send: Callable[[], None]) -> bool:
    """Send, and say whether it went: a client that went away must not stop the scheduler's thread."""
    try:
        send()
        return True
    except Exception as exc:  # noqa: BLE001 - the sender's errors (closed, cancelled) all mean the same here
        pb_utils.Logger.log_warn(f"a response could not be sent ({type(exc).__name__}: {exc})")
        return False


class InflightModel:
    """A scheduler over `executor` on its own thread; `submit` hands it a request and its response sender."""

    def __init__(self, executor, model: str, max_batch: int, max_tokens_per_step: int, pad_token_id: int,
                 static: bool = False):
        self.model = model
        self.scheduler = Scheduler(executor, max_batch=max_batch, max_tokens_per_step=max_tokens_per_step,
                                   pad_token_id=pad_token_id, static=static)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.scheduler.serve_forever, args=(self.stop,), daemon=True,
                                       name=f"llmc-scheduler-{model}")
        self.thread.start()
        pb_utils.Logger.log_info(f"{model}: {'static' if static else 'in-flight'} batching over {executor.name} "
                                 f"({type(self.scheduler.cache).__name__}), up to {max_batch} sequences and "
                                 f"{self.scheduler.max_tokens_per_step} tokens per step")

    def submit(self, sender, ids: list[int], max_tokens: int, sampling: Sampling, stop_tokens: tuple[int, ...],
               on_token: Callable[[int], bool], on_done: Callable[[Handle], None], name: str = "",
               speculate: int = 0) -> Handle:
        """on_token(token) sends (False: it could not, the client is gone); on_done(handle) sends the final
        response. Both run on the scheduler's thread, as does the `is_cancelled()` poll."""
        failed = threading.Event()

        def token(t: int) -> None:
            if not on_token(t):
                failed.set()  # seen by client_gone at the next poll

        def finish(handle: Handle) -> None:
            pb_utils.Logger.log_info(
                f"{self.model}: request {name or handle.id} {handle.finish_reason} after {len(handle.tokens)} of "
                f"{handle.request.max_tokens} tokens, in graph calls of up to {handle.peak_rows} sequences"
                + (f", {handle.accepted} of {handle.proposed} n-gram proposals accepted in {handle.verify_steps} "
                   "verify steps" if handle.request.speculate else "")
                + (f", {handle.prefix_reused} prompt positions found in the cache" if handle.prefix_reused else "")
                + "; its cache row is free")
            if handle.finish_reason == "error":
                pb_utils.Logger.log_error(f"{self.model}: {handle.error}")
                quiet(lambda: sender.send(error_response(f"internal error in {self.model}: {handle.error}"),
                                          flags=FINAL))
            elif handle.finish_reason == "cancelled":
                quiet(lambda: sender.send(flags=FINAL))
            else:
                on_done(handle)

        try:
            return self.scheduler.submit(Request(ids, max_tokens, sampling, stop_tokens, on_token=token,
                                                 on_finish=finish, speculate=speculate,
                                                 client_gone=lambda: failed.is_set() or sender.is_cancelled()))
        except ValueError as exc:  # the scheduler's capacity / argument checks
            raise RequestError(str(exc)) from exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.scheduler.abort("the server is shutting down")

