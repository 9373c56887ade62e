"""The one place that knows which TensorRT is installed: full `tensorrt`, else `tensorrt_rtx`.

TensorRT for RTX has the same Python API for parsing and building (strongly typed networks,
optimization profiles, native attention / KV-cache-update / rotary layers) but no plugin layers,
and its ONNX parser aborts the whole process on a custom-domain node. So capabilities are
checked here, before anything is parsed. Force one with LLMC_BACKEND=tensorrt|tensorrt_rtx.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from types import ModuleType

from compiler.errors import BackendBuildError

_CANDIDATES = ("tensorrt", "tensorrt_rtx")
_RTX_CAPABILITIES = {(7, 5), (8, 6), (8, 9)}  # Turing, Ampere and Ada consumer/workstation parts


@dataclasses.dataclass(frozen=True)
class Backend:
    """A TensorRT module plus what it can do on this machine."""

    trt: ModuleType
    name: str
    version: str

    @property
    def supports_plugins(self) -> bool:
        return hasattr(self.trt.INetworkDefinition, "add_plugin_v3")

    @property
    def supports_kv_cache_update(self) -> bool:
        """TensorRT's KVCacheUpdate layer, which the parser maps opset-24 TensorScatter to: new in TensorRT 10.15
        (IKVCacheUpdateLayer first appears in NvInfer.h in NVIDIA/TensorRT's 10.15 OSS release, 9973b2f4)."""
        has_layer = hasattr(self.trt.INetworkDefinition, "add_kv_cache_update")
        return has_layer and (self.name != "tensorrt" or _release(self.version) >= KV_CACHE_UPDATE_SINCE)

    @property
    def supports_timing_cache(self) -> bool:
        # TensorRT-RTX keeps the API but documents timing-cache operations as no-ops since 1.2.
        return self.name == "tensorrt"

    def execution_unavailable_reason(self) -> str | None:
        """None when engines can run here, else why not (for skips and clear errors)."""
        try:
            import torch
        except ImportError:
            return "torch is not installed (llmc's TensorRT runner uses torch CUDA buffers)"
        if not torch.cuda.is_available():
            return f"no CUDA GPU on this machine: {self.name} {self.version} can build engines but not run them"
        major, minor = torch.cuda.get_device_capability()
        if self.name == "tensorrt_rtx" and not ((major, minor) in _RTX_CAPABILITIES or major == 12):
            return (f"TensorRT-RTX does not run on compute capability {major}.{minor} "
                    "(it targets RTX GPUs: 7.5, 8.6, 8.9, 12.x); install full TensorRT")
        return None

    def require_plugins(self, what: str) -> None:
        if not self.supports_plugins:
            raise BackendBuildError(
                f"{what} needs TensorRT plugin layers, which {self.name} {self.version} lacks "
                "(TensorRT-RTX has no plugins); install full TensorRT (pip install tensorrt) "
                "on a machine with an NVIDIA GPU, or choose a recipe without plugins"
            )

    def require_kv_cache_update(self, what: str) -> None:
        if not self.supports_kv_cache_update:
            since = ".".join(map(str, KV_CACHE_UPDATE_SINCE))
            raise BackendBuildError(
                f"{what} needs TensorRT's KVCacheUpdate layer, which appears in TensorRT {since}; {self.name} "
                f"{self.version} lacks it: pip install 'tensorrt>={since}' (or tensorrt-rtx-cu13)")


KV_CACHE_UPDATE_SINCE = (10, 15)


def _release(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string; (0,) when it has no numbers."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2]) or (0,)


def _load(name: str) -> Backend:
    trt = importlib.import_module(name)
    return Backend(trt=trt, name=name, version=str(getattr(trt, "__version__", "unknown")))


def get_backend() -> Backend:
    """Full TensorRT when importable (real engines for real GPUs), else TensorRT-RTX."""
    forced = os.environ.get("LLMC_BACKEND")
    names = (forced,) if forced else _CANDIDATES
    errors = []
    for name in names:
        if name not in _CANDIDATES:
            raise BackendBuildError(f"LLMC_BACKEND={name!r} is not one of {', '.join(_CANDIDATES)}")
        try:
            backend = _load(name)
            backend.trt.Builder  # the stub 'tensorrt' wheels import but have no Builder
            return backend
        except (ImportError, AttributeError, OSError) as exc:
            errors.append(f"{name}: {exc}")
    raise BackendBuildError(
        "no TensorRT backend importable (" + "; ".join(errors) + "); install tensorrt or tensorrt-rtx-cu13"
    )
