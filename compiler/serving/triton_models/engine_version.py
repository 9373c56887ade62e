"""Does this server's TensorRT match the one that built model.plan? Engines run only on their own version.

Asked of the library the server process would load: the Python module of the same TensorRT
family if importable, else libnvinfer's `getInferLibVersion()` through ctypes.
"""

from __future__ import annotations

import ctypes
import importlib


def runtime_version(backend: str) -> str | None:
    """The TensorRT (or TensorRT-RTX) version available here, or None when there is none."""
    try:
        return str(importlib.import_module(backend).__version__)
    except Exception:  # noqa: BLE001 - any import failure means "not available here"
        pass
    if backend != "tensorrt":
        return None
    for name in ("libnvinfer.so.10", "libnvinfer.so"):
        try:
            number = ctypes.CDLL(name).getInferLibVersion()
        except (OSError, AttributeError):
            continue
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return None


def same_release(built: str, running: str) -> bool:
    """Major.minor.patch must agree (the build number, a fourth field, may be absent on one side)."""
    return built.split(".")[:3] == running.split(".")[:3]


def check(backend: str, built: str, running: str | None) -> None:
    if running is not None and not same_release(built, running):
        raise RuntimeError(
            f"model.plan was built by {backend} {built} but this server has {backend} {running}: TensorRT "
            f"engines run only on the version that built them; rebuild with llmc build where {backend} "
            f"{running} is installed, or serve with {backend} {built}")
