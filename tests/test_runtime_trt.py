"""TensorRT engine execution: real runtime code, run only where a TensorRT engine can execute."""

import numpy as np
import pytest

from compiler.engine.backend import get_backend
from compiler.runtime.trt_executor import ExecutionUnavailable, TensorRTExecutor, host_dtype, to_device, to_host, torch_dtypes

REASON = get_backend().execution_unavailable_reason()


def test_unavailable_is_reported_not_faked(tmp_path):
    if REASON is None:
        pytest.skip("a runnable TensorRT is present: nothing to refuse")
    with pytest.raises(ExecutionUnavailable) as err:
        TensorRTExecutor(tmp_path / "missing.plan")
    assert str(err.value) == REASON


@pytest.mark.skipif(REASON is not None, reason=f"no runnable TensorRT here: {REASON}")
def test_engine_generation_matches_onnxruntime(llama, tmp_path):  # pragma: no cover - needs a GPU TensorRT runs on
    from compiler.driver.build import BuildRequest, run_build
    from compiler.runtime.runner import Runner
    from compiler.runtime.onnx_executor import OnnxRuntimeExecutor

    report = run_build(BuildRequest(model=llama.path, output=tmp_path / "out"))
    out = tmp_path / "out"
    prompts = [[1, 5, 9, 13], [7, 3]]
    trt_runner = Runner(TensorRTExecutor(out / "model.plan"))
    ort_runner = Runner(OnnxRuntimeExecutor(out / "model.onnx"))
    a, b = trt_runner.prefill(prompts), ort_runner.prefill(prompts)
    np.testing.assert_allclose(a, b, atol=report["recipe"]["tolerance"].max_abs_logit_error)
    assert trt_runner.generate(prompts, 16).tokens == ort_runner.generate(prompts, 16).tokens


def test_every_bindable_tensorrt_dtype_maps_to_a_torch_dtype_of_its_size():
    """The installed TensorRT(-RTX)'s DataTypes, BF16 and FP8 included (trt.nptype raises for those two)."""
    import torch

    trt = get_backend().trt
    table = torch_dtypes(trt, torch)
    assert table[trt.bfloat16] == torch.bfloat16 and table[trt.fp8] == torch.float8_e4m3fn
    assert {trt.float32, trt.float16, trt.int32, trt.int64, trt.int8, trt.bool, trt.uint8} <= set(table)
    for trt_dtype, torch_dtype in table.items():
        assert torch.empty(0, dtype=torch_dtype).element_size() == trt_dtype.itemsize, trt_dtype
    for trt_dtype in (trt.bfloat16, trt.fp8):
        with pytest.raises(TypeError):
            trt.nptype(trt_dtype)


def test_fp8_travels_as_its_bytes_and_bf16_as_float32():
    """Host <-> buffer conversions, on the CPU device (the executor passes "cuda"): FP8 E4M3 bytes are
    reinterpreted, not converted (0x38 is 1.0, 0xC0 is -2.0); BF16 rounds to nearest even and widens exactly."""
    import torch

    fp8 = torch.float8_e4m3fn
    assert host_dtype(fp8) == np.uint8 and host_dtype(torch.bfloat16) == np.float32
    assert host_dtype(torch.float16) == np.float16 and host_dtype(torch.int64) == np.int64
    raw = np.arange(256, dtype=np.uint8).reshape(4, 64)
    buf = to_device(raw, fp8, "cpu")
    assert buf.dtype == fp8 and buf.shape == (4, 64)
    assert buf.view(torch.uint8).numpy().tobytes() == raw.tobytes()
    assert float(buf[0, 0x38]) == 1.0 and float(buf[3, 0xC0 - 192]) == -2.0
    assert to_host(buf).dtype == np.uint8 and np.array_equal(to_host(buf), raw)
    values = np.array([1.5, -3.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)
    back = to_host(to_device(values, torch.bfloat16, "cpu"))
    assert back.dtype == np.float32 and back.tolist() == [1.5, -3.0, 1.0, 1 + 2 ** -6]
    ids = to_device(np.array([[1, 2]], np.int32), torch.int64, "cpu")
    assert ids.dtype == torch.int64 and to_host(ids).tolist() == [[1, 2]]


class StandInEngine:
    """Only `get_tensor_dtype`, as ICudaEngine has it: no engine can be deserialized without a GPU."""

    def __init__(self, dtypes):
        self.dtypes = dtypes

    def get_tensor_dtype(self, name):
        return self.dtypes[name]


def test_executor_binds_fp8_cache_and_bf16_logits():
    import torch

    trt = get_backend().trt
    executor = TensorRTExecutor.__new__(TensorRTExecutor)  # no __init__: it needs a GPU
    executor._trt, executor._torch = trt, torch
    executor.engine = StandInEngine({"past_key_values.0.key": trt.fp8, "logits": trt.bfloat16,
                                     "input_ids": trt.int64, "x": trt.int4})
    assert executor._torch_dtype("past_key_values.0.key") == torch.float8_e4m3fn
    assert executor.input_dtype("past_key_values.0.key") == np.uint8
    assert executor._torch_dtype("logits") == torch.bfloat16 and executor.input_dtype("logits") == np.float32
    assert executor.input_dtype("input_ids") == np.int64
    with pytest.raises(ValueError, match="x is DataType.INT4"):
        executor._torch_dtype("x")
