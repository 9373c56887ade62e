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


def test_llm_is_the_scheduler_over_the_engine_not_a_tensorrt_plan_with_implicit_state(tmp_path):
    """`llm` is a decoupled Python model (ids in, ids out, llm_onnx's I/O) on a GPU instance, with model.plan
    beside it; no sequence batcher, no state: the cache stays in llmc's executor (triton_repo's docstring)."""
    engine = _engine(tmp_path)
    models = write_repository(tmp_path / "triton", engine, _serving(tmp_path, cpu_fallback=False))
    assert sorted(models) == ["generate", "llm", "postprocessing", "preprocessing"]
    cfg = _parse(models["llm"])
    assert cfg.backend == "python" and not cfg.platform and cfg.model_transaction_policy.decoupled
    assert cfg.max_batch_size == 0 and not cfg.HasField("sequence_batching")
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        ("input_ids", mc.TYPE_INT64, [-1]), ("max_tokens", mc.TYPE_INT32, [1]), ("temperature", mc.TYPE_FP32, [1]),
        ("top_k", mc.TYPE_INT32, [1]), ("seed", mc.TYPE_INT64, [1]), ("speculate", mc.TYPE_INT32, [1])]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [("output_ids", [-1])]
    assert [g.kind for g in cfg.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert cfg.parameters["llmc_backend_version"].string_value == "1.7.1"
    assert cfg.parameters["llmc_scheduler_max_batch"].string_value == "4"  # the engine profile's rows
    assert cfg.parameters["llmc_stop_token_ids"].string_value == "2"
    assert (models["llm"] / "1" / "model.plan").read_bytes() == engine.plan_path.read_bytes()
    assert "compiler.serving.triton_models.llm import" in (models["llm"] / "1" / "model.py").read_text()
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


def test_check_rejects_a_config_llm_could_not_serve(tmp_path):
    engine = _engine(tmp_path)
    good = make_config(engine, {})
    check_config(text_format.MessageToString(good), engine)
    for breaks, message in [
            (lambda c: setattr(c.model_transaction_policy, "decoupled", False), "must be decoupled"),
            (lambda c: c.output[0].dims.__setitem__(0, 1), "is not llm_onnx's"),
            (lambda c: c.sequence_batching.state.add(input_name="past_key_values.0.key"), "no sequence batcher"),
            (lambda c: setattr(c.instance_group[0], "kind", mc.ModelInstanceGroup.KIND_CPU), "one GPU instance"),
            (lambda c: c.parameters["llmc_backend_version"].__setattr__("string_value", "1.7.0"), "differs"),
            (lambda c: c.parameters["llmc_scheduler_max_batch"].__setattr__("string_value", "0"), "must be >= 1")]:
        cfg = mc.ModelConfig()
        cfg.CopyFrom(good)
        breaks(cfg)
        with pytest.raises(ValueError, match=message):
            check_config(text_format.MessageToString(cfg), engine)
    with pytest.raises(text_format.ParseError):
        check_config("backend: 'python'\nbogus_field: 1\n", engine)


def test_engine_version_check_names_both_versions():
    engine_version.check("tensorrt", "10.7.0.23", "10.7.0")  # same release, build number absent on one side
    engine_version.check("tensorrt", "10.7.0", None)  # no TensorRT here: llm fails to load on its own
    with pytest.raises(RuntimeError, match=r"built by tensorrt 10\.7\.0 but this server has tensorrt 10\.8\.0"):
        engine_version.check("tensorrt", "10.7.0", "10.8.0")


def test_name_sanitizing():
    assert triton_model_name("Llama-3.2-1B") == "Llama-3.2-1B"
    assert triton_model_name("a b:c") == "a_b_c"


def _cache_engine(tmp_path: Path, dtype: str, paged: bool) -> EngineArtifact:
    cache = (-1, 2, 16, 32) if paged else (-1, 2, 64, 32)
    tables = [TensorInfo("block_tables", "int32", (-1, 4), True)] if paged else []
    return _engine(tmp_path, [
        TensorInfo("input_ids", "int64", (-1, -1), True), TensorInfo("position_ids", "int64", (-1, -1), True),
        *tables,
        TensorInfo("past_key_values.0.key", dtype, cache, True), TensorInfo("past_key_values.0.value", dtype, cache, True),
        TensorInfo("logits", "float16", (-1, -1, 512), False),
        TensorInfo("present.0.key", dtype, cache, False), TensorInfo("present.0.value", dtype, cache, False)])


@pytest.mark.parametrize("dtype,paged", [("float8e4m3fn", False), ("float16", True), ("float8e4m3fn", True)])
def test_fp8_and_paged_caches_are_served_because_the_cache_never_crosses_triton(tmp_path, dtype, paged):
    """With implicit state these were refused (model_config.proto has no FP8 DataType, asserted here; a pool
    shared by the batch is no per-sequence state). In llm the cache is the executor's device tensors."""
    from compiler.serving.triton_repo import unservable_reason

    assert not [name for name in mc.DataType.keys() if "FP8" in name or "FLOAT8" in name]
    engine = _cache_engine(tmp_path, dtype, paged)
    assert unservable_reason(engine) is None
    models = write_repository(tmp_path / "triton", engine, _serving(tmp_path, cpu_fallback=True))
    assert (models["llm"] / "1" / "model.plan").is_file() and _parse(models["llm"]).backend == "python"


def test_an_engine_llm_cannot_bind_in_place_is_refused_before_anything_is_written(tmp_path):
    from compiler.errors import BadInputError
    from compiler.serving.triton_repo import unservable_reason

    engine = _engine(tmp_path)
    del engine.tensors[5]  # present.0.key
    reason = unservable_reason(engine)
    assert "has past_key_values.0.key but no present.0.key" in reason and "\n" not in reason
    with pytest.raises(BadInputError, match="no present.0.key"):
        write_repository(tmp_path / "triton", engine, _serving(tmp_path, cpu_fallback=True))
    assert not (tmp_path / "triton").exists()
    grown = _engine(tmp_path)
    grown.tensors[2] = TensorInfo("past_key_values.0.key", "float16", (-1, 2, -1, 32), True)
    assert "grows by Concat" in unservable_reason(grown)


def test_llm_refuses_to_load_where_no_engine_can_run(tmp_path, monkeypatch):
    """On a machine without a GPU TensorRT runs on (this one), `llm`'s initialize raises the executor's reason, so
    Triton marks it UNAVAILABLE with that line and `generate` falls back to llm_onnx. With a stand-in for
    `triton_python_backend_utils` (it exists only inside Triton's Python-backend stub)."""
    import json
    import sys
    import types

    from compiler.engine.backend import get_backend
    from compiler.runtime.trt_executor import ExecutionUnavailable

    reason = get_backend().execution_unavailable_reason()
    if reason is None:
        pytest.skip("an engine can run here: llm loads (the GPU tests cover it)")
    pb = types.ModuleType("triton_python_backend_utils")
    pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    pb.Logger = types.SimpleNamespace(log_info=print, log_warn=print, log_error=print)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    built = [m for m in sys.modules if m.startswith("compiler.serving.triton_models")]
    for name in built:
        monkeypatch.delitem(sys.modules, name)
    models = write_repository(tmp_path / "triton", _engine(tmp_path), _serving(tmp_path, cpu_fallback=False))
    try:
        from compiler.serving.triton_models.llm import TritonPythonModel

        args = {"model_config": json.dumps({"name": "llm", "parameters": {
                    k: {"string_value": v.string_value} for k, v in _parse(models["llm"]).parameters.items()}}),
                "model_repository": str(models["llm"]), "model_version": "1", "model_instance_kind": "GPU",
                "model_instance_device_id": "0"}
        with pytest.raises(ExecutionUnavailable, match="^" + reason.split(":")[0]):
            TritonPythonModel().initialize(args)
    finally:
        for name in [m for m in sys.modules if m.startswith("compiler.serving.triton_models")]:
            sys.modules.pop(name, None)  # modules built on the stand-in are not for other tests
