"""Engine: the final ONNX parsed and built by TensorRT(-RTX) into model.plan (compiler/engine/engine_build.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from compiler.stages.state import BuildState
from compiler.engine.engine_build import EngineArtifact, build_engine, build_engine_isolated
from compiler.graph_io import TensorInfo
from compiler.stages.base import Stage, read_meta, restore_files


def serving_warnings(backend) -> list[str]:
    if backend.name == "tensorrt_rtx":
        return [f"model.plan was built by TensorRT-RTX {backend.version}: Triton's TensorRT backend and "
                "data-center GPUs can't load it; rebuild with full TensorRT (pip install tensorrt) to serve it"]
    return []


class Engine(Stage):
    name = "build"
    writes = ("engine",)
    cached = True
    chains_on = "passes"

    def key_inputs(self, state: BuildState) -> dict:
        opts = state.request.options
        return {"max_batch": opts.max_batch, "max_seq": opts.max_seq, "backend": state.backend.name,
                "backend_version": state.backend.version}

    def run(self, state: BuildState) -> None:
        plan, onnx_path = state.staging / "model.plan", state.staging / "model.onnx"
        big = (state.staging / "model.onnx.data").exists()  # weights beside the graph: build in a child
        build = build_engine_isolated if big else build_engine
        state.engine = build(onnx_path, plan, state.request.options, state.backend, state.timing_cache)

    def save(self, state: BuildState, scratch: Path) -> tuple[dict[str, Path], dict]:
        e = state.engine
        meta = {"backend": e.backend, "backend_version": e.backend_version,
                "tensors": [dataclasses.asdict(t) for t in e.tensors], "layer_types": e.layer_types,
                "timing_cache": e.timing_cache, "builder_peak_rss_bytes": e.builder_peak_rss_bytes}
        return {"model.plan": e.plan_path}, meta

    def restore(self, state: BuildState, entry: Path) -> None:
        restore_files(entry, ("model.plan",), state.staging)
        data = read_meta(entry)
        state.engine = EngineArtifact(
            plan_path=state.staging / "model.plan", onnx_path=state.staging / "model.onnx", backend=data["backend"],
            backend_version=data["backend_version"],
            tensors=[TensorInfo(t["name"], t["dtype"], tuple(t["shape"]), t["is_input"]) for t in data["tensors"]],
            layer_types=data["layer_types"], seconds=0.0, timing_cache=data["timing_cache"],
            builder_peak_rss_bytes=data.get("builder_peak_rss_bytes"))

    def detail(self, state: BuildState) -> str:
        e = state.engine
        return f"{e.backend} {e.backend_version}, {e.plan_path.stat().st_size / 1e6:.2f} MB"

    def report(self, state: BuildState) -> dict:
        b, e = state.backend, state.engine
        return {"backend": {"name": b.name, "version": b.version, "supports_plugins": b.supports_plugins,
                            "timing_cache": e.timing_cache, "builder_peak_rss_bytes": e.builder_peak_rss_bytes},
                "engine": {"layer_types": e.layer_types, "io": e.tensors}}

    def warnings(self, state: BuildState) -> list[str]:
        return serving_warnings(state.backend)
