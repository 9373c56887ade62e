"""Write the Triton Inference Server model repository, checked with Triton's own ModelConfig proto.

    preprocessing   (Python)  text -> token ids, with the model's tokenizer; refuses prompts over --max-seq
    llm             (Python, decoupled) llmc's in-flight scheduler over model.plan (TensorRT), cache on the GPU
    llm_onnx        (Python, decoupled, `--triton-cpu-fallback`) the same scheduler over model.onnx (onnxruntime)
    postprocessing  (Python)  token ids -> text
    generate        (Python BLS, decoupled) text in, streamed text out: /generate and /generate_stream

Why `llm` is a Python model and not `tensorrt_plan` with the cache as sequence-batcher implicit
state: the engine's KVCacheUpdate writes the cache in place (its output "shares the same device
memory address with the cache input", TensorRT operator docs), while Triton's TensorRT backend binds
a state's input and output to separate buffers and copies the output state into the next request's
input (tensorrt_backend src/instance_state.cc; implicit_state_management.md: "The output state
provided by the model in the ith request in the sequence will be used as the input state in the
i+1th request"). Even with an out-of-place graph that copy moves the whole per-sequence cache every
token (Gemma 3 270M at max_seq 32768: 2 x 604 MB per sequence per token, against 1 MB of logits for
llmc's executor; README "Serving", benchmarks/serving_bytes.py), through host memory once the
states outgrow the 64 MB CUDA pool. So `llm` runs llmc's TensorRT executor inside the Python
backend, its cache resident on the GPU (compiler/runtime/device_cache.py), under the same scheduler
as `llm_onnx`; both take token ids and stream token ids back.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from compiler.errors import BadInputError
from compiler.graph_io import PAST_PREFIX, GraphIO, present_for
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

MODELS = ("preprocessing", "llm", "llm_onnx", "postprocessing", "generate")


def triton_model_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "model"


def unservable_reason(engine: EngineArtifact) -> str | None:
    """Why `llm` cannot serve this engine, or None: llmc's executor binds each `present.*` output to its
    `past_key_values.*` input (in place), so every past needs its present, with a fixed capacity.

    The cache never crosses Triton, so its dtype (FP8 included, which model_config.proto's DataType
    lacks) and layout (a paged pool shared by the batch) are the executor's business, not the config's.
    """
    names = {t.name for t in engine.tensors}
    for t in engine.tensors:
        if t.is_input and t.name.startswith(PAST_PREFIX):
            if present_for(t.name) not in names:
                return (f"{engine.plan_path.name} has {t.name} but no {present_for(t.name)}: not an llmc KV-cache "
                        "engine, so llmc's executor has nothing to bind in place; rebuild it with llmc build")
            if any(d < 1 for d in t.shape[1:]):
                return (f"{engine.plan_path.name}: {t.name} has dims {list(t.shape)}, a cache that grows by Concat; "
                        "build with a recipe that runs kv-cache-scatter (e.g. fp16) for a fixed-capacity cache")
    return None


def refuse_unservable(engine: EngineArtifact) -> None:
    reason = unservable_reason(engine)
    if reason:
        raise BadInputError(reason)


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


IDS_IN = [_tensor("input_ids", "TYPE_INT64", [-1]), _tensor("max_tokens", "TYPE_INT32", [1]), *SAMPLING_INPUTS]
IDS_OUT = [_tensor("output_ids", "TYPE_INT64", [-1])]


def make_config(engine: EngineArtifact, parameters: dict[str, str], max_batch: int = 1,
                name: str = "llm") -> mc.ModelConfig:
    """`llm`: token ids in, token ids out (decoupled), on a GPU instance; the engine's rows are the scheduler's."""
    refuse_unservable(engine)
    params = {**parameters, "llmc_scheduler_max_batch": str(max_batch), "llmc_backend": engine.backend,
              "llmc_backend_version": engine.backend_version}
    config = _python_config(name, IDS_IN, IDS_OUT, params, decoupled=True)
    config.instance_group[0].kind = mc.ModelInstanceGroup.KIND_GPU
    return config


def check_config(text: str, engine: EngineArtifact) -> mc.ModelConfig:
    """Parse the written text with the real ModelConfig proto and check what `llm` relies on."""
    parsed = text_format.Parse(text, mc.ModelConfig())
    problems = []
    if parsed.backend != "python" or parsed.platform:
        problems.append(f"backend {parsed.backend!r} / platform {parsed.platform!r}: llm is a Python model")
    if not parsed.model_transaction_policy.decoupled:
        problems.append("llm must be decoupled (one response per generated token)")
    if parsed.HasField("sequence_batching") or parsed.max_batch_size:
        problems.append("llm batches in its own scheduler: no sequence batcher, max_batch_size 0")
    declared = [(e.name, e.data_type, tuple(e.dims)) for e in [*parsed.input, *parsed.output]]
    expected = [(t["name"], mc.DataType.Value(t["data_type"]), tuple(t["dims"])) for t in [*IDS_IN, *IDS_OUT]]
    if declared != expected:
        problems.append(f"I/O {declared} is not llm_onnx's ({expected})")
    if [g.kind for g in parsed.instance_group] != [mc.ModelInstanceGroup.KIND_GPU]:
        problems.append("llm needs one GPU instance group (the executor's device)")
    if parsed.parameters["llmc_backend_version"].string_value != engine.backend_version:
        problems.append("llmc_backend_version differs from the engine's")
    rows = parsed.parameters["llmc_scheduler_max_batch"].string_value
    if not rows.isdigit() or int(rows) < 1:
        problems.append(f"llmc_scheduler_max_batch {rows!r}: the engine's rows must be >= 1")
    reason = unservable_reason(engine)
    if reason:
        problems.append(reason)
    if problems:
        raise ValueError("invalid Triton config: " + "; ".join(problems))
    return parsed


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

    llm = make_config(engine, common, serving.max_batch)
    check_config(text_format.MessageToString(llm), engine)
    written["llm"] = _write_model(root, llm, "llm")
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
        onnx = _python_config("llm_onnx", IDS_IN, IDS_OUT, common, decoupled=True)
        written["llm_onnx"] = _write_model(root, onnx, "llm_onnx")
        for f in serving.onnx_files:
            # Copied, not hard-linked: onnx-ir refuses external data with more than one link ("may indicate a
            # hard link attack"), so the served model.onnx.data must be the only name of its bytes.
            shutil.copyfile(f, written["llm_onnx"] / "1" / f.name)
        targets.append("llm_onnx")

    gen = _python_config(
        "generate", [text_in, max_tokens, *SAMPLING_INPUTS, _tensor("stream", "TYPE_BOOL", [1], True)],
        [_tensor("text_output", "TYPE_STRING", [1])],
        {**common, "llmc_targets": ",".join(targets),
         "llmc_engine_backend": engine.backend, "llmc_engine_version": engine.backend_version},
        decoupled=True)
    written["generate"] = _write_model(root, gen, "generate")
    for name in ("preprocessing", "postprocessing", "generate"):
        (written[name] / "1" / "tokenizer").mkdir(exist_ok=True)
        for f in serving.tokenizer_dir.iterdir():
            shutil.copyfile(f, written[name] / "1" / "tokenizer" / f.name)
    return written
