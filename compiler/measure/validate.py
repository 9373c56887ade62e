"""Validation (the validate stage): the compiled ONNX (onnxruntime) against the original PyTorch model (FP32).

Same prompt, same tokenizer. PyTorch decodes greedily; the compiled graph is fed the reference's
tokens through the generation runner and its KV cache (teacher forcing), so one near-tie flip cannot cascade and every
step compares logits for the same context. Reported: max / mean absolute logit error over the
prefill positions and every decode step, the relative error (below), and greedy next-token agreement.

Relative error, per position: rms(compiled - reference) / std(reference logits over the vocabulary);
the check takes its maximum over positions. Why this scale: a quantized graph's logit error grows
with the model's logit spread (INT4 on a real model moves single logits by several units while its
perplexity rises a few percent), so an absolute bound either fails good builds or passes anything.
The relative error has a floor a mis-wired graph cannot get under: logits uncorrelated with the
reference measure at least 1 at that position whatever their scale (rms^2 = var_c + var_r - 2 cov
>= var_r * (1 - corr^2)), and the maximum over positions catches a graph wrong only on the decode
path (a KV-cache bug) while right on the prefill.

The two sides are separate steps: `decode_reference` needs the PyTorch model, `compare` only its
output. The build computes the reference before it exports and then drops the model, so the
onnxruntime session never shares memory with it (at 1B: 4.9 GB of FP32 weights each).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from compiler.errors import BadInputError
from compiler.runtime.executor import Executor
from compiler.runtime.runner import Runner
from compiler.frontend.model import LoadedModel
from compiler.recipe import Tolerance


@dataclasses.dataclass
class ValidationResult:
    """Output of validate: compiled ONNX (onnxruntime) vs the PyTorch reference."""

    prompt: str
    prompt_tokens: int
    decode_steps: int
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float  # max over positions of rms(logit error) / std(reference logits)
    greedy_agreement: float
    reference_tokens: list[int]
    compiled_tokens: list[int]
    tolerance: Tolerance
    passed: bool
    failures: list[str]
    seconds: float

DEFAULT_PROMPT = "The compiler reads a model directory, exports a graph, and"


def reference_decode(loaded: LoadedModel, prompt_ids: list[int], steps: int) -> tuple[list[np.ndarray], list[int]]:
    """PyTorch greedy decoding with HF's own cache: logits per step ([seq, vocab] then [1, vocab]...) and tokens."""
    import torch
    from transformers import DynamicCache

    model = loaded.model
    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids])
    logits_steps, tokens = [], []
    with torch.no_grad():
        for _ in range(steps + 1):
            out = model(input_ids=ids, cache=cache, use_cache=True)
            logits = out.logits[0].float().numpy()
            logits_steps.append(logits)
            token = int(logits[-1].argmax())
            tokens.append(token)
            ids = torch.tensor([[token]])
    return logits_steps, tokens


