"""The build's memory plan (compiler/driver.py): the PyTorch model is gone before onnxruntime loads
the compiled graph, and validate and quality share one session.

Why it matters: at 1B the FP32 model and the widened FP32 session are 4.9 GB each, and a second
session for the quality stage repeated the widening's transient peak (21 GB on a 24 GB machine).
"""

import weakref

import compiler.driver as driver
from compiler.driver import BuildRequest, run_build


def test_model_is_dropped_before_the_one_session_validate_and_quality_share(model_dirs, tmp_path, monkeypatch):
    models, sessions = [], []
    real_load, real_executor = driver.load_model, driver.OnnxRuntimeExecutor

    def load(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        models.append(weakref.ref(loaded.model))
        return loaded

    def executor(path, *args, **kwargs):
        sessions.append({"model_alive": models[0]() is not None, "path": path})
        return real_executor(path, *args, **kwargs)

    monkeypatch.setattr(driver, "load_model", load)
    monkeypatch.setattr(driver, "OnnxRuntimeExecutor", executor)
    report = run_build(BuildRequest(model=model_dirs["llama"], recipe="fp16", output=tmp_path / "out",
                                    measure_quality=True))
    assert report["status"] == "pass"
    assert len(models) == 1 and models[0]() is None
    assert [s["model_alive"] for s in sessions] == [False]  # one session, created after the model was freed
    # Both stages measured through it, against references computed before the export.
    assert report["numerics"].decode_steps == 16 and report["numerics"].max_abs_error < 0.1
    assert report["quality"].eval_tokens > 0 and report["quality"].agreement_tokens == 4 * 64
    assert report["timings_s"]["reference"] > 0
