"""The Triton repository on a real Triton Inference Server (the one bundled in nvidia-pytriton).

One artifact (tiny Llama, fp16 recipe, --triton-cpu-fallback) is built and served once for the
module, by `llmc serve`, on free loopback ports; the server is always stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.server_capability import tritonserver_missing

MAX_SEQ = 256  # room for a long generation that a leaving client cuts short
LEAVER_TOKENS = 240
PROMPTS = ["The compiler", "Once upon a time", "A tensor is", "Hello"]
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")
# llm is a Python model on a GPU instance: on a machine without a GPU Triton refuses its instance group before
# llm's own initialize (which would raise ExecutionUnavailable, tests/test_triton_repo.py) runs.
LLM_UNAVAILABLE = "instance group llm_0 of model llm has kind KIND_GPU but no GPUs are available"


MISSING = tritonserver_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=str(MISSING))


def test_serve_finds_the_bundled_server_where_the_capability_is():
    """Where the server can run, compiler.serving.serve's own checks pass: they fail these tests, never skip them."""
    from compiler.serving.serve import server_binary, server_env

    assert server_binary().is_file() and os.access(server_binary(), os.X_OK)
    env = server_env()
    assert env["LLMC_PYTHONPATH"] and env["LD_LIBRARY_PATH"]


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def stream_events(url: str, body: dict, timeout: float = 60) -> list[tuple[float, dict]]:
    """Server-sent events of /generate_stream with the time each one arrived."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    events = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for line in r:
            if line.startswith(b"data:"):
                events.append((time.perf_counter(), json.loads(line[5:])))
    return events


def grpc_stream_error(address: str, datatype: str) -> str:
    """Send generate a text_input of the wrong datatype over a gRPC stream; return the error it gets."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    errors = []
    client = grpcclient.InferenceServerClient(address)
    client.start_stream(callback=lambda result, error: errors.append(error))
    tensor = grpcclient.InferInput("text_input", [1], datatype)
    tensor.set_data_from_numpy(np.array([3], np.int32))
    client.async_stream_infer("generate", [tensor])
    deadline = time.monotonic() + 30
    while not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    client.stop_stream()
    client.close()
    assert errors and errors[0] is not None, "no error for a wrong-datatype request"
    return str(errors[0])


