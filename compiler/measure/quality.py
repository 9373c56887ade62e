"""Quality (the quality stage): what the compiled graph costs in accuracy on held-out text, in user terms.

Why: logit error on one prompt says a graph is *wired* right; it can't say whether INT4 made the
model worse. This stage measures the compiled ONNX (onnxruntime, through the generation runner and
its KV cache) and the PyTorch FP32 reference on the same held-out text, which differs from the
calibration text:

- perplexity of each over non-overlapping windows, and the relative delta (compiled / ref - 1);
- mean KL(reference || compiled) of the next-token distributions at every position;
- greedy agreement over `new_tokens` continuation tokens of a few prompts: the reference decodes
  greedily, the compiled graph is teacher-forced on that continuation (so one flip cannot cascade)
  and its argmax is compared at every step.

The PyTorch side is `quality_reference` (a `QualityReference`), computed before the model is
dropped; `score` runs the compiled graph against it with any executor, e.g. the one validate used.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path

import numpy as np

from compiler.frontend.calibrate import logits_batch, tokenize_windows, vocab_rows
from compiler.runtime.runner import Runner
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.host.scratch import SpilledArray, spilled_or_in_memory
from compiler.frontend.model import LoadedModel


# Tokens per perplexity window. The compiled graph cannot take a longer window than --max-seq: its
# KV cache (kv-cache-scatter) and rotary table (rotary-2d-cache) hold exactly that many positions, so
# a shorter --max-seq cuts the window, and report.json's quality records the window used.
QUALITY_WINDOW = 128


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
    window: int = 0  # tokens per perplexity window actually used
    windows: int = 0
    window_cut_to_max_seq: bool = False  # the requested window exceeded the graph's positions (--max-seq)


def _log_softmax(logits: np.ndarray) -> "torch.Tensor":
    """float32 log-probabilities (torch: one fused pass; at a 128k vocabulary a float64 numpy
    log-softmax of 16 windows made ~2 GB arrays, several at a time)."""
    import torch

    return torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=-1)


def _batches(windows: list[list[int]], batch: int):
    for i in range(0, len(windows), batch):
        yield i, np.array(windows[i:i + batch], np.int64)


def _compiled_logits(runner: Runner, chunk: np.ndarray) -> np.ndarray:
    """Prefill logits at every position of each window in `chunk`, through the runner's cache path."""
    runner.executor.start(len(chunk))
    positions = np.tile(np.arange(chunk.shape[1], dtype=np.int64), (len(chunk), 1))
    return runner.executor.step(chunk, positions)


def _reference_logp(loaded: LoadedModel, windows: list[list[int]], batch: int):
    """[n, window - 1, vocab] float32 reference log-probabilities, written one window at a time to a
    scratch file (compiler/host/scratch.py: 1 GB at 1B, not held in memory until quality). The model runs a
    batch of windows (at most `batch`, fewer at a large vocabulary: calibrate.logits_batch); the
    log-softmax and the write go one window at a time (a batch's log-probabilities and their strided
    copy were 0.5 GB of transients at 1B, the reference stage's peak)."""
    import torch

    vocab = vocab_rows(loaded.model)
    out = spilled_or_in_memory(len(windows), (len(windows[0]) - 1, vocab))
    with torch.no_grad():
        for _, chunk in _batches(windows, min(batch, logits_batch(len(windows[0]), vocab))):
            logits = loaded.model(input_ids=torch.from_numpy(chunk), use_cache=False).logits
            for row in logits:
                out.append(_log_softmax(row[:-1].float().numpy())[None].numpy())
            del logits
    return out



def _agreement(runner: Runner, prompt_ids: list[list[int]], forced: list[list[int]]) -> tuple[int, int]:
    """Batched teacher forcing: every prompt's reference continuation is fed in one decode batch."""
    picks = [runner.prefill(prompt_ids).argmax(-1)]
    for i in range(len(forced[0]) - 1):
        picks.append(runner.decode([f[i] for f in forced], [len(p) + i for p in prompt_ids]).argmax(-1))
    compiled = np.stack(picks, axis=1)  # [prompts, new_tokens]
    return int((compiled == np.array(forced)).sum()), compiled.size


