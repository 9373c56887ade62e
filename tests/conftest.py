"""Shared fixtures: tiny random models of real architectures, written as HF directories.

Exports are expensive (tens of seconds), so each architecture is exported once per session.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

import pytest


ARCHS = ("llama", "qwen2", "mistral")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Parallel workers share the cores: one compute thread each (torch / OpenMP, onnxruntime; inherited by
    # the builds tests run as subprocesses). Two workers of two spinning threads each on 2 cores made
    # every test 2-4x slower than running alone (OpenMP and onnxruntime threads busy-wait for each other).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("LLMC_ORT_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The test command runs two xdist workers, one file per worker at a time (`--dist loadfile`), taking
# files in collection order: the longest files go first, so the two workers finish close together.
LONGEST_FIRST = ("test_precision_search.py", "test_export_stamp.py", "test_cli_quantized.py", "test_cli.py",
                 "test_runner.py", "test_bad_input.py", "test_triton_server.py", "test_pass_check.py", "test_quality.py",
                 "test_build.py", "test_cache.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order is kept within a file


@pytest.fixture(scope="session", autouse=True)
def llmc_cache(tmp_path_factory):
    """Generated models and caches live in this session's temp dir, never in the user's home."""
    path = tmp_path_factory.mktemp("llmc-cache")
    os.environ["LLMC_CACHE"] = str(path)
    return path


def _shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory every pytest-xdist worker of this run sees (their base temp dirs share a parent).

    LLMC_TEST_SHARED names one kept across runs instead: mutation testing (tools/mutation/run) runs
    the tests once per mutant, and the tiny models and their exports (tens of seconds) are the same
    for every mutant of a pass; the stage cache keys exports by content, so a kept one is current."""
    if os.environ.get("LLMC_TEST_SHARED"):
        base = Path(os.environ["LLMC_TEST_SHARED"])
        base.mkdir(parents=True, exist_ok=True)
    else:
        base = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            base = base.parent
    path = base / name
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Held by one worker at a time: the others wait, then find what it made."""
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _once(tmp_path_factory, name: str, make):
    """`make(dir)` run once per test run (across workers) in a shared directory; returns the directory."""
    root = _shared_dir(tmp_path_factory, "once")
    done = root / name
    with _exclusive(root / f".{name}.lock"):
        if not (done / ".complete").is_file():  # made in place (paths inside stay true), marked last
            shutil.rmtree(done, ignore_errors=True)
            done.mkdir()
            make(done)
            (done / ".complete").touch()
    return done


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    from compiler.frontend.default_model import make_tiny_model

    def make(root):
        for i, arch in enumerate(ARCHS):
            make_tiny_model(root / f"tiny-{arch}", arch, seed=i)

    root = _once(tmp_path_factory, "models", make)
    return {arch: root / f"tiny-{arch}" for arch in ARCHS}


@pytest.fixture(scope="session")
def build_cache(tmp_path_factory) -> Path:
    """The stage cache (`--cache-dir`) shared by this run's builds and exports, across xdist workers.

    torch.onnx export costs tens of seconds even for a tiny model; with this, each test model is
    exported once per run. Tests *about* the cache (test_cache.py) use a cold one of their own.
    """
    return _shared_dir(tmp_path_factory, "stage-cache")


@pytest.fixture(scope="session")
def exported(build_cache):
    """(model dir, loaded model or None) -> path of the model's export in the shared stage cache.

    The same entry, keyed the same way, that `llmc build --cache-dir` reads and writes.
    """
    import tempfile

    from compiler.driver.build import plan, prepare, run_stages
    from compiler.frontend.load import load_model
    from compiler.stages.export import Export
    from compiler.stages.request import BuildRequest, Progress

    def get(model_dir: Path, loaded=None) -> Path:
        with tempfile.TemporaryDirectory(dir=build_cache.parent) as staging:
            state = prepare(BuildRequest(model=model_dir, cache_dir=build_cache, output=Path(staging) / "out"),
                            Progress(), staging=Path(staging))
            stages = [Export()]
            plan(stages, state)
            key = state.keys["export"]
            with _exclusive(build_cache / f".export-{key[:16]}.lock"):
                outcome = plan(stages, state)  # another worker may have stored it meanwhile
                if outcome["export"] == "run":
                    state.loaded = loaded or load_model(model_dir)
                    run_stages(stages, state, outcome)
        return state.cache.get("export", key) / "model.onnx"

    return get


@pytest.fixture(scope="session")
def llama(loaded_models):
    return loaded_models["llama"]


@pytest.fixture(scope="session")
def llama_export(llama, llmc_cache, model_dirs, exported):
    """The FP32 export of the tiny Llama (a copy of the shared cache's); tests load their own copy to mutate."""
    import onnx_ir as ir

    from compiler.graph_io import io_from_model

    path = llmc_cache / "test-llama-fp32.onnx"
    shutil.copyfile(exported(model_dirs["llama"], llama), path)
    return path, io_from_model(ir.load(path))


@pytest.fixture()
def fresh_llama_model(llama_export):
    import onnx_ir as ir

    return ir.load(llama_export[0])


FINAL_FP32_PASSES = ("cleanup", "rotary-2d-cache", "gqa-native-attention", "kv-cache-scatter", "cleanup")
CAPACITY = 128


def fp16_lowering() -> list[str]:
    """The fp16 recipe's passes up to its FP32 logits (logits-fp32-topk, its last): the graph the quantizing
    recipes quantize and end with (recipes/int4-*.yaml stop at last-position-logits), so a quantization
    test's FP16 graph is the one those recipes lower to."""
    from compiler.recipe import load_recipe

    passes = list(load_recipe("fp16").passes)
    assert passes[-1] == "logits-fp32-topk"
    return passes[:-1]


def final_graph(loaded, path: Path, passes=FINAL_FP32_PASSES, capacity: int = CAPACITY, exported: Path | None = None) -> Path:
    """Export (or reuse `exported`) + the fp16 recipe's rewrites (without the FP16 lowering unless asked)."""
    import onnx_ir as ir

    from compiler.frontend.export import export_onnx
    from compiler.frontend.run_passes import run_passes
    from compiler.graph_io import io_from_model
    from compiler.graph_io import ExportedGraph
    from compiler.recipe import Recipe, Tolerance
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
    from compiler.frontend.load import load_model

    return {arch: load_model(path) for arch, path in model_dirs.items()}


@pytest.fixture(scope="session")
def final_fp32(loaded_models, llmc_cache, model_dirs, exported):
    """arch -> the rewritten FP32 graph (fixed-capacity cache, native GQA attention), built lazily."""
    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            source = exported(model_dirs[arch], loaded_models[arch])
            built[arch] = final_graph(loaded_models[arch], llmc_cache / f"final-{arch}-fp32.onnx", exported=source)
        return built[arch]

    return get


@pytest.fixture(scope="session")
def final_fp16_llama(llama, llmc_cache, llama_export) -> Path:
    """The fp16 recipe's graph for the tiny Llama up to its FP32 logits (fp16_lowering), from the session's export."""
    return final_graph(llama, llmc_cache / "final-llama-fp16.onnx", passes=fp16_lowering(),
                       exported=llama_export[0])


# --- the shipped trained model: every accuracy claim about quantization is made on it -------------

@pytest.fixture(scope="session")
def trained():
    from compiler.frontend.default_model import default_model_dir
    from compiler.frontend.load import load_model

    return load_model(default_model_dir())


@pytest.fixture(scope="session")
def trained_fp16(trained, exported, tmp_path_factory) -> Path:
    """The fp16 recipe's graph of the trained model up to its FP32 logits (fp16_lowering; capacity 256), made
    once per run from its one export."""
    from compiler.frontend.default_model import default_model_dir

    def make(folder: Path):
        final_graph(trained, folder / "model.onnx", passes=fp16_lowering(), capacity=256,
                    exported=exported(default_model_dir(), trained))

    return _once(tmp_path_factory, "trained-fp16", make) / "model.onnx"


@pytest.fixture(scope="session")
def trained_build_cache(build_cache):
    """The --cache-dir of every CLI build of the trained model: the export is made once per run."""
    return build_cache


@pytest.fixture(scope="session")
def trained_calibration(trained):
    from compiler.frontend.calibrate import calibrate
    from compiler.frontend.corpus import default_calibration_text

    return calibrate(trained, default_calibration_text(), max_windows=16)


@pytest.fixture(scope="session")
def trained_quantized(trained_fp16, request, tmp_path_factory):
    """(pass name, options) -> path of the trained fp16 graph quantized by that pass, made once per run."""
    import hashlib
    import json

    import onnx_ir as ir

    from passes import PassContext, make_pass

    def get(name: str, **options) -> Path:
        key = hashlib.sha256(f"{name}-{json.dumps(options, sort_keys=True)}".encode()).hexdigest()[:16]

        def make(folder: Path):
            model = ir.load(trained_fp16)
            activations = request.getfixturevalue("trained_calibration").activations  # calibrated only if needed
            assert make_pass(name, PassContext(max_positions=256, activations=activations), options)(model).modified
            ir.save(model, folder / "model.onnx")

        return _once(tmp_path_factory, f"trained-{name}-{key}", make) / "model.onnx"

    return get


@pytest.fixture(scope="session")
def cached_build(model_dirs, tmp_path_factory):
    """One cold `llmc build --cache-dir` of the tiny Llama; later builds in the session reuse its cache.

    Returns (artifact dir, cache dir, report, wall seconds of the cold build).
    """
    import json
    import time

    from click.testing import CliRunner

    from compiler.commands.cli import main

    def make(root: Path):
        start = time.perf_counter()
        result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "--max-seq", "128", "-o",
                                           str(root / "out"), "--cache-dir", str(root / "cache")])
        assert result.exit_code == 0, result.output
        (root / "seconds").write_text(str(time.perf_counter() - start))

    root = _once(tmp_path_factory, "cached-build", make)
    out = root / "out"
    return out, root / "cache", json.loads((out / "report.json").read_text()), float((root / "seconds").read_text())


def dequantize_ahead(model) -> None:
    """Replace every block-wise INT4 DequantizeLinear of `model` (in place) by the FP32 weight
    `QuantizedWeight.dequantize` gives: the reference a quantized graph must compute."""
    import onnx_ir as ir

    from passes.weight_quant import QuantizedWeight

    for node in list(model.graph):
        if node.op_type != "DequantizeLinear":
            continue
        q, scale = (v.const_value.numpy() for v in node.inputs[:2])
        w = QuantizedWeight(q, scale, 0, node.attributes["block_size"].as_int()).dequantize()
        const = ir.Value(name=node.outputs[0].name + ".const", const_value=ir.tensor(w, name=node.outputs[0].name + ".const"))
        const.type, const.shape = node.outputs[0].type, node.outputs[0].shape
        model.graph.register_initializer(const)
        node.outputs[0].replace_all_uses_with(const)
        model.graph.remove(node, safe=True)
