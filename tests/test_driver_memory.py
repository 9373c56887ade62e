"""The build's memory plan (compiler/driver/build.py): the PyTorch model is gone before onnxruntime loads
the compiled graph, and validate and quality share one session.

Why it matters: at 1B the FP32 model and the widened FP32 session are 4.9 GB each, and a second
session for the quality stage repeated the widening's transient peak (21 GB on a 24 GB machine).
"""

import weakref

import compiler.frontend.onnx_files as onnx_files
import compiler.stages.base as base_stage
import compiler.stages.engine as engine_stage
import compiler.stages.export as export_stage
import compiler.stages.load as load_stage
from compiler.driver.build import BuildRequest, run_build


def test_model_is_dropped_before_the_one_session_validate_and_quality_share(model_dirs, tmp_path, monkeypatch):
    models, sessions = [], []
    real_load, real_executor = load_stage.load_model, base_stage.OnnxRuntimeExecutor

    def load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        models.append(weakref.ref(loaded.model))
        return loaded

    def executor(path, *args, **kwargs):
        sessions.append({"model_alive": models[0]() is not None, "path": path, "arena": kwargs.get("arena", True)})
        return real_executor(path, *args, **kwargs)

    monkeypatch.setattr(load_stage, "load_model", load)
    monkeypatch.setattr(base_stage, "OnnxRuntimeExecutor", executor)
    report = run_build(BuildRequest(model=model_dirs["llama"], recipe="fp16", output=tmp_path / "out",
                                    measure_quality=True))
    assert report["status"] == "pass"
    assert len(models) == 1 and models[0]() is None
    assert [s["model_alive"] for s in sessions] == [False]  # one session, created after the model was freed
    assert [s["arena"] for s in sessions] == [False]  # a one-shot check keeps no memory arena (runtime_onnx)
    # Both stages measured through it, against references computed before the export.
    assert report["numerics"].decode_steps == 16 and report["numerics"].max_abs_error < 0.1
    assert report["quality"].eval_tokens > 0 and report["quality"].agreement_tokens == 4 * 64
    assert report["timings_s"]["reference"] > 0


def test_exported_graph_is_freed_before_the_engine_build(model_dirs, tmp_path, monkeypatch):
    """Nothing keeps the export's graph (and the initializers it holds) alive once the passes wrote
    model.onnx: onnxscript's module-level rewrite rules used to (their matchers keep the last graph
    they matched), which at 1B held 3.6 GB through the build and validation."""
    graphs, at_build = [], []
    real_export, real_build = export_stage.export_graph, engine_stage.build_engine

    def export(*args, **kwargs):
        exported = real_export(*args, **kwargs)
        graphs.append(weakref.ref(exported.model.graph))
        return exported

    def build(*args, **kwargs):
        at_build.append(graphs[0]() is None)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(export_stage, "export_graph", export)
    monkeypatch.setattr(engine_stage, "build_engine", build)
    report = run_build(BuildRequest(model=model_dirs["llama"], recipe="fp16", output=tmp_path / "out"))
    assert report["status"] == "pass"
    assert len(graphs) == 1 and at_build == [True]


def test_weights_over_the_threshold_go_to_external_data_and_a_child_build(model_dirs, tmp_path, monkeypatch):
    """The layout of every model over EXTERNAL_DATA_THRESHOLD (256 MiB): model.onnx + model.onnx.data,
    the engine built in a spawned child, validated and packaged like any other build."""
    children = []
    real = engine_stage.build_engine_isolated

    def isolated(*args, **kwargs):
        children.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(engine_stage, "build_engine_isolated", isolated)
    out = tmp_path / "out"
    report = run_build(BuildRequest(model=model_dirs["llama"], recipe="fp16", output=out))
    assert report["status"] == "pass" and report["numerics"].max_abs_error < 0.1
    assert [c.name for c in children] == ["model.onnx"]  # the staged graph, built in a child
    assert report["backend"]["builder_peak_rss_bytes"] > (out / "model.plan").stat().st_size  # the child's own peak
    assert report["memory"]["builder_peak_rss_bytes"] == report["backend"]["builder_peak_rss_bytes"]
    assert (out / "model.onnx.data").stat().st_size > (out / "model.onnx").stat().st_size
