"""OpenAI-compatible `/v1/completions` and `/v1/chat/completions` in front of the Triton repository's `generate` model.

The LLM load generators (aiperf, genai-perf) and most client libraries speak the OpenAI HTTP API;
the Triton 2.51 server bundled in nvidia-pytriton has no OpenAI frontend (Triton's own lives in a
separate package built against a newer server), so `llmc serve --openai-port N` runs this one beside
it. Each HTTP request becomes one gRPC stream to `generate` (stream true: one response per text
increment), relayed as server-sent events in the OpenAI chunk format; non-streaming requests get
the concatenated text. When the HTTP client goes away mid-stream, the write fails and the gRPC stream
is cancelled (`stop_stream(cancel_requests=True)`); the scheduler serving `generate` sees its request
cancelled and frees the sequence's cache row.

The standard library's threading HTTP server is enough here: a thread per connection waits on its
gRPC stream, the model's work happens in the Triton server. Limits: one prompt per request (string
or a one-string list), `n` = 1, no logprobs, no usage figures and `finish_reason` null (the
`generate` model reports text, not why it stopped). Chat requests are rendered with the model's own
chat template (compiler/serving/chat_template.py) and then served as a completion of that text.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from pathlib import Path

import numpy as np

DONE = object()


class RequestInvalid(ValueError):
    """A request body this endpoint refuses (answered 400 with the OpenAI error shape)."""


def parse_completion(body: dict, default_max_tokens: int) -> dict:
    """The `generate` inputs for an OpenAI completion request body; RequestInvalid names the bad field."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestInvalid("'prompt' must be one non-empty string (a list of prompts is not supported)")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens", default_max_tokens))
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise RequestInvalid(f"'max_tokens' must be an integer >= 1 (got {max_tokens!r})")
    if body.get("n", 1) != 1:
        raise RequestInvalid("'n' must be 1: one completion per request")
    temperature = body.get("temperature", 0.0)
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise RequestInvalid(f"'temperature' must be a number >= 0 (got {temperature!r})")
    top_k = body.get("top_k", 0)
    seed = body.get("seed", 0)
    if not isinstance(top_k, int) or top_k < 0 or not isinstance(seed, int):
        raise RequestInvalid("'top_k' must be an integer >= 0 and 'seed' an integer")
    speculate = body.get("speculate", 0)  # llmc's extension: n-gram proposals per decode step
    if not isinstance(speculate, int) or isinstance(speculate, bool) or speculate < 0:
        raise RequestInvalid(f"'speculate' must be an integer >= 0 (got {speculate!r})")
    return {"text_input": prompt, "max_tokens": max_tokens, "temperature": float(temperature), "top_k": top_k,
            "seed": seed, "speculate": speculate, "stream": bool(body.get("stream", False))}


def _inputs(args: dict):
    import tritonclient.grpc as grpcclient

    tensors = []
    for name, value, datatype, dtype in (("text_input", args["text_input"].encode("utf-8"), "BYTES", object),
                                         ("max_tokens", args["max_tokens"], "INT32", np.int32),
                                         ("temperature", args["temperature"], "FP32", np.float32),
                                         ("top_k", args["top_k"], "INT32", np.int32),
                                         ("seed", args["seed"], "INT64", np.int64),
                                         ("speculate", args["speculate"], "INT32", np.int32),
                                         ("stream", True, "BOOL", bool)):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(np.array([value], dtype=dtype))
        tensors.append(tensor)
    return tensors


class GenerateStream:
    """One streamed `generate` request over gRPC: iterate for text pieces; `cancel()` ends it server-side."""

    def __init__(self, grpc_url: str, args: dict, model: str = "generate"):
        import tritonclient.grpc as grpcclient

        self.grpc_url, self.request_id = grpc_url, f"openai-{uuid.uuid4().hex}"
        self.pieces: queue.SimpleQueue = queue.SimpleQueue()
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.client.start_stream(callback=self._on_response)
        self.client.async_stream_infer(model, _inputs(args), request_id=self.request_id,
                                       enable_empty_final_response=True)
        self.closed = False

    def _on_response(self, result, error) -> None:
        if error is not None:
            self.pieces.put(RuntimeError(str(error)))
            return
        response = result.get_response()
        text = result.as_numpy("text_output")
        if text is not None and text.size:
            self.pieces.put(text.reshape(-1)[0].decode("utf-8"))
        if response.parameters.get("triton_final_response") and response.parameters["triton_final_response"].bool_param:
            self.pieces.put(DONE)

    def __iter__(self):
        while True:
            piece = self.pieces.get()
            if piece is DONE:
                return
            if isinstance(piece, Exception):
                raise piece
            yield piece

    def close(self, cancel: bool = False) -> None:
        if not self.closed:
            self.closed = True
            self.client.stop_stream(cancel_requests=cancel)
            self.client.close()


