"""Export: the PyTorch model -> ONNX with the KV cache as graph I/O (compiler/frontend/export.py).

Its cache key covers the model's files, llmc's code and the exporting tools' versions; `llmc analyze`
and the test suite read and write the same entries through `export_key` / `export_and_store`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import onnx_ir as ir

from compiler.driver.cache import StageCache, stage_key
from compiler.driver.state import BuildState
from compiler.errors import UnsupportedModelError
from compiler.frontend.export import export_onnx
from compiler.frontend.onnx_files import onnx_files, save_onnx
from compiler.graph_io import ExportedGraph
from compiler.report.report_json import tool_versions
from compiler.runtime.executor import io_from_model
from compiler.stages.base import Stage

EXPORT_TOOLS = ("torch", "transformers", "onnx", "onnxscript", "onnx-ir")


def export_inputs(cache: StageCache, model_path: Path, trust_remote_code: bool) -> dict:
    versions = tool_versions()
    return {"model": cache.dir_digest(model_path), "trust_remote_code": trust_remote_code,
            **{t: versions.get(t) for t in EXPORT_TOOLS}}


def export_key(cache: StageCache, model_path: Path, trust_remote_code: bool = False) -> str:
    return stage_key("export", export_inputs(cache, model_path, trust_remote_code))


def export_graph(loaded) -> ExportedGraph:
    try:
        return export_onnx(loaded)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the first line says which
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"torch.onnx export of {loaded.spec.architecture} failed: {first} "
            "(set LLMC_DEBUG=1 for the traceback; please report the model config)"
        ) from exc


def store_graph(graph: ExportedGraph, cache: StageCache, key: str, scratch: Path) -> None:
    """Save the graph under `key` (through `scratch`, a directory removed afterwards)."""
    if not cache.enabled:
        return
    scratch.mkdir()
    try:
        save_onnx(graph.model, scratch / "model.onnx")
        cache.put("export", key, onnx_files(scratch), {"seconds": graph.seconds})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_graph(entry: Path) -> ExportedGraph:
    model = ir.load(entry / "model.onnx")
    return ExportedGraph(model=model, io=io_from_model(model))


def export_and_store(loaded, cache: StageCache, key: str, scratch: Path) -> ExportedGraph:
    graph = export_graph(loaded)
    store_graph(graph, cache, key, scratch)
    return graph


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
