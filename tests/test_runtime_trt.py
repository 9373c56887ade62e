"""TensorRT engine execution: real runtime code, run only where a TensorRT engine can execute."""

import numpy as np
import pytest

from compiler.backend import get_backend
from compiler.runtime_trt import ExecutionUnavailable, TensorRTExecutor

REASON = get_backend().execution_unavailable_reason()


def test_unavailable_is_reported_not_faked(tmp_path):
    if REASON is None:
        pytest.skip("a runnable TensorRT is present: nothing to refuse")
    with pytest.raises(ExecutionUnavailable) as err:
        TensorRTExecutor(tmp_path / "missing.plan")
    assert str(err.value) == REASON


@pytest.mark.skipif(REASON is not None, reason=f"no runnable TensorRT here: {REASON}")
def test_engine_matches_onnxruntime(llama, tmp_path):  # pragma: no cover - needs a GPU TensorRT runs on
    from compiler.driver import BuildRequest, run_build
    from compiler.export import graph_io
    from compiler.runtime import KVCacheSession
    from compiler.runtime_onnx import OnnxRuntimeExecutor

    report = run_build(BuildRequest(model=llama.path, output=tmp_path / "out"))
    out = tmp_path / "out"
    io = graph_io(llama)
    trt_session = KVCacheSession(TensorRTExecutor(out / "model.plan"), io)
    ort_session = KVCacheSession(OnnxRuntimeExecutor(out / "model.onnx"), io)
    ids = np.array([[1, 5, 9, 13]])
    for _ in range(4):
        a, b = trt_session.step(ids), ort_session.step(ids)
        np.testing.assert_allclose(a, b, atol=report["recipe"]["tolerance"].max_abs_logit_error)
        ids = a[:, -1:].argmax(-1)
