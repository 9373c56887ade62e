"""Run the Triton Inference Server bundled in the `nvidia-pytriton` wheel on an artifact's repository.

`llmc serve` and the tests use this. Three things make the wheel's server run llmc's Python models:

- Backends: the wheel ships `backends/python` and one `triton_python_backend_stub` per Python
  version; the stub matching this interpreter is copied beside the backend into
  `$LLMC_CACHE/triton-backends/` (as pytriton itself does at start-up).
- libpython: the stub links `libpython3.X.so` and embeds that interpreter; LD_LIBRARY_PATH puts
  this interpreter's own LIBDIR first so it embeds the same Python (not the system's).
- Packages: the embedded interpreter ignores PYTHONPATH and knows nothing of virtualenvs, so the
  server gets LLMC_PYTHONPATH (this process's sys.path, plus LLMC_TRITON_PYTHONPATH in front) and
  every llmc `model.py` prepends it to `sys.path` (a documented alternative is the Python
  backend's EXECUTION_ENV_PATH with a conda-pack archive). The 2.51 stub's pybind11 predates
  numpy 2's ABI (`as_numpy()` returns wrong data under numpy 2: nvidia-pytriton pins numpy<2),
  so the numpy the stub will import is checked here.

The server runs with --exit-on-error=false and --strict-readiness=false so that one model that
can't load (`llm` without a TensorRT backend) leaves the rest of the repository serving.

Serving never writes into the artifact: the stub's interpreter would cache the model.py files'
bytecode in `triton/*/1/__pycache__`, which `llmc inspect` then reports as files the manifest does
not list; llmc's copy of the backend switches bytecode caching off (NO_BYTECODE). When the server cannot start, the
reason is in its log, not in its exit code: the log is read as it is written and the error line
that preceded the exit is quoted (the last one: on a CPU host the first is always the harmless
"CudaDriverHelper has not been initialized").
"""

from __future__ import annotations

import collections
import contextlib
import errno
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from compiler.errors import BadInputError, ServerStartError
from compiler.serving.bench import limits_file, read_limits, repository_with

STUB = "triton_python_backend_stub"
UTILS = "triton_python_backend_utils.py"
# The stub embeds an *isolated* interpreter (pybind11's default), which ignores PYTHONDONTWRITEBYTECODE,
# and it imports this backend module before any model.py: switching bytecode caching off here keeps
# `model.cpython-3X.pyc` out of the artifact's triton/*/1/ (llmc inspect would report it as an extra file).
NO_BYTECODE = "\n\n# Added by llmc (compiler/serving/serve.py): write no __pycache__ beside the served model.py files.\n" \
              "import sys as _llmc_sys\n_llmc_sys.dont_write_bytecode = True\n"


def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise BadInputError("the bundled Triton server needs nvidia-pytriton: pip install nvidia-pytriton")
    return Path(list(spec.submodule_search_locations)[0])


def server_binary() -> Path:
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise BadInputError(f"{binary} is missing: reinstall nvidia-pytriton (its wheel bundles tritonserver)")
    return binary


def _libs_dir() -> Path:
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def backend_dir(cache: Path) -> Path:
    """backends/python with the stub for this Python version, assembled once per version."""
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / STUB
    if not stub.is_file():
        raise BadInputError(f"nvidia-pytriton {importlib.metadata.version('nvidia-pytriton')} has no Python backend "
                            f"stub for Python {version}; use a Python it ships stubs for (3.8-3.13)")
    target = cache / "triton-backends" / f"pytriton-{importlib.metadata.version('nvidia-pytriton')}-py{version}-nopyc"
    if not (target / "python" / STUB).is_file():
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(root / "backends", staging / "", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staging / "python" / STUB)
        with open(staging / "python" / UTILS, "a") as utils:
            utils.write(NO_BYTECODE)
        with contextlib.suppress(OSError):  # another process won the race: use its copy
            os.replace(staging, target)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def stub_python_path() -> list[str]:
    """What llmc's model.py files put on sys.path: the override, llmc itself, then this process's path."""
    llmc_root = str(Path(__file__).resolve().parents[2])
    extra = [p for p in os.environ.get("LLMC_TRITON_PYTHONPATH", "").split(os.pathsep) if p]
    seen, out = set(), []
    for p in [*extra, llmc_root, *sys.path]:
        if p and os.path.isdir(p) and p not in seen:
            seen.add(p)
            out.append(p)
    return out


