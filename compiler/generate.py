"""`llmc generate`: run a built artifact (model.onnx or model.plan) with its own tokenizer."""

from __future__ import annotations

from pathlib import Path

from .errors import BackendBuildError, BadInputError
from .runner import Runner, Sampling


def _executor(artifact: Path, kind: str):
    if kind == "tensorrt":
        from .runtime_trt import ExecutionUnavailable, TensorRTExecutor

        try:
            return TensorRTExecutor(artifact / "model.plan")
        except ExecutionUnavailable as exc:
            raise BackendBuildError(f"cannot run model.plan here: {exc}; use --executor onnxruntime") from exc
    from .runtime_onnx import OnnxRuntimeExecutor

    return OnnxRuntimeExecutor(artifact / "model.onnx")


def run_generate(artifact: Path, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int,
                 seed: int, executor: str) -> dict:
    from transformers import AutoTokenizer

    for needed in ("model.onnx", "tokenizer", *(["model.plan"] if executor == "tensorrt" else [])):
        if not (artifact / needed).exists():
            raise BadInputError(f"{artifact} has no {needed}: not an llmc build directory (run llmc build first)")
    tokenizer = AutoTokenizer.from_pretrained(artifact / "tokenizer", local_files_only=True)
    runner = Runner(_executor(artifact, executor), pad_token_id=tokenizer.pad_token_id or 0)
    ids = [tokenizer(p).input_ids for p in prompts]
    stops = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    try:
        result = runner.generate(ids, max_new_tokens, Sampling(temperature, top_k, seed), stop_tokens=stops)
    except ValueError as exc:
        raise BadInputError(str(exc)) from exc
    return {
        "executor": runner.executor.name,
        "texts": [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens],
        "tokens": result.tokens,
        "ttft_s": result.time_to_first_token_s,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "new_tokens": result.new_tokens,
    }
