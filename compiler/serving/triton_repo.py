"""Write the Triton Inference Server model repository, checked with Triton's own ModelConfig proto.

    preprocessing   (Python)  text -> token ids, with the model's tokenizer; refuses prompts over --max-seq
    llm             (tensorrt_plan) the engine; its KV cache is the Triton sequence's implicit state
    llm_onnx        (Python, decoupled, `--triton-cpu-fallback`) llmc's in-flight scheduler over model.onnx (onnxruntime)
    postprocessing  (Python)  token ids -> text
    generate        (Python BLS, decoupled) text in, streamed text out: /generate and /generate_stream

Why implicit state for the KV cache: the engine takes `past_key_values.*` and returns `present.*`
of a fixed capacity (`--max-seq`). Declared as `sequence_batching.state`, Triton's TensorRT backend
keeps those buffers on the GPU between the steps of one sequence (zeroed at SEQUENCE_START) and
batches concurrent sequences' decode steps into one engine call (the direct strategy gives each
sequence a batch slot, up to `--max-batch`). A BLS model owning the cache instead would ship the
whole cache (layers x 2 x kv_heads x max_seq x head_dim per sequence) through Triton on every
token. Requests then carry only token ids and positions, and batch is Triton's batch dim
(`max_batch_size` = the engine profile's max batch).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from compiler.errors import BadInputError
from compiler.graph_io import BLOCK_TABLES, PAST_PREFIX, GraphIO, present_for
from compiler.engine.engine_build import EngineArtifact


@dataclasses.dataclass(frozen=True)
class ServingSpec:
    """What the Triton repository needs beyond the engine: limits, tokenizer, stop tokens, CPU fallback."""

    max_batch: int
    max_seq: int
    io: GraphIO
    tokenizer_dir: Path
    onnx_files: tuple[Path, ...]  # model.onnx (+ its external data), for llm_onnx
    pad_token_id: int = 0
    stop_token_ids: tuple[int, ...] = ()
    cpu_fallback: bool = False
    default_max_tokens: int = 64
    scheduler_max_batch: int = 16  # the CPU route's in-flight sequences (0: one request at a time)
    scheduler_tokens_per_step: int = 256  # real tokens per graph call (prompts are chunked to fit)

_TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
    "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}
MODELS = ("preprocessing", "llm", "llm_onnx", "postprocessing", "generate")
SEQUENCE_IDLE_US = 60_000_000  # a client that vanished mid-sequence frees its batch slot after a minute


def triton_model_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


def _type(dtype: str) -> int:
    if dtype not in _TRITON_TYPES:
        raise BadInputError(f"engine dtype {dtype} has no Triton DataType (model_config.proto); see unservable_reason")
    return mc.DataType.Value(_TRITON_TYPES[dtype])


def unservable_reason(engine: EngineArtifact) -> str | None:
    """Why no Triton repository can hold this engine, or None.

    A paged engine's cache is one block pool shared by the batch, addressed by block tables: Triton's
    sequence-batcher state is one buffer per sequence, so there is nothing to declare it as.

    An FP8 tensor (the fp8kv recipe's cache) has no type at all: model_config.proto's DataType stops at
    TYPE_BF16 (tritonclient's model_config_pb2 has no FP8), and carrying the bytes as TYPE_UINT8 does not
    help, because the TensorRT backend maps the engine's kFP8 to TYPE_INVALID
    (triton-inference-server/tensorrt_backend src/tensorrt_utils.cc, ConvertTrtTypeToDataType, default case)
    and refuses any binding whose engine type is TYPE_INVALID or differs from the config's, state tensors
    included (src/instance_state.cc:3056 and :2574, at e2ef6d7). So it is refused here, not reinterpreted.
    """
    name = engine.plan_path.name
    if any(t.name == BLOCK_TABLES for t in engine.tensors):
        return (f"{name} has a paged KV cache ('{BLOCK_TABLES}' input, block-pool past/present): the Triton "
                "repository keeps each sequence's cache as sequence-batcher implicit state, which a pool shared "
                "by the batch is not. Build the fp16 or fp16-plugin recipe (a linear FP16 cache) for a Triton "
                "repository; the paged model.onnx runs with `llmc generate` (onnxruntime)")
    untyped = [t for t in engine.tensors if t.dtype not in _TRITON_TYPES]
    if untyped:
        dtypes = sorted({t.dtype for t in untyped})
        return (f"{name} has {'/'.join(dtypes)} tensors ({', '.join(t.name for t in untyped[:2])}"
                f"{', ...' if len(untyped) > 2 else ''}), a type Triton's model config has no DataType for and its "
                "TensorRT backend refuses even declared as UINT8: build the fp16 or fp16-plugin recipe for a Triton "
                "repository; this engine runs with `llmc generate` (llmc's TensorRT executor)")
    return None


def refuse_unservable(engine: EngineArtifact) -> None:
    reason = unservable_reason(engine)
    if reason:
        raise BadInputError(reason)


def _state_pairs(engine: EngineArtifact) -> dict[str, str]:
    """past_key_values.{i}.{k,v} input -> present.{i}.{k,v} output."""
    refuse_unservable(engine)
    names = {t.name for t in engine.tensors}
    pairs = {}
    for t in engine.tensors:
        if t.is_input and t.name.startswith(PAST_PREFIX):
            present = present_for(t.name)
            if present not in names:
                raise ValueError(f"engine has {t.name} but no {present}: not an llmc KV-cache engine")
            pairs[t.name] = present
    return pairs


def make_config(engine: EngineArtifact, max_batch: int = 1, name: str = "llm") -> mc.ModelConfig:
    """The engine's config: token I/O declared, the KV cache as sequence-batcher implicit state."""
    config = mc.ModelConfig(name=name, platform="tensorrt_plan", max_batch_size=max_batch)
    pairs = _state_pairs(engine)
    stateful = set(pairs) | set(pairs.values())
    for t in engine.tensors:
        if t.name in stateful:
            continue
        entry = (config.input if t.is_input else config.output).add()
        entry.name, entry.data_type = t.name, _type(t.dtype)
        entry.dims.extend(t.shape[1:])  # Triton's batch dim is the engine's dim 0
    batching = config.sequence_batching
    batching.max_sequence_idle_microseconds = SEQUENCE_IDLE_US
    batching.direct.SetInParent()
    by_name = {t.name: t for t in engine.tensors}
    for past, present in pairs.items():
        t = by_name[past]
        state = batching.state.add(input_name=past, output_name=present, data_type=_type(t.dtype))
        state.dims.extend(t.shape[1:])
        state.initial_state.add(name="zeros", data_type=_type(t.dtype), zero_data=True).dims.extend(t.shape[1:])
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
    if parsed.max_batch_size < 1:
        problems.append("max_batch_size must be >= 1: the sequence batcher batches on the engine's dim 0")
    if any(not t.shape or t.shape[0] != -1 for t in engine.tensors):
        problems.append("some engine tensor has no dynamic batch dim 0")
    declared = {(e.name, tuple(e.dims), e.data_type) for e in [*parsed.input, *parsed.output]}
    declared |= {(s.input_name, tuple(s.dims), s.data_type) for s in parsed.sequence_batching.state}
    declared |= {(s.output_name, tuple(s.dims), s.data_type) for s in parsed.sequence_batching.state}
    expected = {(t.name, tuple(t.shape[1:]), _type(t.dtype)) for t in engine.tensors}
    if declared != expected:
        problems.append(f"I/O differs from the engine: {sorted(declared ^ expected)[:4]}")
    for s in parsed.sequence_batching.state:
        if any(d < 1 for d in s.dims):
            problems.append(f"state {s.input_name}: dims {list(s.dims)} must be static (the cache capacity)")
    for e in [*parsed.input, *parsed.output]:
        if any(d < -1 or d == 0 for d in e.dims):
            problems.append(f"{e.name}: invalid dims {list(e.dims)}")
    if problems:
        raise ValueError("invalid Triton config: " + "; ".join(problems))
    return parsed


def _tensor(name: str, dtype: str, dims: list[int], optional: bool = False) -> dict:
    return {"name": name, "data_type": dtype, "dims": dims, "optional": optional}


SAMPLING_INPUTS = [_tensor("temperature", "TYPE_FP32", [1], True), _tensor("top_k", "TYPE_INT32", [1], True),
                   _tensor("seed", "TYPE_INT64", [1], True),
                   _tensor("speculate", "TYPE_INT32", [1], True)]  # n-gram proposals per step (in-flight scheduler)


def _python_config(name: str, inputs: list[dict], outputs: list[dict], parameters: dict[str, str],
                   decoupled: bool = False) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    for spec, field in ((inputs, config.input), (outputs, config.output)):
        for t in spec:
            entry = field.add(name=t["name"], data_type=mc.DataType.Value(t["data_type"]))
            entry.dims.extend(t["dims"])
            if t.get("optional"):
                entry.optional = True
    if decoupled:
        config.model_transaction_policy.decoupled = True
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return config


SHIM = '''"""Triton Python model `{name}`, written by llmc: the code is compiler/serving/triton_models/{module}.py.

llmc must be importable by the Python-backend stub; `llmc serve` passes the paths in LLMC_PYTHONPATH.
"""
import os
import sys

sys.path[:0] = [p for p in os.environ.get("LLMC_PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]
from compiler.serving.triton_models.{module} import TritonPythonModel  # noqa: E402,F401

'''


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)  # same bytes, no copy
    except OSError:
        shutil.copyfile(source, target)


def _write_model(root: Path, config: mc.ModelConfig, module: str | None = None) -> Path:
    model_dir = root / config.name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    text = text_format.MessageToString(config)
    text_format.Parse(text, mc.ModelConfig())  # what Triton will parse
    (model_dir / "config.pbtxt").write_text(text)
    if module:
        (model_dir / "1" / "model.py").write_text(SHIM.format(name=config.name, module=module))
    return model_dir


def write_repository(root: Path, engine: EngineArtifact, serving: ServingSpec) -> dict[str, Path]:
    """Every model of the repository under root; returns name -> model directory."""
    common = {"llmc_max_seq": str(serving.max_seq), "llmc_default_max_tokens": str(serving.default_max_tokens),
              "llmc_pad_token_id": str(serving.pad_token_id),
              "llmc_stop_token_ids": ",".join(str(t) for t in serving.stop_token_ids),
              "llmc_scheduler_max_batch": str(serving.scheduler_max_batch),
              "llmc_scheduler_tokens_per_step": str(serving.scheduler_tokens_per_step),
              "llmc_scheduler_policy": "inflight"}  # static: the baseline `llmc bench --static` compares against
    written = {}
    refuse_unservable(engine)  # before anything is written

    llm = make_config(engine, serving.max_batch)
    check_config(text_format.MessageToString(llm), engine)
    written["llm"] = _write_model(root, llm)
    _link(engine.plan_path, written["llm"] / "1" / "model.plan")

    text_in = _tensor("text_input", "TYPE_STRING", [1])
    max_tokens = _tensor("max_tokens", "TYPE_INT32", [1], True)
    ids_out = _tensor("input_ids", "TYPE_INT64", [-1])
    pre = _python_config("preprocessing", [text_in, max_tokens], [ids_out, _tensor("max_tokens", "TYPE_INT32", [1])],
                         common)
    post = _python_config("postprocessing", [_tensor("output_ids", "TYPE_INT64", [-1])],
                          [_tensor("text_output", "TYPE_STRING", [1])], {})
    for config in (pre, post):
        written[config.name] = _write_model(root, config, config.name)

    targets = ["llm"]
    if serving.cpu_fallback:
        onnx = _python_config("llm_onnx", [ids_out, _tensor("max_tokens", "TYPE_INT32", [1]), *SAMPLING_INPUTS],
                              [_tensor("output_ids", "TYPE_INT64", [-1])], common, decoupled=True)
        written["llm_onnx"] = _write_model(root, onnx, "llm_onnx")
        for f in serving.onnx_files:
            # Copied, not hard-linked: onnx-ir refuses external data with more than one link ("may indicate a
            # hard link attack"), so the served model.onnx.data must be the only name of its bytes.
            shutil.copyfile(f, written["llm_onnx"] / "1" / f.name)
        targets.append("llm_onnx")

    gen = _python_config(
        "generate", [text_in, max_tokens, *SAMPLING_INPUTS, _tensor("stream", "TYPE_BOOL", [1], True)],
        [_tensor("text_output", "TYPE_STRING", [1])],
        {**common, "llmc_targets": ",".join(targets), "llmc_graph_io": json.dumps(dataclasses.asdict(serving.io)),
         "llmc_engine_backend": engine.backend, "llmc_engine_version": engine.backend_version},
        decoupled=True)
    written["generate"] = _write_model(root, gen, "generate")
    for name in ("preprocessing", "postprocessing", "generate"):
        (written[name] / "1" / "tokenizer").mkdir(exist_ok=True)
        for f in serving.tokenizer_dir.iterdir():
            shutil.copyfile(f, written[name] / "1" / "tokenizer" / f.name)
    return written
