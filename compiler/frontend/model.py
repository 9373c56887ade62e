"""What the load stage hands on: the model's shape facts and the reference PyTorch model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The shape facts every later stage needs, read once from config.json."""

    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    sliding_window: int | None = None
    layer_windows: tuple[int, ...] = ()  # per layer: attention window, 0 = full (load._layer_windows)


@dataclasses.dataclass
class LoadedModel:
    """Output of load: the reference PyTorch model (FP32, eval mode) and its tokenizer."""

    path: Path
    name: str
    spec: ModelSpec
    model: Any  # transformers PreTrainedModel
    tokenizer: Any  # transformers PreTrainedTokenizerBase
    num_parameters: int
