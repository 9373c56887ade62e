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
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

from .errors import BadInputError, LlmcError

STUB = "triton_python_backend_stub"


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
    target = cache / "triton-backends" / f"pytriton-{importlib.metadata.version('nvidia-pytriton')}-py{version}"
    if not (target / "python" / STUB).is_file():
        staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(root / "backends", staging / "", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staging / "python" / STUB)
        with contextlib.suppress(OSError):  # another process won the race: use its copy
            os.replace(staging, target)
        shutil.rmtree(staging, ignore_errors=True)
    return target


def stub_python_path() -> list[str]:
    """What llmc's model.py files put on sys.path: the override, llmc itself, then this process's path."""
    llmc_root = str(Path(__file__).resolve().parent.parent)
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A tritonserver subprocess; `with TritonServer(repo) as server:` always stops it."""

    def __init__(self, repository: Path, http_port: int = 0, grpc_port: int = 0, host: str = "127.0.0.1",
                 log_path: Path | None = None, cache: Path | None = None, extra_env: dict[str, str] | None = None):
        from .default_model import cache_root

        self.repository = Path(repository).resolve()
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.log_path = log_path
        self.cache = cache or cache_root()
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen | None = None

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
        log = open(self.log_path, "wb") if self.log_path else None  # None: the server logs to our stdout
        self.process = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise LlmcError(f"tritonserver exited with code {self.process.returncode} while starting"
                                + (f"; its log is {self.log_path}" if self.log_path else ""))
            try:
                with urllib.request.urlopen(f"http://{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise LlmcError(f"tritonserver was not ready after {timeout:.0f} s")

    def stop(self) -> None:
        """SIGTERM (Triton drains in-flight requests for up to 5 s), then SIGKILL of its process group."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_forever(artifact: Path, port: int, host: str, console) -> None:
    """`llmc serve`: start, print where it answers, stop on Ctrl-C / SIGTERM."""
    server = TritonServer(Path(artifact) / "triton", http_port=port, grpc_port=port + 1, host=host)
    console.print(f"starting tritonserver on {artifact}/triton (HTTP {host}:{port}, gRPC {host}:{port + 1}) ...")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.start()
        console.print(f"ready: curl -X POST http://{server.url}/v2/models/generate/generate "
                      "-d '{\"text_input\": \"The compiler\", \"max_tokens\": 16}'", markup=False, soft_wrap=True)
        server.process.wait()
        raise LlmcError(f"tritonserver exited with code {server.process.returncode}")
    except KeyboardInterrupt:
        console.print("stopping tritonserver")
    finally:
        server.stop()
