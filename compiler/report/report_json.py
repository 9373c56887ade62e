"""report.json: the build's machine-readable record, and the tool versions every record carries."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import platform
from pathlib import Path

_TOOLS = ("llmc", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime",
          "tensorrt", "tensorrt-rtx-cu13", "tensorrt_rtx_cu13", "polygraphy", "tritonclient", "numpy")


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in _TOOLS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(_jsonable(report), indent=2, sort_keys=False) + "\n")
