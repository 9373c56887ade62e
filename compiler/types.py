"""The small typed objects that stages hand each other.

Each stage takes the previous stage's object and returns its own; nothing else is shared.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

# Dim names in the exported graph (what users of onnxruntime-genai / Optimum expect to see). Here, not
# in export.py, so that build.py does not import the exporter (torch, every pass) to read them.
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


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


BLOCK_TABLES = "block_tables"  # the paged graph's one block-table input, shared by every layer


@dataclasses.dataclass(frozen=True)
class GraphIO:
    """The public I/O contract of the exported graph (names follow Optimum / onnxruntime-genai)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    capacity: int | None = None  # fixed KV-cache slots (kv-cache-scatter); None: Concat-grown cache
    # Paged cache (attention-plugin with paged: true): past/present are block pools
    # [num_blocks, kv_heads, block_size, head_dim] shared by the batch, addressed through the one
    # `block_tables` input [batch, capacity // block_size]. None: linear [batch, kv_heads, capacity, head_dim].
    block_size: int | None = None

    @property
    def paged(self) -> bool:
        return self.block_size is not None

    @property
    def max_blocks(self) -> int | None:
        """Block-table width: blocks one sequence can hold (capacity // block_size)."""
        return self.capacity // self.block_size if self.paged and self.capacity is not None else None

    @property
    def past_names(self) -> list[str]:
        return [f"past_key_values.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    @property
    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.num_layers) for kv in ("key", "value")]

    @property
    def input_names(self) -> list[str]:
        if self.paged:
            return ["input_ids", "position_ids", BLOCK_TABLES, *self.past_names]
        if self.capacity is not None:
            return ["input_ids", "position_ids", *self.past_names]
        return ["input_ids", "attention_mask", "position_ids", *self.past_names]

    @property
    def output_names(self) -> list[str]:
        return ["logits", *self.present_names]


@dataclasses.dataclass
class ExportedGraph:
    """Output of export (and of each pass): an in-memory ONNX model plus its I/O contract."""

    model: Any  # onnx_ir.Model
    io: GraphIO
    seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """What 'numerically correct' means for a recipe (compiled ONNX vs PyTorch FP32, one prompt).

    Absolute bounds suit graphs that equal PyTorch up to FP16 rounding. A quantized graph's logits
    move by an amount that scales with the model's logits, so quantizing recipes bound the error
    relative to the reference logits' spread (`max_rel_logit_error`, compiler/validate.py) as a
    wiring check, and their verdict rests on held-out quality (compiler/verdict.py). None: unchecked."""

    max_abs_logit_error: float | None = None
    mean_abs_logit_error: float | None = None
    min_greedy_agreement: float = 0.0
    max_rel_logit_error: float | None = None


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named, ordered pass list plus the tolerance its output must meet (recipes/*.yaml)."""

    name: str
    description: str
    passes: tuple[str, ...]
    tolerance: Tolerance
    source: Path | None = None
    sha256: str = ""  # of the recipe file's text: the build manifest and the cache keys record it
    pass_options: tuple[dict, ...] = ()  # per pass, parallel to `passes` ({} = defaults)
    max_ppl_delta: float | None = None  # relative held-out perplexity increase allowed (0.05 = 5%)
    max_kl: float | None = None  # held-out mean KL(reference || compiled) allowed, nats per token
    min_heldout_agreement: float | None = None  # held-out greedy agreement required (quality stage)

    def options_for(self, index: int) -> dict:
        return dict(self.pass_options[index]) if index < len(self.pass_options) else {}

    @property
    def quality_limits(self) -> bool:
        """Whether the recipe sets a held-out limit (max_ppl_delta, max_kl, min_heldout_agreement)."""
        return any(v is not None for v in (self.max_ppl_delta, self.max_kl, self.min_heldout_agreement))

    @property
    def quantizes(self) -> bool:
        return any(p.startswith("quantize-") for p in self.passes)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Engine shape limits: one optimization profile covers prefill and decode."""

    max_batch: int = 1
    max_seq: int = 256

    def __post_init__(self) -> None:
        from .errors import BadInputError

        if self.max_batch < 1:
            raise BadInputError(f"--max-batch must be >= 1 (got {self.max_batch})")
        if self.max_seq < 2:
            raise BadInputError(f"--max-seq must be >= 2 (got {self.max_seq})")


@dataclasses.dataclass
class PassRecord:
    """What one pass did: for the report and for debugging a pipeline."""

    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    details: dict = dataclasses.field(default_factory=dict)  # e.g. which modules a quantizer touched
    check: dict = dataclasses.field(default_factory=dict)  # --check-passes: compiler/pass_check.PassCheck as a dict


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor as the built network declares it (-1 = dynamic)."""

    name: str
    dtype: str  # numpy-style name: float16, int64, bool, ...
    shape: tuple[int, ...]
    is_input: bool


@dataclasses.dataclass
class EngineArtifact:
    """Output of build: the serialized engine and the facts needed to serve it."""

    plan_path: Path
    onnx_path: Path
    backend: str
    backend_version: str
    tensors: list[TensorInfo]
    layer_types: dict[str, int]
    seconds: float
    timing_cache: str
    # Built in a child process (build_engine_isolated): the child's peak RSS, the builder's own memory
    # (a 1 s sampler of the process tree misses its spikes). None for an in-process build.
    builder_peak_rss_bytes: int | None = None


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
