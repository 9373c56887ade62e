"""Stage 2b, calibrate: sample the activations entering each linear layer of the PyTorch model.

Why: AWQ (passes/quantize_int4_awq.py) picks per-channel scales and clip ranges from the inputs
the weights really see. The reference model runs once over the calibration text (batched, on
CUDA when present) with forward hooks on every nn.Linear of the decoder blocks; each keeps a
fixed-size, evenly strided sample of its input rows, keyed by the Hugging Face module name that
the ONNX graph's node metadata also carries. Only runs for recipes that need it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np

from .errors import BadInputError
from .types import LoadedModel


@dataclasses.dataclass
class Calibration:
    """Per module: a [tokens, in_features] float32 sample of its inputs."""

    activations: dict[str, np.ndarray]
    tokens: int
    sequences: int
    seconds: float


def tokenize_windows(tokenizer, text: str, window: int, max_windows: int) -> list[list[int]]:
    """Non-overlapping `window`-token chunks of the text (at most `max_windows`)."""
    ids = tokenizer(text).input_ids
    chunks = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:max_windows]
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


def calibrate(loaded: LoadedModel, text: str, *, window: int = 128, max_windows: int | None = None, batch: int = 8,
              sample_rows: int = 1024, on_progress: Callable[[int, int], None] | None = None) -> Calibration:
    import torch

    start = time.perf_counter()
    if max_windows is None:
        max_windows = default_windows(loaded.num_parameters, window)
    chunks = tokenize_windows(loaded.tokenizer, text, window, max_windows)
    model = loaded.model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    total_rows = len(chunks) * window
    stride = max(1, total_rows // sample_rows)
    samples: dict[str, list[torch.Tensor]] = {}
    seen: dict[str, int] = {}  # rows each module has been fed so far
    kept: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and (name.startswith("model.layers.") or name == "lm_head"):
            def hook(mod, args, _out, name=name):
                # Keep global rows 0, stride, 2*stride, ... as they pass, not all rows then subsample:
                # on a 1B model the full set is 5 GB, the sample 1.3 GB.
                rows = args[0].detach().reshape(-1, args[0].shape[-1])
                start = seen.get(name, 0)
                seen[name] = start + rows.shape[0]
                picked = rows[(-start) % stride::stride][:sample_rows - kept.get(name, 0)]
                if len(picked):
                    kept[name] = kept.get(name, 0) + len(picked)
                    samples.setdefault(name, []).append(picked.float().cpu().clone())
            hooks.append(module.register_forward_hook(hook))
    model.to(device)
    try:
        with torch.no_grad():
            for i in range(0, len(chunks), batch):
                ids = torch.tensor(chunks[i:i + batch], device=device)
                model(input_ids=ids, use_cache=False)
                if on_progress:
                    on_progress(min(i + batch, len(chunks)), len(chunks))
    finally:
        for h in hooks:
            h.remove()
        model.to("cpu")
    activations = {name: torch.cat(rows).numpy() for name, rows in samples.items()}
    return Calibration(activations, tokens=total_rows, sequences=len(chunks), seconds=time.perf_counter() - start)
