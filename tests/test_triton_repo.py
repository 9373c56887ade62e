"""The Triton repository: configs from the engine's own I/O, parsed back with Triton's ModelConfig proto.

That it loads and answers on a real server is tests/test_triton_server.py.
"""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from compiler.serving.triton_models import engine_version
from compiler.serving.triton_repo import check_config, make_config, triton_model_name, write_repository
from compiler.engine.engine_build import EngineArtifact
from compiler.graph_io import GraphIO, TensorInfo
from compiler.serving.triton_repo import ServingSpec


def _engine(tmp_path: Path, tensors=None) -> EngineArtifact:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00plan-bytes")
    tensors = tensors or [
        TensorInfo("input_ids", "int64", (-1, -1), True),
        TensorInfo("position_ids", "int64", (-1, -1), True),
        TensorInfo("past_key_values.0.key", "float16", (-1, 2, 64, 32), True),
        TensorInfo("past_key_values.0.value", "float16", (-1, 2, 64, 32), True),
        TensorInfo("logits", "float16", (-1, -1, 512), False),
        TensorInfo("present.0.key", "float16", (-1, 2, 64, 32), False),
        TensorInfo("present.0.value", "float16", (-1, 2, 64, 32), False),
    ]
    return EngineArtifact(plan, tmp_path / "model.onnx", "tensorrt_rtx", "1.7.1", tensors, {}, 0.0, "none")


def _serving(tmp_path: Path, cpu_fallback: bool) -> ServingSpec:
    tok = tmp_path / "tokenizer"
    tok.mkdir(exist_ok=True)
    (tok / "tokenizer.json").write_text("{}")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"onnx")
    return ServingSpec(max_batch=4, max_seq=64, io=GraphIO(1, 2, 32, 512, 64), tokenizer_dir=tok,
                       onnx_files=(onnx,), pad_token_id=0, stop_token_ids=(2,), cpu_fallback=cpu_fallback)


def _parse(model_dir: Path) -> mc.ModelConfig:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())


def test_llm_config_keeps_kv_cache_as_implicit_sequence_state(tmp_path):
    engine = _engine(tmp_path)
    models = write_repository(tmp_path / "triton", engine, _serving(tmp_path, cpu_fallback=False))
    assert sorted(models) == ["generate", "llm", "postprocessing", "preprocessing"]
    cfg = _parse(models["llm"])
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 4
    assert [i.name for i in cfg.input] == ["input_ids", "position_ids"]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("logits", [-1, 512])]
    assert cfg.input[0].data_type == mc.TYPE_INT64 and cfg.output[0].data_type == mc.TYPE_FP16
    states = {(s.input_name, s.output_name, tuple(s.dims)) for s in cfg.sequence_batching.state}
    assert states == {("past_key_values.0.key", "present.0.key", (2, 64, 32)),
                      ("past_key_values.0.value", "present.0.value", (2, 64, 32))}
    assert all(s.initial_state[0].zero_data for s in cfg.sequence_batching.state)
    assert cfg.sequence_batching.HasField("direct")
    assert cfg.parameters["llmc_backend_version"].string_value == "1.7.1"
    assert (models["llm"] / "1" / "model.plan").read_bytes() == engine.plan_path.read_bytes()
    gen = _parse(models["generate"])
    assert gen.model_transaction_policy.decoupled and gen.backend == "python"
    assert gen.parameters["llmc_targets"].string_value == "llm"
    assert gen.parameters["llmc_engine_version"].string_value == "1.7.1"
    assert (models["preprocessing"] / "1" / "tokenizer" / "tokenizer.json").is_file()
    assert "compiler.serving.triton_models.preprocessing" in (models["preprocessing"] / "1" / "model.py").read_text()


def test_cpu_fallback_adds_llm_onnx(tmp_path):
    models = write_repository(tmp_path / "triton", _engine(tmp_path), _serving(tmp_path, cpu_fallback=True))
    cfg = _parse(models["llm_onnx"])
    assert cfg.backend == "python" and cfg.model_transaction_policy.decoupled
    assert (models["llm_onnx"] / "1" / "model.onnx").read_bytes() == b"onnx"
    assert (models["llm_onnx"] / "1" / "model.onnx").stat().st_nlink == 1  # onnx-ir refuses hard-linked data
    assert _parse(models["generate"]).parameters["llmc_targets"].string_value == "llm,llm_onnx"


