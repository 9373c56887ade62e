"""`generate` (BLS, decoupled): text in, text out, streamed token by token.

preprocessing -> generation -> postprocessing, in Python rather than as an ensemble because the
engine route is a loop (prefill, then one `llm` call per token, each sampling from the last
logits), which an ensemble DAG can't express, and because one model then serves both of
Triton's endpoints: `/generate` (stream false: one response with the whole text) and
`/generate_stream` (stream true: one response per text increment).

Generation goes to the first READY model of `llmc_targets` (`llm`, then `llm_onnx` where the
repository has the CPU fallback). Where `llm` is not ready at the first request (no TensorRT backend,
as on the bundled server) and the repository has the CPU fallback, generation runs here instead, in llmc's in-flight scheduler over llm_onnx's model.onnx
(inflight.py): concurrent clients share every graph call, and no token crosses a process boundary
before its response. On `llm` the KV cache is the Triton sequence's implicit state
(see triton_repo.py), stepped by llmc's own runner through `TritonEngineExecutor`. Streamed text is
the full decode of the tokens so far minus what was already sent, held back while it ends in an
incomplete UTF-8 character; the end of the stream is checked against `postprocessing`'s text, so
the increments concatenate to exactly the non-streamed text.
"""

from __future__ import annotations

import itertools
import json
import os
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from compiler.runtime.runner import Runner, Sampling
from compiler.serving.triton_models import engine_version
from compiler.serving.triton_models.common import (RequestError, answer_errors, call, error_response, model_config,
                                                   no_scheduler_for, parameter, scalar, speculate, text,
                                                   version_dir)
from compiler.serving.triton_models.inflight import InflightModel, quiet, scheduler_limits, static_batching
from compiler.serving.triton_models.tokenizer import ServingTokenizer
from compiler.graph_io import GraphIO

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_IDS = itertools.count(1)


def host_memory():
    """`PreferredMemory(TRITONSERVER_MEMORY_CPU, 0)`, for BLS requests whose outputs are read with `as_numpy()`.

    Without `preferred_memory` "the output tensors will be allocated on the same device where the output
    tensors were received from the model" (python_backend README.md:1356 at f9088ff), which for the TensorRT
    backend is the GPU, and `as_numpy()` raises on a GPU tensor ("Tensor is stored in GPU and cannot be
    converted to NumPy.", src/pb_tensor.cc:585). The runner samples on the host, so one copy of the logits per
    step is what it needs anyway. Built when used, not at import: the stub sets `PreferredMemory` on
    pb_utils (src/pb_stub.cc:471) only after importing the model's module (nvidia-pytriton 0.7.0's stub: absent
    while model.py imports, present in `initialize`).
    """
    return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)


