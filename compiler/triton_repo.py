"""Write a Triton Inference Server model repository for the engine, checked with Triton's own proto.

Batch is expressed inside the engine's dims (`max_batch_size: 0`, batch as a -1 dim): requests of
an LLM with a KV cache can't be concatenated by Triton's batcher (every sequence has its own past
length), so the caller forms the batch, and the engine's optimization profile bounds it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from .types import EngineArtifact

_TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}


def triton_model_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


def make_config(name: str, engine: EngineArtifact) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=0)
    for t in engine.tensors:
        entry = (config.input if t.is_input else config.output).add()
        entry.name = t.name
        entry.data_type = mc.DataType.Value(_TRITON_TYPES[t.dtype])
        entry.dims.extend(t.shape)
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_GPU, count=1)
    config.parameters["llmc_backend"].string_value = engine.backend
    config.parameters["llmc_backend_version"].string_value = engine.backend_version
    return config


def check_config(text: str, engine: EngineArtifact) -> mc.ModelConfig:
    """Parse the written text with the real ModelConfig proto and check it against the engine's I/O."""
    parsed = text_format.Parse(text, mc.ModelConfig())
    problems = []
    if parsed.platform != "tensorrt_plan":
        problems.append(f"platform {parsed.platform!r}")
    declared = {(e.name, tuple(e.dims), e.data_type) for e in [*parsed.input, *parsed.output]}
    expected = {(t.name, t.shape, mc.DataType.Value(_TRITON_TYPES[t.dtype])) for t in engine.tensors}
    if declared != expected:
        problems.append(f"I/O differs from the engine: {sorted(declared ^ expected)[:4]}")
    if parsed.max_batch_size == 0 and any(not t.shape or t.shape[0] != -1 for t in engine.tensors):
        problems.append("max_batch_size 0 but some tensor has no dynamic batch dim")
    for e in [*parsed.input, *parsed.output]:
        if any(d < -1 or d == 0 for d in e.dims):
            problems.append(f"{e.name}: invalid dims {list(e.dims)}")
    if problems:
        raise ValueError("invalid Triton config: " + "; ".join(problems))
    return parsed


def write_repository(root: Path, name: str, engine: EngineArtifact) -> Path:
    """root/<name>/config.pbtxt + root/<name>/1/model.plan; returns the model's directory."""
    name = triton_model_name(name)
    model_dir = root / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    text = text_format.MessageToString(make_config(name, engine))
    check_config(text, engine)
    (model_dir / "config.pbtxt").write_text(text)
    target = model_dir / "1" / "model.plan"
    try:
        os.link(engine.plan_path, target)  # same bytes, no copy
    except OSError:
        shutil.copyfile(engine.plan_path, target)
    return model_dir