def default_prompts(text: str, count: int = 4) -> list[str]:
    """The first line of `count` paragraphs of the evaluation text, spread through it."""
    paragraphs = [p.strip().splitlines() for p in text.split("\n\n") if p.strip()]
    lines = [p[0] + "\n" + (p[1] if len(p) > 1 else "") for p in paragraphs]
    step = max(1, len(lines) // count)
    return [lines[i] for i in range(0, len(lines), step)][:count]


@dataclasses.dataclass
class HeldOut:
    """The reference side of the perplexity / KL comparison, computed once and reused for many graphs."""

    windows: list[list[int]]
    reference_logp: np.ndarray | SpilledArray  # [n, window - 1, vocab] float32 log-probabilities
    targets: np.ndarray  # [n, window - 1] next tokens
    batch: int

    @functools.cached_property
    def reference_nll(self) -> float:
        """Read one batch of windows at a time (the log-probabilities may be on disk)."""
        total = sum(float(_take(self.reference_logp[i:i + self.batch], self.targets[i:i + self.batch])
                          .astype(np.float64).sum()) for i in range(0, len(self.targets), self.batch))
        return -total / self.targets.size


@dataclasses.dataclass
class WindowScores:
    reference_perplexity: float
    compiled_perplexity: float
    ppl_delta: float
    kl_mean: float


def _take(logp: np.ndarray, targets: np.ndarray) -> np.ndarray:
    return np.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def held_out(loaded: LoadedModel, eval_text: str, window: int, max_windows: int = 16, batch: int = 4) -> HeldOut:
    windows = tokenize_windows(loaded.tokenizer, eval_text, window, max_windows)
    return HeldOut(windows, _reference_logp(loaded, windows, batch), np.array(windows)[:, 1:], batch)


def score_windows(held: HeldOut, runner: Runner) -> WindowScores:
    """Perplexity of reference and compiled graph, and mean KL(reference || compiled), on the same windows.

    The compiled graph runs a batch of windows at a time; the scores are taken one window at a time,
    so the temporaries are window-sized (sums accumulate in float64). Scored a batch at a time, the
    log-softmax, the reference read back and KL's three temporaries were 1.3 GB at 1B (4 x 128 x 128256
    float32 each), the quality stage's peak."""
    import torch

    nll = kl = 0.0
    for i, chunk in _batches(held.windows, held.batch):
        logits = _compiled_logits(runner, chunk)
        for j in range(len(chunk)):
            got = _log_softmax(logits[j])[:-1]
            ref = torch.from_numpy(held.reference_logp[i + j:i + j + 1][0])
            nll -= float(got.gather(-1, torch.from_numpy(held.targets[i + j])[:, None]).sum(dtype=torch.float64))
            kl += float((ref.exp() * (ref - got)).sum(dim=-1, dtype=torch.float64).sum())
        del logits
    rows = held.targets.size
    ref_ppl, got_ppl = math.exp(held.reference_nll), math.exp(nll / rows)
    return WindowScores(ref_ppl, got_ppl, got_ppl / ref_ppl - 1, kl / rows)


@dataclasses.dataclass
class QualityReference:
    """The PyTorch side of the quality stage: everything `score` needs, without the model."""

    held: HeldOut
    prompt_ids: list[list[int]]  # the agreement prompts, tokenized and cut to fit
    forced: list[list[int]]  # the reference's greedy continuation of each, new_tokens long
    window_cut: bool = False  # the requested window was cut to the graph's capacity


def quality_reference(loaded: LoadedModel, eval_text: str, capacity: int, *, window: int = 128,
                      max_windows: int = 16, batch: int = 4, new_tokens: int = 64, prompts: list[str] | None = None,
                      held: HeldOut | None = None) -> QualityReference:
    """capacity: the positions the compiled graph holds (--max-seq); windows and prompts are cut to fit."""
    from compiler.measure.validate import reference_greedy

    held = held or held_out(loaded, eval_text, min(window, capacity), max_windows, batch)
    ids = [loaded.tokenizer(p).input_ids[: max(1, capacity - new_tokens)] or [loaded.tokenizer.bos_token_id or 0]
           for p in prompts or default_prompts(eval_text)]
    forced = reference_greedy(loaded, ids, new_tokens)
    return QualityReference(held, ids, forced, window_cut=len(held.windows[0]) < window)


def score(reference: QualityReference, runner: Runner) -> QualityResult:
    """The compiled graph (through `runner`) against the reference: perplexity, KL, agreement."""
    start = time.perf_counter()
    scores = score_windows(reference.held, runner)
    agree, total = _agreement(runner, reference.prompt_ids, reference.forced)
    return QualityResult(
        reference_perplexity=scores.reference_perplexity, compiled_perplexity=scores.compiled_perplexity,
        ppl_delta=scores.ppl_delta, kl_mean=scores.kl_mean, greedy_agreement=agree / total if total else 1.0,
        agreement_tokens=total, eval_tokens=int(reference.held.targets.size), seconds=time.perf_counter() - start,
        window=len(reference.held.windows[0]), windows=len(reference.held.windows),
        window_cut_to_max_seq=reference.window_cut,
    )


def measure_quality(loaded: LoadedModel, onnx_path: Path, eval_text: str, *, capacity: int | None = None,
                    **kwargs) -> QualityResult:
    """Both sides in one call (kwargs: quality_reference's); the build runs them as separate stages."""
    start = time.perf_counter()
    executor = OnnxRuntimeExecutor(onnx_path, arena=False)
    reference = quality_reference(loaded, eval_text, capacity or executor.io.capacity or kwargs.get("window", 128),
                                  **kwargs)
    result = score(reference, Runner(executor, loaded.tokenizer.pad_token_id))
    return dataclasses.replace(result, seconds=time.perf_counter() - start)