@pytest.fixture(scope="module")
def artifact(model_dirs, build_cache, tmp_path_factory) -> Path:
    from compiler.driver.build import BuildRequest, run_build
    from compiler.engine.engine_build import BuildOptions

    out = tmp_path_factory.mktemp("served") / "tiny-llama"
    run_build(BuildRequest(model=model_dirs["llama"], output=out, options=BuildOptions(max_batch=1, max_seq=MAX_SEQ),
                           prompt="The compiler reads a model", triton_cpu_fallback=True, cache_dir=build_cache))
    (out / "tokenizer" / "chat_template.jinja").write_text(CHAT_TEMPLATE)  # for /v1/chat/completions
    return out


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    """`llmc serve ARTIFACT --port N`, as a user runs it; SIGTERM at the end must stop it."""
    from compiler.serving.serve import free_port

    port, openai_port = free_port(), free_port()
    log = tmp_path_factory.mktemp("triton-log") / "serve.log"
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "compiler.commands.cli", "serve", str(artifact), "--port", str(port),
                                 "--openai-port", str(openai_port)],
                                stdout=sink, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"llmc serve exited {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server not ready in time: {log.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200 and "ready:" in log.read_text():
                        break
            except OSError:
                pass
            time.sleep(0.5)
        yield {"url": url, "grpc": f"127.0.0.1:{port + 1}", "openai": f"http://127.0.0.1:{openai_port}", "proc": proc,
               "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def expected_text(artifact: Path, prompt: str, max_tokens: int) -> str:
    """What `llmc generate` prints for the same artifact (greedy)."""
    from compiler.commands.generate import run_generate

    return run_generate(artifact, [prompt], max_tokens, 0.0, 0, 0, "onnxruntime")["texts"][0]


def test_repository_loads_and_only_llm_lacks_its_backend(server):
    status, index = post(f"{server['url']}/v2/repository/index", {})
    assert status == 200
    states = {m["name"]: (m.get("state"), m.get("reason", "")) for m in index}
    assert set(states) == {"preprocessing", "llm", "llm_onnx", "postprocessing", "generate"}
    for name in ("preprocessing", "llm_onnx", "postprocessing", "generate"):
        assert states[name][0] == "READY", (name, states[name])
    # llm (the scheduler over model.plan, on a GPU instance) loads only where a GPU is: here Triton says so.
    assert states["llm"][0] == "UNAVAILABLE" and LLM_UNAVAILABLE in states["llm"][1], states["llm"]


def test_generate_matches_llmc_generate(server, artifact):
    for prompt in PROMPTS[:2]:
        status, body = post(f"{server['url']}/v2/models/generate/generate", {"text_input": prompt, "max_tokens": 12})
        assert status == 200, body
        assert body["text_output"] == expected_text(artifact, prompt, 12)
        assert body["text_output"]  # random tiny model: still some text


def test_stream_returns_tokens_incrementally(server, artifact):
    start = time.perf_counter()
    events = stream_events(f"{server['url']}/v2/models/generate/generate_stream",
                           {"text_input": PROMPTS[0], "max_tokens": 16, "stream": True})
    pieces = [e["text_output"] for _, e in events if "text_output" in e]
    assert len(pieces) >= 4, pieces  # one event per text increment, not one at the end
    assert "".join(pieces) == expected_text(artifact, PROMPTS[0], 16)
    first, last = events[0][0] - start, events[-1][0] - start
    assert first < last  # the first piece arrived before generation finished


def test_concurrent_clients(server, artifact):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    expected = {p: expected_text(artifact, p, 10) for p in set(prompts)}
    results: dict[int, tuple[int, dict]] = {}

    def client(i):
        results[i] = post(f"{server['url']}/v2/models/generate/generate",
                          {"text_input": prompts[i], "max_tokens": 10}, timeout=120)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert time.perf_counter() - start < 120
    assert sorted(results) == list(range(8))
    for i, (status, body) in results.items():
        assert status == 200, body
        assert body["text_output"] == expected[prompts[i]], i


def grpc_generate_stream(address: str, prompt: str, max_tokens: int) -> list[str]:
    """Text pieces of one streamed `generate` request over a gRPC stream."""
    import queue

    import numpy as np
    import tritonclient.grpc as grpcclient

    pieces: queue.SimpleQueue = queue.SimpleQueue()
    client = grpcclient.InferenceServerClient(address)
    client.start_stream(callback=lambda result, error: pieces.put(error or result))
    inputs = []
    for name, value, datatype, dtype in (("text_input", prompt.encode(), "BYTES", object),
                                         ("max_tokens", max_tokens, "INT32", np.int32), ("stream", True, "BOOL", bool)):
        inputs.append(grpcclient.InferInput(name, [1], datatype))
        inputs[-1].set_data_from_numpy(np.array([value], dtype=dtype))
    client.async_stream_infer("generate", inputs, enable_empty_final_response=True)
    out: list[str] = []
    try:
        while True:
            item = pieces.get(timeout=120)
            assert not isinstance(item, Exception), item
            text = item.as_numpy("text_output")
            if text is not None:
                out.append(text.reshape(-1)[0].decode())
            if item.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        client.stop_stream()
        client.close()


def openai_stream_then_leave(url: str, prompt: str, max_tokens: int) -> list[str]:
    """A streaming /v1/completions client that reads the first event and closes the connection."""
    req = urllib.request.Request(f"{url}/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": prompt, "max_tokens": max_tokens, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        for line in r:
            if line.startswith(b"data: "):
                return [json.loads(line[6:])["choices"][0]["text"]]
    return []


def scheduler_lines(log: Path) -> list[str]:
    """The in-flight scheduler's line per finished request (generate's own on this CPU server)."""
    return [line for line in log.read_text(errors="replace").splitlines() if "generate: request " in line]


def test_concurrent_streaming_clients_share_graph_calls_and_each_gets_its_solo_output(server, artifact):
    """65 streaming clients at once (mixed prompts and lengths; 64 over gRPC, more than the scheduler's 16
    rows, and one over /v1/completions that goes away after its first piece): each of the 64 gets exactly
    the text `llmc generate` gives it alone, their tokens came from graph calls shared with others (the
    scheduler's log), and the one that left was stopped early."""
    jobs = [(PROMPTS[i % len(PROMPTS)], 12 + 8 * ((i // len(PROMPTS)) % 2)) for i in range(64)]
    expected = {job: expected_text(artifact, *job) for job in set(jobs)}
    before = len(scheduler_lines(server["log"]))
    results: dict[int, list[str]] = {}

    def client(i):
        results[i] = grpc_generate_stream(server["grpc"], *jobs[i]) if i < len(jobs) else \
            openai_stream_then_leave(server["openai"], "Once upon a time there was", LEAVER_TOKENS)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs) + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(results) == list(range(len(jobs) + 1))
    for i, job in enumerate(jobs):
        assert "".join(results[i]) == expected[job], i
    deadline = time.monotonic() + 30
    while len(scheduler_lines(server["log"])) < before + len(jobs) + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = scheduler_lines(server["log"])[before:]
    assert len(lines) == len(jobs) + 1, lines
    peaks = [int(line.split("of up to ")[1].split()[0]) for line in lines]
    assert max(peaks) > 1, lines  # concurrent clients shared graph calls
    (cancelled,) = [line for line in lines if " cancelled after " in line]
    assert int(cancelled.split(" cancelled after ")[1].split()[0]) < LEAVER_TOKENS, cancelled


def test_llm_onnx_serves_concurrent_token_id_clients_through_its_scheduler(server, artifact):
    """Clients that tokenize themselves: llm_onnx's own scheduler, each stream equal to its solo Runner run."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
    from compiler.runtime.runner import Runner

    config = text_format.Parse((artifact / "triton" / "llm_onnx" / "config.pbtxt").read_text(), mc.ModelConfig())
    pad = int(config.parameters["llmc_pad_token_id"].string_value)
    stops = tuple(int(t) for t in config.parameters["llmc_stop_token_ids"].string_value.split(",") if t)
    runner = Runner(OnnxRuntimeExecutor(artifact / "model.onnx"), pad_token_id=pad)
    prompts = [[5, 17, 300, 41], [9], [250, 251, 252, 253, 254, 255, 256], [77, 78]]
    results: dict[int, list[int]] = {}

    def client(i):
        got: list = []
        done = threading.Event()

        def on_response(result, error):
            assert error is None, error
            out = result.as_numpy("output_ids")
            if out is not None:
                got.extend(out.reshape(-1).tolist())
            if result.get_response().parameters["triton_final_response"].bool_param:
                done.set()

        c = grpcclient.InferenceServerClient(server["grpc"])
        c.start_stream(callback=on_response)
        ids = grpcclient.InferInput("input_ids", [len(prompts[i])], "INT64")
        ids.set_data_from_numpy(np.array(prompts[i], np.int64))
        n = grpcclient.InferInput("max_tokens", [1], "INT32")
        n.set_data_from_numpy(np.array([10], np.int32))
        c.async_stream_infer("llm_onnx", [ids, n], enable_empty_final_response=True)
        done.wait(120)
        c.stop_stream()
        c.close()
        results[i] = got

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    for i, prompt in enumerate(prompts):
        assert results[i] == runner.generate([prompt], 10, stop_tokens=stops).tokens[0], i
    assert "llm_onnx: in-flight batching" in server["log"].read_text()


def test_openai_completions_endpoint(server, artifact):
    """`llmc serve --openai-port`: /v1/completions, streamed (SSE chunks) and not, gives `llmc generate`'s text."""
    url = f"{server['openai']}/v1/completions"
    want = expected_text(artifact, PROMPTS[1], 12)
    status, body = post(url, {"model": "x", "prompt": PROMPTS[1], "max_tokens": 12})
    assert status == 200 and body["object"] == "text_completion", body
    assert body["choices"][0]["text"] == want
    req = urllib.request.Request(url, data=json.dumps({"prompt": PROMPTS[1], "max_tokens": 12, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = [line[len(b"data: "):].strip() for line in r if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]" and len(events) > 3
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == want
    status, body = post(url, {"prompt": PROMPTS[0], "max_tokens": 0})
    assert status == 400 and "'max_tokens' must be an integer >= 1" in body["error"]["message"], body
    status, body = post(url, {"prompt": ["a", "b"]})
    assert status == 400 and "one non-empty string" in body["error"]["message"], body
    status, body = post(url, {"prompt": "word " * (2 * MAX_SEQ), "max_tokens": 4})  # generate's own check
    assert status == 400 and f"holds {MAX_SEQ}" in body["error"]["message"], body
    with urllib.request.urlopen(f"{server['openai']}/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == artifact.name


def test_speculation_per_request_changes_no_text(server, artifact):
    """`speculate` (n-gram proposals per step, the in-flight scheduler's) on /generate and /v1/completions:
    the same text as plain greedy decoding, the proposals counted in the scheduler's log; a negative
    value refused with its name."""
    want = expected_text(artifact, PROMPTS[2], 24)
    status, body = post(f"{server['url']}/v2/models/generate/generate",
                        {"text_input": PROMPTS[2], "max_tokens": 24, "speculate": 4})
    assert status == 200 and body["text_output"] == want, body
    status, body = post(f"{server['openai']}/v1/completions", {"prompt": PROMPTS[2], "max_tokens": 24, "speculate": 3})
    assert status == 200 and body["choices"][0]["text"] == want, body
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len([l for l in scheduler_lines(server["log"]) if "n-gram proposals" in l]) < 2:
        time.sleep(0.2)
    lines = [line for line in scheduler_lines(server["log"]) if "n-gram proposals accepted" in line]
    assert len(lines) >= 2, scheduler_lines(server["log"])[-4:]
    status, body = post(f"{server['openai']}/v1/completions", {"prompt": PROMPTS[2], "speculate": -1})
    assert status == 400 and "'speculate' must be an integer >= 0" in body["error"]["message"], body
    status, body = post(f"{server['url']}/v2/models/generate/generate",
                        {"text_input": PROMPTS[2], "max_tokens": 4, "speculate": -2})
    assert status == 400 and "speculate must be >= 0" in json.dumps(body), body


def test_openai_chat_completions_endpoint(server, artifact):
    """/v1/chat/completions: the messages rendered by the artifact's chat template, then `llmc generate`'s
    text for that prompt, whole and as chat.completion.chunk events."""
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a tensor."}]
    prompt = "<system>Be brief.\n<user>Name a tensor.\n<assistant>"
    want = expected_text(artifact, prompt, 10)
    url = f"{server['openai']}/v1/chat/completions"
    status, body = post(url, {"model": "x", "messages": messages, "max_tokens": 10})
    assert status == 200 and body["object"] == "chat.completion", body
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want}
    req = urllib.request.Request(url, data=json.dumps({"messages": messages, "max_tokens": 10, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        events = [line[len(b"data: "):].strip() for line in r if line.startswith(b"data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == b"[DONE]" and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == want
    status, body = post(url, {"messages": "hello"})
    assert status == 400 and "'messages' must be a non-empty list" in body["error"]["message"], body


def test_malformed_requests_get_clear_errors_and_server_stays_up(server):
    url = f"{server['url']}/v2/models/generate"
    status, body = post(f"{url}/generate", {"max_tokens": 4})  # no text_input
    assert status == 400 and "text_input" in body["error"], body
    error = grpc_stream_error(server["grpc"], "INT32")  # decoupled models answer over gRPC streams, not /infer
    assert "text_input" in error and "BYTES" in error and "INT32" in error, error
    status, body = post(f"{url}/generate", {"text_input": "word " * (2 * MAX_SEQ), "max_tokens": 4})
    assert status == 400 and f"holds {MAX_SEQ}" in body["error"] and "shorten" in body["error"], body
    status, body = post(f"{url}/generate", {"text_input": "Hello", "max_tokens": MAX_SEQ})
    assert status == 400 and f"holds {MAX_SEQ}" in body["error"], body
    status, body = post(f"{url}/generate", {"text_input": "Hello", "max_tokens": 0})
    assert status == 400 and "max_tokens must be >= 1" in body["error"], body
    with urllib.request.urlopen(f"{server['url']}/v2/health/ready", timeout=5) as r:
        assert r.status == 200
    status, body = post(f"{url}/generate", {"text_input": "Hello", "max_tokens": 3})
    assert status == 200 and isinstance(body["text_output"], str)


def test_engine_version_mismatch_fails_generate_at_load(artifact, tmp_path):
    """A repository whose engine was built by another TensorRT version refuses to load, naming both."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from compiler.engine.backend import get_backend
    from compiler.serving.serve import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(artifact / "triton" / "generate", repo / "generate")
    config_path = repo / "generate" / "config.pbtxt"
    config = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    built = config.parameters["llmc_engine_version"].string_value
    running = get_backend().version
    assert built == running  # the real build records the version that built it
    config.parameters["llmc_engine_version"].string_value = "0.9.0"
    config_path.write_text(text_format.MessageToString(config))
    with TritonServer(repo, log_path=tmp_path / "log.txt") as server:
        status, index = post(f"http://{server.url}/v2/repository/index", {})
    (entry,) = index
    assert entry["state"] == "UNAVAILABLE"
    assert f"built by {config.parameters['llmc_engine_backend'].string_value} 0.9.0" in entry["reason"]
    assert f"this server has {config.parameters['llmc_engine_backend'].string_value} {running}" in entry["reason"]


def test_serve_stops_on_sigterm(server):
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert "stopping tritonserver" in server["log"].read_text()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{server['url']}/v2/health/live", timeout=2)