def _chunk(completion_id: str, model: str, created: int, text: str, chat: bool, first: bool = False) -> bytes:
    if chat:  # chat.completion.chunk: the first delta names the role
        delta = {"role": "assistant", "content": text} if first else {"content": text}
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
    else:
        body = {"id": completion_id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}
    return f"data: {json.dumps(body)}\n\n".encode()


def _whole(completion_id: str, model: str, created: int, text: str, chat: bool) -> dict:
    if chat:
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": None}]}
    return {"id": completion_id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]}


def parse_chat(body: dict, default_max_tokens: int, template) -> dict:
    """The `generate` inputs for a chat request: its messages rendered by the model's chat template."""
    from compiler.serving.chat_template import ChatUnavailable, parse_messages

    if template is None:
        raise ChatUnavailable("this endpoint was started without the model's tokenizer directory (its chat template)")
    try:
        prompt = template.render(parse_messages(body))
    except ChatUnavailable:
        raise
    except ValueError as exc:
        raise RequestInvalid(str(exc)) from exc
    return parse_completion({**body, "prompt": prompt}, default_max_tokens)


ROUTES = ("/v1/completions", "/v1/chat/completions")


def make_handler(grpc_url: str, model_name: str, default_max_tokens: int, template=None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's signature
            pass  # a line per request would flood the server's console under a load generator

        def _json(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": {"message": message, "type": "invalid_request_error", "code": status}})

        def do_GET(self):  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "llmc"}]})
            else:
                self._error(404, f"no route {self.path}: this endpoint serves POST {' and '.join(ROUTES)} "
                                 "and GET /v1/models")

        def do_POST(self):  # noqa: N802
            from compiler.serving.chat_template import ChatUnavailable

            route = self.path.rstrip("/")
            if route not in ROUTES:
                self._error(404, f"no route {self.path}: this endpoint serves POST {' and '.join(ROUTES)}")
                return
            chat = route == "/v1/chat/completions"
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if not isinstance(body, dict):
                    raise RequestInvalid("the body must be a JSON object")
                args = (parse_chat(body, default_max_tokens, template) if chat
                        else parse_completion(body, default_max_tokens))
            except (RequestInvalid, ChatUnavailable, json.JSONDecodeError) as exc:
                self._error(400, str(exc))
                return
            completion_id, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
            stream = GenerateStream(grpc_url, args)
            cancel = False
            try:
                if not args["stream"]:
                    try:
                        text = "".join(stream)
                    except RuntimeError as exc:
                        self._error(400, str(exc))
                        return
                    self._json(200, _whole(completion_id, model_name, created, text, chat))
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                try:
                    for i, piece in enumerate(stream):
                        self.wfile.write(_chunk(completion_id, model_name, created, piece, chat, first=i == 0))
                        self.wfile.flush()
                except RuntimeError as exc:
                    self.wfile.write(f"data: {json.dumps({'error': {'message': str(exc)}})}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                cancel = True  # the client went away: end the generation, free its cache row
            finally:
                stream.close(cancel=cancel)

    return Handler


class OpenAIServer:
    """`/v1/completions` and `/v1/chat/completions` on host:port, relaying to Triton's gRPC endpoint;
    `with` starts and stops it. `tokenizer_dir`: where the chat template is (the artifact's tokenizer/)."""

    def __init__(self, grpc_url: str, host: str = "127.0.0.1", port: int = 0, model_name: str = "llmc",
                 default_max_tokens: int = 64, tokenizer_dir: Path | None = None):
        from compiler.serving.chat_template import ChatTemplate

        template = ChatTemplate(tokenizer_dir) if tokenizer_dir is not None else None
        self.httpd = ThreadingHTTPServer((host, port), make_handler(grpc_url, model_name, default_max_tokens,
                                                                    template))
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True, name="llmc-openai")

    def __enter__(self) -> "OpenAIServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