def test_check_rejects_config_that_disagrees_with_engine(tmp_path):
    engine = _engine(tmp_path)
    cfg = make_config(engine)
    cfg.output[0].dims[1] = 1000
    with pytest.raises(ValueError, match="differs from the engine"):
        check_config(text_format.MessageToString(cfg), engine)
    cfg = make_config(engine)
    cfg.sequence_batching.state[0].dims[1] = -1
    with pytest.raises(ValueError, match="must be static"):
        check_config(text_format.MessageToString(cfg), engine)
    with pytest.raises(text_format.ParseError):
        check_config("platform: tensorrt_plan\nbogus_field: 1\n", engine)


def test_engine_version_check_names_both_versions():
    engine_version.check("tensorrt", "10.7.0.23", "10.7.0")  # same release, build number absent on one side
    engine_version.check("tensorrt", "10.7.0", None)  # no TensorRT here: llm fails to load on its own
    with pytest.raises(RuntimeError, match=r"built by tensorrt 10\.7\.0 but this server has tensorrt 10\.8\.0"):
        engine_version.check("tensorrt", "10.7.0", "10.8.0")


def test_name_sanitizing():
    assert triton_model_name("Llama-3.2-1B") == "Llama-3.2-1B"
    assert triton_model_name("a b:c") == "a_b_c"


def test_paged_engine_is_refused_before_anything_is_written(tmp_path):
    """A paged engine's cache is one block pool for the batch: not per-sequence implicit state."""
    from compiler.errors import BadInputError

    pool = (-1, 2, 16, 32)
    engine = _engine(tmp_path, [
        TensorInfo("input_ids", "int64", (-1, -1), True), TensorInfo("position_ids", "int64", (-1, -1), True),
        TensorInfo("block_tables", "int32", (-1, 4), True),
        TensorInfo("past_key_values.0.key", "float16", pool, True),
        TensorInfo("past_key_values.0.value", "float16", pool, True),
        TensorInfo("logits", "float16", (-1, -1, 512), False),
        TensorInfo("present.0.key", "float16", pool, False), TensorInfo("present.0.value", "float16", pool, False)])
    with pytest.raises(BadInputError, match="paged KV cache.*fp16 or fp16-plugin recipe"):
        write_repository(tmp_path / "triton", engine, _serving(tmp_path, cpu_fallback=True))
    assert not (tmp_path / "triton").exists()
    with pytest.raises(BadInputError, match="block_tables"):
        make_config(engine)


def _fp8_engine(tmp_path: Path) -> EngineArtifact:
    cache = (-1, 2, 64, 32)
    return _engine(tmp_path, [
        TensorInfo("input_ids", "int64", (-1, -1), True), TensorInfo("position_ids", "int64", (-1, -1), True),
        TensorInfo("past_key_values.0.key", "float8e4m3fn", cache, True),
        TensorInfo("past_key_values.0.value", "float8e4m3fn", cache, True),
        TensorInfo("logits", "float16", (-1, -1, 512), False),
        TensorInfo("present.0.key", "float8e4m3fn", cache, False),
        TensorInfo("present.0.value", "float8e4m3fn", cache, False)])


def test_fp8_cache_engine_is_refused_with_the_reason_before_anything_is_written(tmp_path):
    """Triton's ModelConfig DataType has no FP8 (and the TensorRT backend refuses kFP8 bindings whatever the
    config declares): an fp8kv engine gets a one-line refusal, not a KeyError, and no half-written repository."""
    from compiler.errors import BadInputError
    from compiler.serving.triton_repo import unservable_reason

    assert not [name for name in mc.DataType.keys() if "FP8" in name or "FLOAT8" in name]
    engine = _fp8_engine(tmp_path)
    reason = unservable_reason(engine)
    assert "float8e4m3fn tensors (past_key_values.0.key, past_key_values.0.value, ...)" in reason
    assert "fp16 or fp16-plugin recipe" in reason and "\n" not in reason
    with pytest.raises(BadInputError, match="float8e4m3fn tensors"):
        write_repository(tmp_path / "triton", engine, _serving(tmp_path, cpu_fallback=True))
    assert not (tmp_path / "triton").exists()
    with pytest.raises(BadInputError, match="float8e4m3fn tensors"):
        make_config(engine)
    assert unservable_reason(_engine(tmp_path)) is None


