"""Export: the PyTorch model -> ONNX with the KV cache as graph I/O (compiler/frontend/export.py).

Its cache key covers the model's files, llmc's code and the exporting tools' versions; `llmc analyze`
and the test suite's shared export run this same stage, so they read and write the same entries.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from compiler.stages.state import BuildState
from compiler.errors import UnsupportedModelError
from compiler.frontend.export import export_onnx
from compiler.frontend.onnx_files import onnx_files, save_onnx
from compiler.graph_io import ExportedGraph
from compiler.report.report_json import tool_versions
from compiler.graph_io import io_from_model
from compiler.stages.base import Stage

EXPORT_TOOLS = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")


def export_inputs(cache, model_path: Path, trust_remote_code: bool) -> dict:
    versions = tool_versions()
    return {"model": cache.dir_digest(model_path), "trust_remote_code": trust_remote_code,
            **{t: versions.get(t) for t in EXPORT_TOOLS}}


def export_graph(loaded) -> ExportedGraph:
    try:
        return export_onnx(loaded)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the first line says which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"torch.onnx export of {loaded.spec.architecture} failed: {first} "
            "(set LLMC_DEBUG=1 for the traceback; please report the model config)"
        ) from exc


def load_graph(entry: Path) -> ExportedGraph:
    model = ir.load(entry / "model.onnx")
    return ExportedGraph(model=model, io=io_from_model(model))


class Export(Stage):
    name = "export"
    reads = ("loaded",)
    writes = ("exported",)
    cached = True

    def skip_reason(self, state: BuildState) -> str | None:
        # The export is only the passes' input: with passes cached it is not even read.
        return "passes are cached" if state.hits.get("passes") else None

    def key_inputs(self, state: BuildState) -> dict:
        return export_inputs(state.cache, state.model_path, state.request.trust_remote_code)

    def run(self, state: BuildState) -> None:
        state.exported = export_graph(state.loaded)

    def save(self, state: BuildState, scratch: Path) -> tuple[dict[str, Path], dict]:
        save_onnx(state.exported.model, scratch / "model.onnx")
        return onnx_files(scratch), {"seconds": state.exported.seconds}

    def restore(self, state: BuildState, entry: Path) -> None:
        state.exported = load_graph(entry)

    def detail(self, state: BuildState) -> str:
        return f"{len(state.exported.model.graph)} nodes"