def reference_greedy(loaded: LoadedModel, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """PyTorch greedy continuations of several prompts, decoded as one batch: `new_tokens` tokens each.

    Why a batch: at 1B in FP32 each decode call reads ~5 GB of weights, so four prompts one at a
    time cost four times the calls. Prompts are left-padded, with an attention mask and explicit
    position ids, so each row sees exactly its own prompt (tested equal to one-at-a-time decoding).
    Only the last position's logits are computed and only the tokens are kept."""
    import torch
    from transformers import DynamicCache

    model = loaded.model
    longest = max(len(p) for p in prompts)
    pad = loaded.tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (longest - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    tokens = []
    with torch.no_grad():
        for _ in range(new_tokens):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                        use_cache=True, logits_to_keep=1)
            ids = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(ids[:, 0])
            mask = torch.cat([mask, torch.ones_like(ids)], dim=1)
            positions = positions[:, -1:] + 1
    return torch.stack(tokens, dim=1).tolist()


def judge(max_err: float, mean_err: float, rel_err: float, agreement: float, tolerance: Tolerance) -> list[str]:
    """The tolerance check alone: a cached measurement is re-judged when only the tolerance changed.
    Bounds the recipe leaves unset (None) are not checked."""
    failures = []
    if not (np.isfinite(max_err) and np.isfinite(mean_err) and np.isfinite(rel_err)):
        failures.append("non-finite logits in the compiled graph")
    if tolerance.max_abs_logit_error is not None and max_err > tolerance.max_abs_logit_error:
        failures.append(f"max |logit error| {max_err:.4g} > {tolerance.max_abs_logit_error:g}")
    if tolerance.mean_abs_logit_error is not None and mean_err > tolerance.mean_abs_logit_error:
        failures.append(f"mean |logit error| {mean_err:.4g} > {tolerance.mean_abs_logit_error:g}")
    if tolerance.max_rel_logit_error is not None and rel_err > tolerance.max_rel_logit_error:
        failures.append(f"wiring check: relative logit error {rel_err:.3g} > {tolerance.max_rel_logit_error:g} "
                        "(rms error / std of PyTorch's logits at the worst position; a graph unrelated to the "
                        "model measures >= 1)")
    if agreement < tolerance.min_greedy_agreement:
        failures.append(f"greedy agreement {agreement:.1%} < {tolerance.min_greedy_agreement:.1%}")
    return failures


def relative_errors(compiled: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[positions] rms(compiled - reference) / std(reference) over the vocabulary (float64 sums)."""
    diff = compiled.astype(np.float64) - reference
    return np.sqrt(np.mean(diff * diff, axis=-1)) / np.maximum(reference.astype(np.float64).std(axis=-1), 1e-12)


def rejudge(result: ValidationResult, tolerance: Tolerance) -> ValidationResult:
    failures = judge(result.max_abs_error, result.mean_abs_error, result.max_rel_error, result.greedy_agreement,
                     tolerance)
    return dataclasses.replace(result, tolerance=tolerance, failures=failures, passed=not failures)


@dataclasses.dataclass
class DecodeReference:
    """What PyTorch computed for the validation prompt: the input of `compare`, without the model."""

    prompt: str
    prompt_ids: list[int]
    logits: list[np.ndarray]  # [prompt, vocab], then [1, vocab] per decode step
    tokens: list[int]  # the greedy tokens, decode_steps + 1 of them
    decode_steps: int


def decode_reference(loaded: LoadedModel, prompt: str = DEFAULT_PROMPT, decode_steps: int = 16,
                     max_positions: int | None = None) -> DecodeReference:
    prompt_ids = loaded.tokenizer(prompt).input_ids
    if not prompt_ids:
        raise BadInputError("the validation prompt tokenizes to nothing; pass a non-empty --prompt")
    if max_positions is not None and len(prompt_ids) + decode_steps > max_positions:
        raise BadInputError(
            f"validation needs {len(prompt_ids)} prompt + {decode_steps} decode positions but the graph "
            f"covers {max_positions} (--max-seq); shorten --prompt or raise --max-seq"
        )
    logits, tokens = reference_decode(loaded, prompt_ids, decode_steps)
    return DecodeReference(prompt, list(prompt_ids), logits, tokens, decode_steps)


def compare(reference: DecodeReference, executor: Executor, tolerance: Tolerance) -> ValidationResult:
    """The compiled graph, teacher-forced on the reference's tokens, judged against its logits."""
    start = time.perf_counter()
    prompt_ids, ref_logits, ref_tokens = reference.prompt_ids, reference.logits, reference.tokens
    decode_steps = reference.decode_steps
    try:
        compiled = Runner(executor).teacher_forced(prompt_ids, ref_tokens[:decode_steps])
    except ValueError as exc:  # e.g. a recipe without kv-cache-scatter, or too few cache slots
        raise BadInputError(f"cannot validate the compiled graph: {exc}") from exc
    got_tokens, errors, rel = [], [], []
    for logits, expected in zip(compiled, ref_logits):
        errors.append(np.abs(logits - expected).ravel())
        rel.append(relative_errors(logits.reshape(expected.shape), expected))
        got_tokens.append(int(logits[-1].argmax()))
    err = np.concatenate(errors)
    max_err, mean_err, rel_err = float(err.max()), float(err.mean()), float(np.concatenate(rel).max())
    agreement = float(np.mean(np.array(got_tokens) == np.array(ref_tokens)))
    if not np.isfinite(err).all():
        max_err = mean_err = rel_err = float("nan")
    failures = judge(max_err, mean_err, rel_err, agreement, tolerance)
    return ValidationResult(
        prompt=reference.prompt,
        prompt_tokens=len(prompt_ids),
        decode_steps=decode_steps,
        max_abs_error=max_err,
        mean_abs_error=mean_err,
        max_rel_error=rel_err,
        greedy_agreement=agreement,
        reference_tokens=ref_tokens,
        compiled_tokens=got_tokens,
        tolerance=tolerance,
        passed=not failures,
        failures=failures,
        seconds=time.perf_counter() - start,
    )


def validate(loaded: LoadedModel, onnx_path: Path, tolerance: Tolerance, **kwargs) -> ValidationResult:
    """Validate the compiled ONNX on onnxruntime (CPU; the contract TensorRT parsed); kwargs: decode_reference's."""
    from compiler.runtime.onnx_executor import OnnxRuntimeExecutor

    reference = decode_reference(loaded, **kwargs)
    return compare(reference, OnnxRuntimeExecutor(onnx_path, arena=False), tolerance)
