"""Whether the tritonserver bundled in nvidia-pytriton can run on this machine: the one reason the
server tests (tests/test_triton_server.py, tests/test_serve.py) skip."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path


def tritonserver_missing() -> str | None:
    """Why the bundled server cannot run on this machine, or None.

    Checked from the installed packages, not through compiler.serving.serve: a regression there (an
    exception in server_binary / server_env, a server that does not start) must fail these tests,
    not skip them. The capabilities are those compiler.serving.serve's docstring names."""
    if not sys.platform.startswith("linux"):
        return f"the tritonserver bundled in nvidia-pytriton is a Linux binary (this is {sys.platform})"
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return "nvidia-pytriton is not installed (pip install -e '.[serve]'): it bundles tritonserver"
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        return f"{root / 'bin' / 'tritonserver'} is missing: this nvidia-pytriton wheel bundles no server"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    if not (root / "python_backend_stubs" / version / "triton_python_backend_stub").is_file():
        return f"nvidia-pytriton ships no Python backend stub for Python {version}"
    numpy_major = int(importlib.metadata.version("numpy").split(".")[0])
    if numpy_major >= 2 and not os.environ.get("LLMC_TRITON_PYTHONPATH"):
        return "numpy>=2 here: Triton 2.51's Python backend stub needs numpy<2 (set LLMC_TRITON_PYTHONPATH)"
    return None