def _check_stub_numpy(paths: list[str]) -> None:
    for p in paths:
        for dist in importlib.metadata.distributions(name="numpy", path=[p]):
            if int(dist.version.split(".")[0]) >= 2:
                raise BadInputError(
                    f"the Triton Python backend stub would import numpy {dist.version} from {p}, but Triton 2.51's "
                    "stub reads only numpy<2 arrays (nvidia-pytriton requires numpy<2): pip install 'numpy<2', or "
                    "set LLMC_TRITON_PYTHONPATH to a directory holding numpy<2")
            return


def server_env() -> dict[str, str]:
    env = os.environ.copy()
    libs = [str(_libs_dir())]
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        libs.insert(0, sysconfig.get_config_var("LIBDIR"))
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    paths = stub_python_path()
    _check_stub_numpy(paths)
    env["LLMC_PYTHONPATH"] = os.pathsep.join(paths)
    return env


def check_ports(host: str, http_port: int) -> None:
    """HTTP on `http_port`, gRPC on the next one: both in range and free on `host`, before the server starts."""
    if not 1 <= http_port <= 65534:
        raise BadInputError(f"--port {http_port} is out of range: HTTP uses it and gRPC the next port, so it must "
                            "be in [1, 65534]")
    for port, what in ((http_port, "HTTP"), (http_port + 1, "gRPC")):
        _check_free(host, port, what)


def _check_free(host: str, port: int, what: str, flag: str = "--port (gRPC takes --port + 1)") -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is fine
            probe.bind((host, port))
    except socket.gaierror as exc:
        raise BadInputError(f"--host {host!r} is not an address this machine can listen on ({exc.strerror}); "
                            "pass an IP address such as 127.0.0.1 or 0.0.0.0") from None
    except OverflowError:
        raise BadInputError(f"port {port} ({what}) is out of range [1, 65535]") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise ServerStartError(f"port {port} ({what}) on {host} is already in use; stop what listens there "
                                   f"or pass another {flag}") from None
        raise ServerStartError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}; pass another "
                               "--host / --port") from None


# glog's prefix: severity and date, time, thread, file:line] "message"
_ERROR_LINE = re.compile(r'^E\d{4} [\d:.]+\s+\d+ [^\]]+\] "?(.*?)"?\s*$')


class _LogReader(threading.Thread):
    """Copies the server's output to `sink` (a log file, or this process's stdout) and keeps its error lines."""

    def __init__(self, stream, sink):
        super().__init__(daemon=True)
        self.stream, self.sink = stream, sink
        self.errors: collections.deque[str] = collections.deque(maxlen=32)

    def run(self) -> None:
        for raw in iter(self.stream.readline, b""):
            with contextlib.suppress(OSError, ValueError):  # a closed stdout must not stop the draining:
                self.sink(raw)  # a full pipe would block the server
            match = _ERROR_LINE.match(raw.decode(errors="replace"))
            if match:
                self.errors.append(match.group(1).strip())

    def last_error(self) -> str | None:
        self.join(timeout=5)
        return self.errors[-1] if self.errors else None


