"""`llmc generate`: run a built artifact (model.onnx or model.plan) with its own tokenizer."""

from __future__ import annotations

import time
from pathlib import Path

from compiler.errors import BackendBuildError, BadInputError
from compiler.measure.speculation import divergences, unexcused
from compiler.runtime.runner import Runner, Sampling


def _executor(artifact: Path, kind: str):
    if kind == "tensorrt":
        from compiler.runtime.trt_executor import ExecutionUnavailable, TensorRTExecutor

        try:
            return TensorRTExecutor(artifact / "model.plan")
        except ExecutionUnavailable as exc:
            raise BackendBuildError(f"cannot run model.plan here: {exc}; use --executor onnxruntime") from exc
    from compiler.runtime.onnx_executor import OnnxRuntimeExecutor

    return OnnxRuntimeExecutor(artifact / "model.onnx")


def _check_artifact(artifact: Path, executor: str) -> None:
    for needed in ("model.onnx", "tokenizer", *(["model.plan"] if executor == "tensorrt" else [])):
        if not (artifact / needed).exists():
            raise BadInputError(f"{artifact} has no {needed}: not an llmc build directory (run llmc build first)")


def run_generate(artifact: Path, prompts: list[str], max_new_tokens: int, temperature: float, top_k: int,
                 seed: int, executor: str, speculate: str | None = None, draft_artifact: Path | None = None,
                 num_draft_tokens: int = 4) -> dict:
    from transformers import AutoTokenizer

    _check_artifact(artifact, executor)
    tokenizer = AutoTokenizer.from_pretrained(artifact / "tokenizer", local_files_only=True)
    plain = runner = Runner(_executor(artifact, executor), pad_token_id=tokenizer.pad_token_id or 0)
    if speculate:
        from compiler.commands.generate_speculative import speculative_runner

        if speculate == "draft" and draft_artifact is None and (artifact / "draft" / "model.onnx").is_file():
            draft_artifact = artifact / "draft"  # built in by `llmc build --draft`
        if draft_artifact is not None:
            _check_artifact(draft_artifact, executor)
        runner = speculative_runner(plain, tokenizer, speculate, num_draft_tokens, draft_artifact,
                                    lambda: _executor(draft_artifact, executor))
    ids = [tokenizer(p).input_ids for p in prompts]
    stops = tuple(t for t in [tokenizer.eos_token_id] if t is not None)
    sampling = Sampling(temperature, top_k, seed)
    try:
        if speculate:  # the same request without speculation, after a warm-up: the proof and the speedup
            runner.generate([ids[0][:1]], 1)
            start = time.perf_counter()
            baseline = plain.generate(ids, max_new_tokens, sampling, stop_tokens=stops)
            plain_seconds = time.perf_counter() - start
        start = time.perf_counter()
        result = runner.generate(ids, max_new_tokens, sampling, stop_tokens=stops)
        seconds = time.perf_counter() - start
    except ValueError as exc:
        raise BadInputError(str(exc)) from exc
    speculation = {} if not speculate else {"speculation": {
        "proposer": result.proposer, "num_draft_tokens": result.num_draft_tokens, "fixed_k": True,
        "target_steps": result.steps, "verify_steps": result.verify_steps, "proposed": result.proposed,
        "accepted": result.accepted, "acceptance_rate": result.acceptance_rate,
        "accepted_per_target_step": result.accepted_per_step, "plain_target_steps": baseline.steps,
        # greedy must give the plain tokens; sampling gives the same distribution, not the same draws
        "identical_to_plain": baseline.tokens == result.tokens if temperature == 0 else None,
        "unexcused_differences": [] if temperature != 0 or baseline.tokens == result.tokens else unexcused(
            divergences(plain, ids, baseline.tokens, result.tokens)),
        "seconds": seconds, "plain_seconds": plain_seconds, "speedup": plain_seconds / seconds}}
    return {
        "executor": plain.executor.name,
        "texts": [tokenizer.decode(t, skip_special_tokens=True) for t in result.tokens],
        "tokens": result.tokens,
        "ttft_s": result.time_to_first_token_s,
        "decode_tokens_per_s": result.decode_tokens_per_s,
        "new_tokens": result.new_tokens,
        **speculation,
    }
