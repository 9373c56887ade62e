"""Stage 6b, quality: what the compiled graph costs in accuracy on held-out text, in user terms.

Why: logit error on one prompt says a graph is *wired* right; it can't say whether INT4 made the
model worse. This stage measures the compiled ONNX (onnxruntime, through the generation runner and
its KV cache) and the PyTorch FP32 reference on the same held-out text, which differs from the
calibration text:

- perplexity of each over non-overlapping windows, and the relative delta (compiled / ref - 1);
- mean KL(reference || compiled) of the next-token distributions at every position;
- greedy agreement over `new_tokens` continuation tokens of a few prompts: the reference decodes
  greedily, the compiled graph is teacher-forced on that continuation (so one flip cannot cascade)
  and its argmax is compared at every step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from .calibrate import tokenize_windows
from .runner import Runner
from .runtime_onnx import OnnxRuntimeExecutor
from .types import LoadedModel


@dataclasses.dataclass
class QualityResult:
    reference_perplexity: float
    compiled_perplexity: float
    ppl_delta: float  # relative: 0.03 = compiled perplexity 3% above the reference
    kl_mean: float  # nats per token
    greedy_agreement: float  # over agreement_tokens continuation tokens
    agreement_tokens: int
    eval_tokens: int
    seconds: float


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _compiled_window_logits(runner: Runner, windows: list[list[int]], batch: int) -> np.ndarray:
    """Prefill logits at every position of each window ([n, window, vocab]), through the runner's cache path."""
    out = []
    for i in range(0, len(windows), batch):
        chunk = np.array(windows[i:i + batch], np.int64)
        runner.executor.start(len(chunk))
        positions = np.tile(np.arange(chunk.shape[1], dtype=np.int64), (len(chunk), 1))
        out.append(runner.executor.step(chunk, positions).astype(np.float32))
    return np.concatenate(out)


def _reference_window_logits(loaded: LoadedModel, windows: list[list[int]], batch: int) -> np.ndarray:
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            out.append(loaded.model(input_ids=torch.tensor(windows[i:i + batch]), use_cache=False).logits.float().numpy())
    return np.concatenate(out)


def _agreement(loaded: LoadedModel, runner: Runner, prompts: list[str], new_tokens: int, cap: int) -> tuple[int, int]:
    """Batched teacher forcing: every prompt's reference continuation is fed in one decode batch."""
    from .validate import reference_decode

    ids = [loaded.tokenizer(p).input_ids[: max(1, cap - new_tokens)] or [loaded.tokenizer.bos_token_id or 0]
           for p in prompts]
    forced = [reference_decode(loaded, p, new_tokens - 1)[1] for p in ids]
    picks = [runner.prefill(ids).argmax(-1)]
    for i in range(new_tokens - 1):
        picks.append(runner.decode([f[i] for f in forced], [len(p) + i for p in ids]).argmax(-1))
    compiled = np.stack(picks, axis=1)  # [prompts, new_tokens]
    return int((compiled == np.array(forced)).sum()), compiled.size


def default_prompts(text: str, count: int = 4) -> list[str]:
    """The first line of `count` paragraphs of the evaluation text, spread through it."""
    paragraphs = [p.strip().splitlines() for p in text.split("\n\n") if p.strip()]
    lines = [p[0] + "\n" + (p[1] if len(p) > 1 else "") for p in paragraphs]
    step = max(1, len(lines) // count)
    return [lines[i] for i in range(0, len(lines), step)][:count]


def measure_quality(loaded: LoadedModel, onnx_path: Path, eval_text: str, *, window: int = 128,
                    max_windows: int = 16, batch: int = 4, new_tokens: int = 64, prompts: list[str] | None = None,
                    capacity: int | None = None) -> QualityResult:
    start = time.perf_counter()
    executor = OnnxRuntimeExecutor(onnx_path)
    runner = Runner(executor, loaded.tokenizer.pad_token_id)
    cap = capacity or executor.io.capacity or window
    window = min(window, cap)
    windows = tokenize_windows(loaded.tokenizer, eval_text, window, max_windows)

    ref = _log_softmax(_reference_window_logits(loaded, windows, batch))[:, :-1]
    got = _log_softmax(_compiled_window_logits(runner, windows, batch))[:, :-1]
    targets = np.array(windows)[:, 1:]
    take = lambda lp: np.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]  # noqa: E731
    ref_nll, got_nll = -take(ref).mean(), -take(got).mean()
    kl = float((np.exp(ref) * (ref - got)).sum(axis=-1).mean())

    agree, total = _agreement(loaded, runner, prompts or default_prompts(eval_text), new_tokens, cap)
    ref_ppl, got_ppl = math.exp(ref_nll), math.exp(got_nll)
    return QualityResult(
        reference_perplexity=ref_ppl, compiled_perplexity=got_ppl, ppl_delta=got_ppl / ref_ppl - 1,
        kl_mean=kl, greedy_agreement=agree / total if total else 1.0, agreement_tokens=total,
        eval_tokens=int(targets.size), seconds=time.perf_counter() - start,
    )
