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
def test_engine_generation_matches_onnxruntime(llama, tmp_path):  # pragma: no cover - needs a GPU TensorRT runs on
    from compiler.driver import BuildRequest, run_build
    from compiler.runner import Runner
    from compiler.runtime_onnx import OnnxRuntimeExecutor

    report = run_build(BuildRequest(model=llama.path, output=tmp_path / "out"))
    out = tmp_path / "out"
    prompts = [[1, 5, 9, 13], [7, 3]]
    trt_runner = Runner(TensorRTExecutor(out / "model.plan"))
    ort_runner = Runner(OnnxRuntimeExecutor(out / "model.onnx"))
    a, b = trt_runner.prefill(prompts), ort_runner.prefill(prompts)
    np.testing.assert_allclose(a, b, atol=report["recipe"]["tolerance"].max_abs_logit_error)
    assert trt_runner.generate(prompts, 16).tokens == ort_runner.generate(prompts, 16).tokens
