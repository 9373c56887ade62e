"""Shared fixtures: tiny random models of real architectures, written as HF directories.

Exports are expensive (tens of seconds), so each architecture is exported once per session.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def llmc_cache(tmp_path_factory):
    """Generated models and caches live in this session's temp dir, never in the user's home."""
    path = tmp_path_factory.mktemp("llmc-cache")
    os.environ["LLMC_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    from compiler.default_model import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / f"tiny-{arch}", arch, seed=i) for i, arch in enumerate(("llama", "qwen2", "mistral"))}


@pytest.fixture(scope="session")
def llama(loaded_models):
    return loaded_models["llama"]


@pytest.fixture(scope="session")
def llama_export(llama, llmc_cache):
    """The FP32 export of the tiny Llama, saved once; tests load their own copy to mutate."""
    import onnx_ir as ir

    from compiler.export import export_onnx

    graph = export_onnx(llama)
    path = llmc_cache / "test-llama-fp32.onnx"
    ir.save(graph.model, path)
    return path, graph.io


@pytest.fixture()
def fresh_llama_model(llama_export):
    import onnx_ir as ir

    return ir.load(llama_export[0])


FINAL_FP32_PASSES = ("cleanup", "rotary-2d-cache", "gqa-native-attention", "kv-cache-scatter", "cleanup")
CAPACITY = 128


def final_graph(loaded, path: Path, passes=FINAL_FP32_PASSES, capacity: int = CAPACITY, exported: Path | None = None) -> Path:
    """Export (or reuse `exported`) + the fp16 recipe's rewrites (without the FP16 lowering unless asked)."""
    import onnx_ir as ir

    from compiler.export import export_onnx
    from compiler.pipeline import run_passes
    from compiler.runtime import io_from_model
    from compiler.types import ExportedGraph, Recipe, Tolerance
    from passes import PassContext

    if exported is not None:
        model = ir.load(exported)
        source = ExportedGraph(model, io_from_model(model))
    else:
        source = export_onnx(loaded)
    graph, _ = run_passes(source, Recipe("test", "", tuple(passes), Tolerance(1, 1, 0)),
                          PassContext(max_positions=capacity))
    ir.save(graph.model, path)
    return path


@pytest.fixture(scope="session")
def loaded_models(model_dirs):
    from compiler.load import load_model

    return {arch: load_model(path) for arch, path in model_dirs.items()}


@pytest.fixture(scope="session")
def final_fp32(loaded_models, llmc_cache, llama_export):
    """arch -> the rewritten FP32 graph (fixed-capacity cache, native GQA attention), built lazily."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            reuse = llama_export[0] if arch == "llama" else None
            built[arch] = final_graph(loaded_models[arch], llmc_cache / f"final-{arch}-fp32.onnx", exported=reuse)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def final_fp16_llama(llama, llmc_cache, llama_export) -> Path:
    """The fp16 recipe's graph for the tiny Llama, from the session's export."""
    from compiler.recipe import load_recipe

    return final_graph(llama, llmc_cache / "final-llama-fp16.onnx", passes=load_recipe("fp16").passes,
                       exported=llama_export[0])


# --- the shipped trained model: every accuracy claim about quantization is made on it -------------

@pytest.fixture(scope="session")
def trained():
    from compiler.default_model import default_model_dir
    from compiler.load import load_model

    return load_model(default_model_dir())


@pytest.fixture(scope="session")
def trained_fp16(trained, llmc_cache) -> Path:
    """The fp16 recipe's graph of the trained model (capacity 256), exported once per session."""
    from compiler.recipe import load_recipe

    return final_graph(trained, llmc_cache / "trained-fp16.onnx", passes=load_recipe("fp16").passes, capacity=256)


@pytest.fixture(scope="session")
def trained_build_cache(tmp_path_factory):
    """One --cache-dir for every CLI build of the trained model: the export is made once per session."""
    return tmp_path_factory.mktemp("trained-build-cache")


@pytest.fixture(scope="session")
def trained_calibration(trained):
    from compiler.calibrate import calibrate
    from compiler.corpus import default_calibration_text

    return calibrate(trained, default_calibration_text(), max_windows=16)


@pytest.fixture(scope="session")
def trained_quantized(trained_fp16, trained_calibration, llmc_cache):
    """(pass name, options) -> path of the trained fp16 graph quantized by that pass, built lazily."""
    import json

    import onnx_ir as ir

    from passes import PassContext, make_pass

    built: dict[str, Path] = {}

    def get(name: str, **options) -> Path:
        key = f"{name}-{json.dumps(options, sort_keys=True)}"
        if key not in built:
            model = ir.load(trained_fp16)
            ctx = PassContext(max_positions=256, activations=trained_calibration.activations)
            assert make_pass(name, ctx, options)(model).modified
            path = llmc_cache / f"trained-{len(built)}.onnx"
            ir.save(model, path)
            built[key] = path
        return built[key]

    return get


@pytest.fixture(scope="session")
def cached_build(model_dirs, tmp_path_factory):
    """One cold `llmc build --cache-dir` of the tiny Llama; later builds in the session reuse its cache.

    Returns (artifact dir, cache dir, report, wall seconds of the cold build).
    """
    import json
    import time

    from click.testing import CliRunner

    from compiler.cli import main

    root = tmp_path_factory.mktemp("cached-build")
    out, cache = root / "out", root / "cache"
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "--max-seq", "128", "-o", str(out),
                                       "--cache-dir", str(cache)])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    return out, cache, json.loads((out / "report.json").read_text()), seconds