def _stdout_sink(raw: bytes) -> None:
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is not None:
        buffer.write(raw)
    else:
        sys.stdout.write(raw.decode(errors="replace"))
    sys.stdout.flush()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A tritonserver subprocess; `with TritonServer(repo) as server:` always stops it."""

    def __init__(self, repository: Path, http_port: int = 0, grpc_port: int = 0, host: str = "127.0.0.1",
                 log_path: Path | None = None, cache: Path | None = None, extra_env: dict[str, str] | None = None):
        from compiler.frontend.default_model import cache_root

        self.repository = Path(repository).resolve()
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.log_path = log_path
        self.cache = cache or cache_root()
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None
        self._reader: _LogReader | None = None
        self._log = None

    @property
    def url(self) -> str:
        return f"{'127.0.0.1' if self.host in ('0.0.0.0', '') else self.host}:{self.http_port}"

    def command(self) -> list[str]:
        return [str(server_binary()), f"--model-repository={self.repository}",
                f"--backend-directory={backend_dir(self.cache)}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", "--exit-on-error=false", "--strict-readiness=false",
                "--disable-auto-complete-config",  # configs are complete; auto-complete imports every model.py twice
                "--exit-timeout-secs=5"]

    def start(self, timeout: float = 180.0) -> "TritonServer":
        if not (self.repository / "generate" / "config.pbtxt").is_file():
            raise BadInputError(f"{self.repository} is not an llmc Triton repository (no generate/config.pbtxt): "
                                "rebuild the artifact with llmc build")
        env = {**server_env(), **self.extra_env}
        self._log = open(self.log_path, "wb") if self.log_path else None  # None: the server logs to our stdout
        sink = (lambda raw: (self._log.write(raw), self._log.flush())) if self._log else _stdout_sink
        self.process = subprocess.Popen(self.command(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self._reader = _LogReader(self.process.stdout, sink)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(self.exit_reason("could not start"))
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise ServerStartError(f"tritonserver was not ready after {timeout:.0f} s"
                               + (f"; its last error: {self._reader.errors[-1]}" if self._reader.errors else ""))

    def exit_reason(self, what: str) -> str:
        """One line: the exit code and the server's own error line that preceded it."""
        error = self._reader.last_error() if self._reader else None
        return (f"tritonserver {what} (exit code {self.process.returncode})"
                + (f": {error}" if error else ": it printed no error line")
                + (f"; its log is {self.log_path}" if self.log_path else ""))

    def stop(self) -> None:
        """SIGTERM (Triton drains in-flight requests for up to 5 s), then SIGKILL of its process group."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_forever(artifact: Path, port: int, host: str, console, openai_port: int | None = None) -> None:
    """`llmc serve`: start, print where it answers, stop on Ctrl-C / SIGTERM. With `openai_port`, an
    OpenAI-compatible /v1/completions (compiler/serving/openai_api.py) answers there too."""
    repository = Path(artifact) / "triton"
    if not (repository / "generate" / "config.pbtxt").is_file():
        raise BadInputError(f"{repository} is not an llmc Triton repository (no generate/config.pbtxt): "
                            "rebuild the artifact with llmc build")
    check_ports(host, port)
    if openai_port is not None:
        if openai_port in (port, port + 1):
            raise BadInputError(f"--openai-port {openai_port} collides with Triton's HTTP ({port}) or gRPC ({port + 1}) "
                                "port: pick another")
        _check_free(host, openai_port, "OpenAI HTTP", "--openai-port")
    repository, copy = served_repository(artifact, console)
    server = TritonServer(repository, http_port=port, grpc_port=port + 1, host=host)
    console.print(f"starting tritonserver on {artifact}/triton (HTTP {host}:{port}, gRPC {host}:{port + 1}) ...")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start()
        with contextlib.ExitStack() as frontends:
            if openai_port is not None:
                from compiler.serving.openai_api import OpenAIServer

                address = server.url.rsplit(":", 1)[0]
                api = frontends.enter_context(OpenAIServer(f"{address}:{port + 1}", host, openai_port,
                                                           model_name=Path(artifact).resolve().name,
                                                           tokenizer_dir=Path(artifact) / "tokenizer"))
                console.print(f"OpenAI-compatible: http://{address}:{api.port}/v1/completions and /v1/chat/completions",
                              markup=False, soft_wrap=True)
            _announce(server, console)
            server.process.wait()
        raise ServerStartError(server.exit_reason("stopped on its own"))
    except KeyboardInterrupt:
        console.print("stopping tritonserver")
    finally:
        server.stop()
        if copy is not None:
            shutil.rmtree(copy, ignore_errors=True)


def served_repository(artifact: Path, console) -> tuple[Path, Path | None]:
    """(repository to serve, temporary copy to delete or None): the artifact's own, or, when `llmc bench
    --slo-ttft-ms` wrote limits beside it, a copy with them (the artifact stays as built)."""
    limits = read_limits(artifact)
    if limits is None:
        return Path(artifact) / "triton", None
    copy = Path(tempfile.mkdtemp(prefix="llmc-serve-"))
    console.print(f"scheduler limits from {limits_file(artifact)}: {limits.label}", markup=False, soft_wrap=True)
    try:
        return repository_with(artifact, limits, copy), copy
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)
        raise


def _announce(server: TritonServer, console) -> None:
    console.print(f"ready: curl -X POST http://{server.url}/v2/models/generate/generate "
                  "-d '{\"text_input\": \"The compiler\", \"max_tokens\": 16}'", markup=False, soft_wrap=True)
