"""`generate` (BLS, decoupled): text in, text out, streamed token by token.

preprocessing -> generation -> postprocessing, in Python rather than as an ensemble because the
generation streams (a decoupled model answers one request with many responses), which an ensemble
of stateless steps doesn't express, and because one model then serves both of
Triton's endpoints: `/generate` (stream false: one response with the whole text) and
`/generate_stream` (stream true: one response per text increment).

Generation goes to the first READY model of `llmc_targets` (`llm`, then `llm_onnx` where the
repository has the CPU fallback). Where `llm` is not ready at the first request (no GPU that
TensorRT can run on: `llm` refuses to load, with the reason) and the repository has the CPU fallback, generation runs here instead, in llmc's in-flight scheduler over llm_onnx's model.onnx
(inflight.py): concurrent clients share every graph call, and no token crosses a process boundary
before its response. `llm` and `llm_onnx` take token ids and stream token ids back (both run llmc's
scheduler, see inflight.py), so this model calls either the same way (a decoupled BLS request; the
ids come back in host memory: a Python model's outputs are numpy arrays). Streamed text is
the full decode of the tokens so far minus what was already sent, held back while it ends in an
incomplete UTF-8 character; the end of the stream is checked against `postprocessing`'s text, so
the increments concatenate to exactly the non-streamed text.
"""

from __future__ import annotations

import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.runtime.runner import Sampling
from compiler.serving.triton_models import engine_version
from compiler.serving.triton_models.common import (RequestError, answer_errors, call, error_response, model_config,
                                                   parameter, scalar, speculate, text,
                                                   version_dir)
from compiler.serving.triton_models.inflight import InflightModel, quiet, scheduler_limits, static_batching
from compiler.serving.triton_models.tokenizer import ServingTokenizer

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = model_config(args)
        self.targets = [t for t in parameter(config, "llmc_targets").split(",") if t]
        self.pad = int(parameter(config, "llmc_pad_token_id", "0"))
        self.stop_tokens = tuple(int(t) for t in parameter(config, "llmc_stop_token_ids", "").split(",") if t)
        self.default_max_tokens = int(parameter(config, "llmc_default_max_tokens", "64"))
        if "llm" in self.targets:  # refuse to serve an engine this server's TensorRT can't run
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
                executor = OnnxRuntimeExecutor(self.onnx, threads=self.threads_per_op, spin=False)
                self.inflight = InflightModel(executor, "generate", *self.limits, self.pad, static=self.static)
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
        concurrent requests reach `llm` at once, so its scheduler steps them together (BLS calls wait
        outside the GIL)."""
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
