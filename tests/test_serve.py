"""`llmc serve` when the server cannot start, and what serving leaves in the artifact.

Ports are checked before the server starts (range, in use: exit 2 / 7, one line); when the real
server (the tritonserver bundled in nvidia-pytriton) exits while starting, its own error line is
quoted; and a served artifact keeps exactly the files its manifest lists (no `__pycache__`).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner

from compiler.commands.cli import main
from compiler.errors import EXIT_CODES, ServerStartError
from tests.server_capability import tritonserver_missing


needs_server = pytest.mark.skipif(tritonserver_missing() is not None, reason=str(tritonserver_missing()))


def _one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmc: error: "), stderr
    return lines[0]


@pytest.fixture()
def listening():
    """A socket listening on a free loopback port (what a second server, or anything else, would hold)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_exit_code_7_is_documented():
    assert ServerStartError.exit_code == 7 and ServerStartError.exit_code not in (0, 1, 2, 3, 4, 5, 6, 130, 143)
    listed = CliRunner().invoke(main, ["exit-codes"]).output
    assert "7  llmc serve: the Triton server could not start" in listed
    assert "could not start" in EXIT_CODES[7]


@pytest.mark.parametrize("offset", [0, 1], ids=["http-port", "grpc-port"])
def test_port_in_use_is_refused_before_starting(cached_build, listening, offset):
    artifact = cached_build[0]
    port = listening - offset  # the HTTP port itself, or the gRPC one (--port + 1)
    if offset:
        with socket.socket() as s:  # the HTTP port below must be free for the gRPC one to be the reason
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip(f"port {port} is taken by something else")
    start = time.monotonic()
    result = CliRunner().invoke(main, ["serve", str(artifact), "--port", str(port)])
    assert result.exit_code == 7, result.output
    line = _one_line(result.stderr)
    assert f"port {listening} ({'HTTP' if offset == 0 else 'gRPC'}) on 127.0.0.1 is already in use" in line
    assert "pass another --port" in line
    assert time.monotonic() - start < 10  # refused before any server process, not after its start-up
    assert "starting tritonserver" not in result.output


@pytest.mark.parametrize("port", [0, -1, 65535, 70000])
def test_port_out_of_range(cached_build, port):
    result = CliRunner().invoke(main, ["serve", str(cached_build[0]), "--port", str(port)])
    assert result.exit_code == 2, result.output
    line = _one_line(result.stderr)
    assert f"--port {port} is out of range" in line and "[1, 65534]" in line


def test_openai_port_taken_or_colliding_is_refused_before_starting(cached_build, listening):
    artifact = str(cached_build[0])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["serve", artifact, "--port", str(port), "--openai-port", str(port + 1)])
    assert result.exit_code == 2, result.output
    assert f"--openai-port {port + 1} collides with Triton's HTTP ({port}) or gRPC ({port + 1}) port" in \
        _one_line(result.stderr)
    result = CliRunner().invoke(main, ["serve", artifact, "--port", str(port), "--openai-port", str(listening)])
    if result.exit_code == 7 and "(HTTP)" in result.stderr or "(gRPC)" in result.stderr:
        pytest.skip("the free port found for Triton was taken meanwhile")
    assert result.exit_code == 7, result.output
    line = _one_line(result.stderr)
    assert f"port {listening} (OpenAI HTTP) on 127.0.0.1 is already in use" in line and "--openai-port" in line
    assert "starting tritonserver" not in result.output


def test_unknown_host_is_bad_input(cached_build):
    result = CliRunner().invoke(main, ["serve", str(cached_build[0]), "--host", "no-such-host.invalid"])
    assert result.exit_code == 2, result.output
    assert "--host 'no-such-host.invalid' is not an address" in _one_line(result.stderr)


@needs_server
def test_server_start_failure_quotes_the_servers_error(cached_build, listening, tmp_path):
    """The real server, its HTTP port taken after llmc's check (a race): it exits, and llmc says why."""
    from compiler.serving.serve import TritonServer, free_port

    server = TritonServer(cached_build[0] / "triton", http_port=listening, grpc_port=free_port(),
                          log_path=tmp_path / "server.log")
    with pytest.raises(ServerStartError) as caught:
        server.start(timeout=120)
    message = str(caught.value)
    assert message.startswith("tritonserver could not start (exit code 1): failed to start HTTP service")
    assert f"127.0.0.1:{listening}' already in use" in message and "\n" not in message
    assert f"its log is {tmp_path / 'server.log'}" in message
    assert "failed to start HTTP service" in (tmp_path / "server.log").read_text()  # the log is still written


@needs_server
def test_serving_leaves_the_artifact_as_built(cached_build, tmp_path):
    """`llmc serve` until ready, then Ctrl-C: no file is added to the artifact, and `llmc inspect` passes."""
    from compiler.serving.serve import free_port

    artifact = Path(shutil.copytree(cached_build[0], tmp_path / "artifact"))
    before = sorted(p.relative_to(artifact) for p in artifact.rglob("*"))
    port = free_port()
    env_path = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-m", "compiler.commands.cli", "serve", str(artifact), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**{k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"},
                                 "PYTHONPATH": env_path})  # a user's shell: Python writes bytecode by default
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("llmc serve was not ready in 240 s")
        # Ready: every Python model (preprocessing, generate, postprocessing) has been imported by its stub.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/generate/ready", timeout=10) as r:
            assert r.status == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert sorted(p.relative_to(artifact) for p in artifact.rglob("*")) == before
    inspected = CliRunner().invoke(main, ["inspect", str(artifact)])
    assert inspected.exit_code == 0, inspected.output
