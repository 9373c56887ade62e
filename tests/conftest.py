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
def llama(model_dirs):
    from compiler.load import load_model

    return load_model(model_dirs["llama"])


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