class TritonEngineExecutor:
    """The runner's executor interface over the `llm` model: one Triton sequence per generation.

    Triton keeps the KV cache between steps as the sequence's implicit state (zeroed at
    SEQUENCE_START), so only token ids, positions and logits cross the model boundary.
    """

    name = "tensorrt (Triton model llm)"

    def __init__(self, io: GraphIO, model: str = "llm"):
        self.io = io
        self.host_memory = host_memory()
        self.model = model
        self.correlation_id = 0
        self.steps = 0

    def start(self, batch: int) -> None:
        if batch != 1:
            raise ValueError("the Triton llm route generates one sequence per request")
        self.close()
        self.correlation_id = (os.getpid() << 32) + next(_IDS)
        self.steps = 0

    def _infer(self, input_ids: np.ndarray, position_ids: np.ndarray, flags: int) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=self.model, requested_output_names=["logits"], correlation_id=self.correlation_id, flags=flags,
            preferred_memory=self.host_memory,
            inputs=[pb_utils.Tensor("input_ids", np.ascontiguousarray(input_ids, np.int64)),
                    pb_utils.Tensor("position_ids", np.ascontiguousarray(position_ids, np.int64))])
        response = request.exec()
        if response.has_error():
            raise RequestError(f"{self.model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, "logits").as_numpy().astype(np.float32)

    def step(self, input_ids: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        flags = pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START if self.steps == 0 else 0
        self.steps += 1
        return self._infer(input_ids, position_ids, flags)

    def close(self) -> None:
        """End the sequence (frees its slot and state) with a throwaway one-token step."""
        if self.steps:
            self._infer(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64),
                        pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END)
            self.steps = 0


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.targets = [t for t in parameter(config, "llmc_targets").split(",") if t]
        self.io = GraphIO(**json.loads(parameter(config, "llmc_graph_io")))
        self.pad = int(parameter(config, "llmc_pad_token_id", "0"))
        self.stop_tokens = tuple(int(t) for t in parameter(config, "llmc_stop_token_ids", "").split(",") if t)
        self.default_max_tokens = int(parameter(config, "llmc_default_max_tokens", "64"))
        if "llm" in self.targets:  # refuse to serve an engine this server's TensorRT can't run
            host_memory()  # a stub without it (python_backend < 23.04) fails here, at load, not per request
            backend = parameter(config, "llmc_engine_backend")
            built = parameter(config, "llmc_engine_version")
            running = engine_version.runtime_version(backend)
            engine_version.check(backend, built, running)
            if running is None:
                pb_utils.Logger.log_warn(f"no {backend} found by the generate model: llm can't load here"
                                         f"{'; generation uses llm_onnx' if 'llm_onnx' in self.targets else ''}")
        self.target = None
        self.threads: list[threading.Thread] = []
        # Stream increments are detokenized here: a postprocessing call per streamed token cut decode
        # to ~50 tokens/s on 2 loaded cores (benchmarks/NOTES.md); the full text still comes from postprocessing.
        self.tokenizer = ServingTokenizer(version_dir(args) / "tokenizer")
        self.inflight = None
        self.limits = scheduler_limits(config)
        self.static = static_batching(config)
        self.onnx = version_dir(args).parent.parent / "llm_onnx" / "1" / "model.onnx"
        self.threads_per_op = int(parameter(config, "llmc_intra_op_threads", "0")) or None

    def _start_inflight(self) -> None:
        """At the first request, once every model has loaded: the in-process scheduler where llm_onnx serves."""
        if self.target is not None:
            return
        if self._target() == "llm_onnx" and self.limits[0] > 0 and self.onnx.is_file():
            try:
                self.inflight = InflightModel(self.onnx, "generate", *self.limits, self.pad, self.threads_per_op,
                                              static=self.static)
            except ValueError as exc:  # a Concat-grown cache (no fixed rows to schedule), an unreadable model
                pb_utils.Logger.log_warn(f"generate: no in-flight scheduler ({exc}); generating through llm_onnx")

    def _target(self) -> str:
        if self.target is None:
            ready = [t for t in self.targets if pb_utils.is_model_ready(t)]
            if not ready:
                raise RequestError(f"none of the generation models {self.targets} is ready (see the server log)")
            self.target = ready[0]
        return self.target

    def _tokens(self, ids: np.ndarray, max_tokens: int, sampling: Sampling, k: int = 0):
        """New token ids one at a time, from whichever generation model serves."""
        target = self._target()
        if target == "llm":
            no_scheduler_for(k, "llm")
            executor = TritonEngineExecutor(self.io)
            try:
                for new in Runner(executor, pad_token_id=self.pad).stream(
                        [ids.tolist()], max_tokens, sampling, self.stop_tokens):
                    if new[0] is not None:
                        yield new[0]
            except ValueError as exc:
                raise RequestError(str(exc)) from exc
            finally:
                executor.close()
            return
        inputs = [pb_utils.Tensor("input_ids", ids.astype(np.int64)),
                  pb_utils.Tensor("max_tokens", np.array([max_tokens], np.int32)),
                  pb_utils.Tensor("temperature", np.array([sampling.temperature], np.float32)),
                  pb_utils.Tensor("top_k", np.array([sampling.top_k], np.int32)),
                  pb_utils.Tensor("seed", np.array([sampling.seed], np.int64)),
                  pb_utils.Tensor("speculate", np.array([k], np.int32))]
        request = pb_utils.InferenceRequest(model_name=target, requested_output_names=["output_ids"], inputs=inputs)
        for response in request.exec(decoupled=True):
            if response.has_error():
                raise RequestError(f"{target}: {response.error().message()}")
            out = pb_utils.get_output_tensor_by_name(response, "output_ids")
            if out is not None:
                yield from out.as_numpy().reshape(-1).tolist()

    def _detokenize(self, ids: list[int]) -> str:
        (out,) = call("postprocessing", [pb_utils.Tensor("output_ids", np.array(ids, np.int64))], ["text_output"])
        return out.reshape(-1)[0].decode("utf-8")

    def _parse(self, request):
        """(prompt ids, max new tokens, stream?, sampling, speculate) of a request, tokenized by preprocessing."""
        prompt = text(request, "text_input")
        stream = bool(scalar(request, "stream", False))
        sampling = Sampling(float(scalar(request, "temperature", 0.0)), int(scalar(request, "top_k", 0)),
                            int(scalar(request, "seed", 0)))
        if sampling.temperature < 0 or sampling.top_k < 0:
            raise RequestError("temperature and top_k must be >= 0")
        ids, max_tokens = call("preprocessing", [
            pb_utils.Tensor("text_input", np.array([prompt.encode("utf-8")], dtype=object)),
            pb_utils.Tensor("max_tokens", np.array([scalar(request, "max_tokens", self.default_max_tokens)], np.int32)),
        ], ["input_ids", "max_tokens"])
        return ids.reshape(-1).tolist(), int(max_tokens.reshape(-1)[0]), stream, sampling, speculate(request)

    def _serve(self, request, sender) -> None:
        ids, max_tokens, stream, sampling, k = self._parse(request)
        generated: list[int] = []
        sent = ""
        for token in self._tokens(np.array(ids, np.int64), max_tokens, sampling, k):
            generated.append(token)
            if stream:
                decoded = self.tokenizer.decode(generated)
                if decoded.startswith(sent) and len(decoded) > len(sent) and not decoded.endswith("\ufffd"):
                    sender.send(_text_response(decoded[len(sent):]))
                    sent = decoded
        decoded = self._detokenize(generated)
        if not stream:
            sender.send(_text_response(decoded), flags=FINAL)
            return
        if not decoded.startswith(sent):
            raise RequestError("detokenized text changed after it was streamed (tokenizer clean-up); "
                               "use stream false for this model")
        if len(decoded) > len(sent):
            sender.send(_text_response(decoded[len(sent):]))
        sender.send(flags=FINAL)

    def _submit(self, request, sender) -> None:
        """Tokenize (preprocessing) and hand the request to the in-process scheduler; its thread answers."""
        ids, max_tokens, stream, sampling, k = self._parse(request)
        text_stream = _TextStream(self.tokenizer, sender, stream)
        self.inflight.submit(sender, ids, max_tokens, sampling,
                             self.stop_tokens, text_stream.token, text_stream.done, request.request_id(), speculate=k)

    def _handle(self, request) -> None:
        sender = request.get_response_sender()
        answer_errors(sender, "generate", lambda: self._serve(request, sender))

    def execute(self, requests):
        """In-process scheduler: submit and return (its thread answers). Otherwise one thread per request:
        concurrent requests reach `llm` at once, so its sequence batcher can batch their decode steps (BLS
        calls wait outside the GIL)."""
        try:
            self._start_inflight()
        except RequestError:
            pass  # no generation model is ready: each request is told so below
        if self.inflight is not None:
            for request in requests:
                sender = request.get_response_sender()
                answer_errors(sender, "generate", lambda: self._submit(request, sender))
            return None
        self.threads = [t for t in self.threads if t.is_alive()]
        for request in requests:
            thread = threading.Thread(target=self._handle, args=(request,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return None

    def finalize(self):
        for thread in self.threads:
            thread.join(timeout=30)
        if self.inflight is not None:
            self.inflight.close()


class _TextStream:
    """One client's text, answered from the scheduler's thread: streamed increments as `_serve` makes them
    (the full decode so far minus what was sent, held back while it ends in an incomplete UTF-8 character),
    then the rest and the final flag; stream false: the whole text at the end. The end is decoded with the
    same tokenizer as `postprocessing`."""

    def __init__(self, tokenizer: ServingTokenizer, sender, stream: bool):
        self.tokenizer, self.sender, self.stream = tokenizer, sender, stream
        self.generated: list[int] = []
        self.sent = ""

    def token(self, token: int) -> bool:
        self.generated.append(token)
        if not self.stream:
            return True
        decoded = self.tokenizer.decode(self.generated)
        if decoded.startswith(self.sent) and len(decoded) > len(self.sent) and not decoded.endswith("\ufffd"):
            piece, self.sent = decoded[len(self.sent):], decoded
            return quiet(lambda: self.sender.send(_text_response(piece)))
        return True

    def done(self, handle) -> None:
        decoded = self.tokenizer.decode(self.generated)
        if not self.stream:
            quiet(lambda: self.sender.send(_text_response(decoded), flags=FINAL))
        elif not decoded.startswith(self.sent):
            quiet(lambda: self.sender.send(error_response(
                "detokenized text changed after it was streamed (tokenizer clean-up); use stream false for this "
                "model"), flags=FINAL))
        else:
            if len(decoded) > len(self.sent):
                quiet(lambda: self.sender.send(_text_response(decoded[len(self.sent):])))
            quiet(lambda: self.sender.send(flags=FINAL))


def _text_response(piece: str):
    return pb_utils.InferenceResponse([pb_utils.Tensor("text_output", np.array([piece.encode("utf-8")], dtype=object))])
