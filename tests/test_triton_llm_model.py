"""The `llm` Triton model's own code (compiler/serving/triton_models/llm.py), driven the way Triton drives it.

Two STAND-INS, because neither a GPU nor a TensorRT engine exists here: `triton_python_backend_utils`
(it exists only inside Triton's Python-backend stub; this one follows the calls llmc's models make:
Tensor, InferenceResponse, get_input_tensor_by_name, a response sender), and the engine executor
(tests/test_scheduler_device.py's in-place stand-in over the bundled model's fp16 graph, in place of
TensorRTExecutor over model.plan). What is real: the model's initialize / execute / finalize, the
in-flight scheduler and the device cache manager it picks. Concurrent requests must each get the
tokens of their solo run.
"""

from __future__ import annotations

import json
import sys
import threading
import types

import numpy as np
import pytest

from compiler.runtime.device_cache import DeviceSlotCache
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.runtime.runner import Runner
from tests.test_scheduler_device import InPlaceStandIn

PAD = 3
FINAL = 1


def _pb_utils():
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL
    pb.Logger = types.SimpleNamespace(log_info=lambda m: None, log_warn=print, log_error=print)

    class Tensor:
        def __init__(self, name, array):
            self.name, self.array = name, np.asarray(array)

        def as_numpy(self):
            return self.array

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.output_tensors, self.error = list(output_tensors), error

    pb.Tensor, pb.InferenceResponse = Tensor, InferenceResponse
    pb.TritonError = lambda message: message
    pb.get_input_tensor_by_name = lambda request, name: request.inputs.get(name)
    return pb


class _Sender:
    def __init__(self):
        self.tokens, self.errors, self.done = [], [], threading.Event()

    def send(self, response=None, flags=0):
        if response is not None and response.error:
            self.errors.append(response.error)
        elif response is not None:
            self.tokens.extend(int(t) for t in response.output_tensors[0].as_numpy().reshape(-1))
        if flags == FINAL:
            self.done.set()

    def is_cancelled(self):
        return False


class _Request:
    def __init__(self, pb, ids, max_tokens, name):
        self.inputs = {"input_ids": pb.Tensor("input_ids", np.array(ids, np.int64)),
                       "max_tokens": pb.Tensor("max_tokens", np.array([max_tokens], np.int32))}
        self.sender, self.name = _Sender(), name

    def get_response_sender(self):
        return self.sender

    def request_id(self):
        return self.name


@pytest.fixture()
def llm_module(monkeypatch, trained_fp16):
    """compiler.serving.triton_models.llm imported over the stand-in pb_utils, its executor the stand-in."""
    pb = _pb_utils()
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    for name in [m for m in sys.modules if m.startswith("compiler.serving.triton_models")]:
        monkeypatch.delitem(sys.modules, name)
    import compiler.serving.triton_models.llm as llm

    monkeypatch.setattr(llm, "TensorRTExecutor", lambda path: InPlaceStandIn(OnnxRuntimeExecutor(trained_fp16)))
    yield pb, llm
    for name in [m for m in sys.modules if m.startswith("compiler.serving.triton_models")]:
        sys.modules.pop(name, None)  # modules built on the stand-in are not for other tests


def test_llm_serves_concurrent_requests_through_the_device_cache(llm_module, trained_fp16, tmp_path):
    pb, llm = llm_module
    (tmp_path / "llm" / "1").mkdir(parents=True)
    (tmp_path / "llm" / "1" / "model.plan").write_bytes(b"stand-in")
    params = {"llmc_pad_token_id": str(PAD), "llmc_stop_token_ids": "", "llmc_scheduler_max_batch": "3",
              "llmc_scheduler_tokens_per_step": "32"}
    args = {"model_config": json.dumps({"name": "llm", "parameters": {k: {"string_value": v}
                                                                      for k, v in params.items()}}),
            "model_repository": str(tmp_path / "llm"), "model_version": "1", "model_instance_kind": "CPU"}
    model = llm.TritonPythonModel()
    model.initialize(args)
    try:
        assert model.path.name == "model.plan" and isinstance(model.inflight.scheduler.cache, DeviceSlotCache)
        rng = np.random.default_rng(7)
        asks = [(rng.integers(4, 1024, n).tolist(), m) for n, m in [(6, 18), (25, 10), (3, 22), (11, 15), (2, 9)]]
        requests = [_Request(pb, ids, m, f"r{i}") for i, (ids, m) in enumerate(asks)]
        assert model.execute(requests[:3]) is None  # decoupled: answers come from the scheduler's thread
        assert model.execute(requests[3:]) is None
        for r in requests:
            assert r.sender.done.wait(60), r.name
    finally:
        model.finalize()
    solo = Runner(OnnxRuntimeExecutor(trained_fp16), pad_token_id=PAD)
    assert [r.sender.tokens for r in requests] == [solo.generate([ids], m).tokens[0] for ids, m in asks]
    assert not any(r.sender.errors for r in requests)
    assert max(s.rows for s in model.inflight.scheduler.steps) > 1  # requests shared graph calls


def test_llm_answers_a_request_that_cannot_fit_with_its_error(llm_module, tmp_path):
    pb, llm = llm_module
    (tmp_path / "llm" / "1").mkdir(parents=True)
    args = {"model_config": json.dumps({"name": "llm", "parameters": {"llmc_scheduler_max_batch": {"string_value": "2"}}}),
            "model_repository": str(tmp_path / "llm"), "model_version": "1"}
    model = llm.TritonPythonModel()
    model.initialize(args)
    try:
        request = _Request(pb, [5] * 250, 20, "too-long")
        model.execute([request])
        assert request.sender.done.wait(10)
    finally:
        model.finalize()
    assert request.sender.tokens == [] and request.sender.errors == [
        "269 positions needed but a sequence can hold at most 256 (--max-seq) in a cache of this size: "
        "shorten the prompt or max_tokens"]
