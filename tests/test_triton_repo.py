"""The Triton repository: config from the engine's own I/O, parsed back with Triton's ModelConfig proto."""

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from compiler.triton_repo import check_config, make_config, triton_model_name, write_repository
from compiler.types import EngineArtifact, TensorInfo


def _engine(tmp_path: Path, tensors=None) -> EngineArtifact:
    plan = tmp_path / "model.plan"
    plan.write_bytes(b"\x00plan-bytes")
    tensors = tensors or [
        TensorInfo("input_ids", "int64", (-1, -1), True),
        TensorInfo("past_key_values.0.key", "float16", (-1, 2, -1, 32), True),
        TensorInfo("logits", "float16", (-1, -1, 512), False),
        TensorInfo("present.0.key", "float16", (-1, 2, -1, 32), False),
    ]
    return EngineArtifact(plan, tmp_path / "model.onnx", "tensorrt_rtx", "1.7.1", tensors, {}, 0.0, "none")


def test_written_config_parses_with_triton_proto_and_matches_engine(tmp_path):
    engine = _engine(tmp_path)
    model_dir = write_repository(tmp_path / "triton", "My Model/7b", engine)
    assert model_dir.name == "My_Model_7b"
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 0
    assert [i.name for i in cfg.input] == ["input_ids", "past_key_values.0.key"]
    assert list(cfg.output[1].dims) == [-1, 2, -1, 32]
    assert cfg.output[0].data_type == mc.TYPE_FP16 and cfg.input[0].data_type == mc.TYPE_INT64
    assert cfg.parameters["llmc_backend_version"].string_value == "1.7.1"
    assert (model_dir / "1" / "model.plan").read_bytes() == engine.plan_path.read_bytes()


def test_check_rejects_config_that_disagrees_with_engine(tmp_path):
    engine = _engine(tmp_path)
    cfg = make_config("m", engine)
    cfg.output[0].dims[2] = 1000
    with pytest.raises(ValueError, match="differs from the engine"):
        check_config(text_format.MessageToString(cfg), engine)
    with pytest.raises(text_format.ParseError):
        check_config("platform: tensorrt_plan\nbogus_field: 1\n", engine)


def test_name_sanitizing():
    assert triton_model_name("Llama-3.2-1B") == "Llama-3.2-1B"
    assert triton_model_name("a b:c") == "a_b_c"