def test_every_engine_dtype_is_a_triton_type_or_refused(tmp_path):
    """Each DataType of the installed TensorRT(-RTX), named as build.py names engine tensors, either maps to a
    member of Triton's ModelConfig DataType or makes the engine unservable (never a KeyError at packaging)."""
    from compiler.engine.backend import get_backend
    from compiler.engine.engine_build import _np_dtype
    from compiler.serving.triton_repo import _TRITON_TYPES, unservable_reason

    trt = get_backend().trt
    names = {_np_dtype(trt, d) for d in trt.DataType.__members__.values()}
    assert {"float16", "bfloat16", "float8e4m3fn", "int64"} <= names
    for name in sorted(names):
        engine = _engine(tmp_path)
        engine.tensors[4] = TensorInfo("logits", name, (-1, -1, 512), False)
        if name in _TRITON_TYPES:
            assert mc.DataType.Name(mc.DataType.Value(_TRITON_TYPES[name])) == _TRITON_TYPES[name]
            assert unservable_reason(engine) is None
            cfg = check_config(text_format.MessageToString(make_config(engine)), engine)
            assert cfg.output[0].data_type == mc.DataType.Value(_TRITON_TYPES[name])
        else:
            assert name in unservable_reason(engine), name


def _stand_in_pb_utils(device_of_outputs: str):
    """A stand-in for `triton_python_backend_utils` (it exists only inside Triton's Python-backend stub), following
    python_backend's documented behaviour: a BLS response's outputs stay on the device the called model produced
    them on unless the request's `preferred_memory` names another (README.md, "preferred_memory"), and
    `as_numpy()` raises on a GPU tensor (src/pb_tensor.cc, PbTensor::AsNumpy). Like the real stub, it gets
    PreferredMemory only after the model's module is imported (seen with nvidia-pytriton's stub): `arm`."""
    import types

    import numpy as np

    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_MEMORY_GPU, pb.TRITONSERVER_MEMORY_CPU = "GPU", "CPU"
    pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START, pb.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END = 1, 2
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.requests = []

    class PreferredMemory:
        def __init__(self, preferred_memory_type, preferred_device_id=0):
            self.preferred_memory_type, self.preferred_device_id = preferred_memory_type, preferred_device_id

    class Tensor:
        def __init__(self, name, array, device="CPU"):
            self.name, self._array, self._device = name, np.asarray(array), device

        def is_cpu(self):
            return self._device == "CPU"

        def as_numpy(self):
            if not self.is_cpu():
                raise RuntimeError("Tensor is stored in GPU and cannot be converted to NumPy.")
            return self._array

    class Response:
        def __init__(self, outputs):
            self.outputs = outputs

        def has_error(self):
            return False

    class InferenceRequest:
        def __init__(self, model_name, inputs, requested_output_names, correlation_id=0, flags=0,
                     preferred_memory=None, **_):
            self.kwargs = dict(model_name=model_name, correlation_id=correlation_id, flags=flags)
            self.inputs, self.preferred_memory = inputs, preferred_memory
            pb.requests.append(self)

        def exec(self):
            ids = self.inputs[0].as_numpy()
            logits = np.zeros((*ids.shape, 8), np.float16)
            logits[..., 3] = 1.0
            prefer = self.preferred_memory.preferred_memory_type if self.preferred_memory else None
            return Response([Tensor("logits", logits, device=prefer or device_of_outputs)])

    pb.Tensor, pb.InferenceRequest = Tensor, InferenceRequest

    def arm():
        pb.PreferredMemory = PreferredMemory

    pb.arm = arm
    pb.get_output_tensor_by_name = lambda response, name: next(t for t in response.outputs if t.name == name)
    return pb


def test_bls_engine_steps_ask_for_host_logits(monkeypatch):
    """TritonEngineExecutor's requests to `llm` (the TensorRT backend answers in GPU memory) get their logits in
    host memory, so the runner can read them; with a stand-in pb_utils (see _stand_in_pb_utils)."""
    import sys

    import numpy as np

    from compiler.graph_io import GraphIO

    pb = _stand_in_pb_utils(device_of_outputs="GPU")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    stand_in_built = ("compiler.serving.triton_models.common", "compiler.serving.triton_models.generate")
    for name in stand_in_built:
        monkeypatch.delitem(sys.modules, name, raising=False)
    try:
        from compiler.serving.triton_models.generate import TritonEngineExecutor

        pb.arm()  # the stub's setup, after model.py is imported
        executor = TritonEngineExecutor(GraphIO(1, 2, 32, 8, 64))
        executor.start(1)
        logits = executor.step(np.array([[5, 6, 7]]), np.array([[0, 1, 2]]))
        executor.close()
    finally:
        for name in stand_in_built:  # modules built on the stand-in are not for other tests
            sys.modules.pop(name, None)
    assert logits.dtype == np.float32 and logits.shape == (1, 3, 8) and logits[0, -1].argmax() == 3
    assert [r.kwargs["flags"] for r in pb.requests] == [1, 2]  # SEQUENCE_START, then the closing SEQUENCE_END
    assert all(r.preferred_memory.preferred_memory_type == "CPU" for r in pb.requests)
