"""Calibration (the calibrate stage): sample the activations entering each linear layer of the PyTorch model.

Why: AWQ (passes/quantize_int4_awq.py) picks per-channel scales and clip ranges from the inputs
the weights really see. The reference model runs once over the calibration text (batched, on
CUDA when present) with forward hooks on every nn.Linear of the decoder blocks; each keeps a
fixed-size, evenly strided sample of its input rows, keyed by the Hugging Face module name that
the ONNX graph's node metadata also carries. Only runs for recipes that need it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Callable

import numpy as np

from compiler.errors import BadInputError
from compiler.host.scratch import on_disk_or_none, read_at, scratch_file, write_at
from compiler.frontend.model import LoadedModel


@dataclasses.dataclass
class Calibration:
    """Per module: a [tokens, in_features] float32 sample of its inputs (a Mapping; see ActivationStore)."""

    activations: Mapping[str, np.ndarray]
    tokens: int
    sequences: int
    seconds: float


class ActivationStore(Mapping):
    """Module name -> its [rows, in_features] float32 sample, kept in one unnamed scratch file.

    Why: at 1B the samples are 1.3 GB, held from the calibrate stage through the reference and the
    export to the AWQ pass, which reads one group at a time. On disk they cost what is being read.
    Modules fed the same tensor (q/k/v after one norm, gate/up after another) share one sample, so
    1B holds 0.9 GB of samples instead of 1.3. Each read returns a fresh array (callers may keep or
    modify it). Without a usable scratch folder the samples stay in memory, with a warning.
    """

    def __init__(self):
        self._file = on_disk_or_none(lambda: scratch_file("llmc-calib-"), "the calibration sample")
        self._regions: dict[str, list] = {}  # sample key -> [offset or ndarray, capacity, columns, rows written]
        self._names: dict[str, str] = {}  # module name -> sample key
        self._end = 0

    def reserve(self, key: str, rows: int, columns: int) -> None:
        if self._file is None:
            self._regions[key] = [np.empty((rows, columns), np.float32), rows, columns, 0]
        else:
            self._regions[key] = [self._end, rows, columns, 0]
            self._end += rows * columns * 4

    def append(self, key: str, block: np.ndarray) -> None:
        region = self._regions[key]
        where, capacity, columns, written = region
        if written + len(block) > capacity or block.shape[1:] != (columns,):
            raise ValueError(f"sample {key!r}: {block.shape} does not fit [{capacity}, {columns}] after {written} rows")
        block = np.ascontiguousarray(block, dtype=np.float32)
        if isinstance(where, np.ndarray):
            where[written:written + len(block)] = block
        else:
            write_at(self._file, where + written * columns * 4, block)
        region[3] = written + len(block)

    def alias(self, name: str, key: str) -> None:
        self._names[name] = key

    def __getitem__(self, name: str) -> np.ndarray:
        where, _, columns, rows = self._regions[self._names[name]]
        if isinstance(where, np.ndarray):
            return where[:rows].copy()
        return read_at(self._file, where, np.empty((rows, columns), np.float32))

    def __contains__(self, name) -> bool:  # Mapping's default would read the sample to answer
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def distinct(self) -> int:
        """Samples actually stored (modules sharing an input share one)."""
        return len(set(self._names.values()))


def tokenize_windows(tokenizer, text: str, window: int, max_windows: int) -> list[list[int]]:
    """Non-overlapping `window`-token chunks of the text (at most `max_windows`).

    When the tokenizer starts a text with its BOS token, every window starts with it (and carries
    `window - 1` text tokens): models trained with BOS at the start of every sequence score a window
    without it as out of distribution (Gemma 3 270M: held-out perplexity 268 without, 40 with;
    benchmarks/NOTES.md), and llama.cpp's perplexity tool does the same. BOS is context, never a target.
    """
    ids = tokenizer(text).input_ids
    bos = getattr(tokenizer, "bos_token_id", None)
    lead = [bos] if bos is not None and ids[:1] == [bos] else []
    body, step = ids[len(lead):], window - len(lead)
    chunks = [lead + body[i:i + step] for i in range(0, len(body) - step + 1, step)][:max_windows]
    if not chunks:
        raise BadInputError(f"the text has {len(ids)} tokens, fewer than one {window}-token window; give a longer file")
    return chunks


# Tokens x parameters the default calibration may spend: all 32 windows (4096 tokens) up to 400M
# parameters, then fewer, never under 8. On a 1.2B model on 2 cores the full 4096 tokens took 13
# minutes; AWQ keeps 1024 rows per layer either way, so fewer windows means less diverse rows, not
# fewer. The report records the tokens used, and the quality stage measures the result.
CALIBRATION_BUDGET = 4096 * 400e6


def default_windows(num_parameters: int, window: int = 128, most: int = 32, least: int = 8) -> int:
    return max(least, min(most, int(CALIBRATION_BUDGET // (max(num_parameters, 1) * window))))


# FP32 logits a PyTorch forward over windows may make at once (calibration, the held-out reference).
# Hugging Face computes every position's logits: 8 windows of 128 at a 128256 vocabulary made 525 MB
# at once, the largest transient of the stages that hold the model.
LOGITS_BUDGET = 128 << 20


def vocab_rows(model) -> int:
    """The logits' width: the output embedding's rows (config.vocab_size can differ from it)."""
    return model.get_output_embeddings().weight.shape[0]


def logits_batch(window: int, vocab: int, most: int = 8) -> int:
    """Windows per forward so that their logits fit LOGITS_BUDGET (at least 1, at most `most`)."""
    return max(1, min(most, LOGITS_BUDGET // max(1, window * vocab * 4)))


def calibrate(loaded: LoadedModel, text: str, *, window: int = 128, max_windows: int | None = None,
              batch: int | None = None, sample_rows: int = 1024,
              on_progress: Callable[[int, int], None] | None = None) -> Calibration:
    """batch: windows per forward (default: logits_batch). The sample does not depend on it."""
    import torch

    start = time.perf_counter()
    if max_windows is None:
        max_windows = default_windows(loaded.num_parameters, window)
    chunks = tokenize_windows(loaded.tokenizer, text, window, max_windows)
    model = loaded.model
    batch = batch or logits_batch(window, vocab_rows(model))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total_rows = len(chunks) * window
    stride = max(1, total_rows // sample_rows)
    capacity = min(sample_rows, -(-total_rows // stride))  # rows 0, stride, 2 * stride, ... up to sample_rows
    store = ActivationStore()
    seen: dict[str, int] = {}  # rows each module has been fed so far
    kept: dict[str, int] = {}
    last: list = [None, None]  # the input the previous hook sampled, and its sample key
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.startswith("model.layers.") or name == "lm_head"):
            def hook(mod, args, _out, name=name):
                # Keep global rows 0, stride, 2*stride, ... as they pass, not all rows then subsample:
                # on a 1B model the full set is 5 GB, the sample 1.3 GB.
                x = args[0]
                if last[0] is x:  # q/k/v, gate/up: called one after another on one tensor, one sample
                    store.alias(name, last[1])
                    return
                last[:] = [x, name]
                if name not in kept:
                    store.reserve(name, capacity, x.shape[-1])
                    store.alias(name, name)
                rows = x.detach().reshape(-1, x.shape[-1])
                start = seen.get(name, 0)
                seen[name] = start + rows.shape[0]
                picked = rows[(-start) % stride::stride][:capacity - kept.get(name, 0)]
                kept[name] = kept.get(name, 0) + len(picked)
                if len(picked):
                    store.append(name, picked.float().cpu().numpy())
            hooks.append(module.register_forward_hook(hook))
    model.to(device)
    try:
        with torch.no_grad():
            for i in range(0, len(chunks), batch):
                ids = torch.tensor(chunks[i:i + batch], device=device)
                model(input_ids=ids, use_cache=False)
                last[:] = [None, None]
                if on_progress:
                    on_progress(min(i + batch, len(chunks)), len(chunks))
    finally:
        for h in hooks:
            h.remove()
        model.to("cpu")
    return Calibration(store, tokens=total_rows, sequences=len(chunks), seconds=time.perf_counter() - start)
