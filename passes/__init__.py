"""Graph passes, one per file; recipes name them, this registry maps names to classes.

The registry below is the only list of passes in llmc: to find where a rewrite happens, look up
its recipe name here and open the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import onnx_ir as ir

from .attention_plugin import AttentionPluginFp8KvPass, AttentionPluginPass
from .base import LlmcPass
from .cast_fp16 import CastFp16Pass
from .cleanup import CleanupPass
from .gqa_native_attention import GqaNativeAttentionPass
from .kv_cache_scatter import KvCacheScatterPass
from .last_position_logits import LastPositionLogitsPass
from .logits_fp32_topk import LogitsFp32TopKPass
from .quantize_fp8_w8a8 import QuantizeFp8Pass
from .quantize_fp8_wo import QuantizeFp8WoPass
from .quantize_int4_awq import QuantizeInt4AwqPass
from .quantize_int4_embedding import QuantizeInt4EmbeddingPass
from .quantize_int4_gptq import QuantizeInt4GptqPass
from .quantize_int4_rtn import QuantizeInt4RtnPass
from .quantize_int8_embedding import QuantizeInt8EmbeddingPass
from .quantize_int8_sq import QuantizeInt8SqPass
from .quantize_int8_wo import QuantizeInt8WoPass
from .residual_fp32 import ResidualFp32Pass
from .rotary_2d_cache import Rotary2DCachePass


@dataclasses.dataclass(frozen=True)
class PassContext:
    """Build facts some passes need (e.g. how many positions the rotary table must cover)."""

    max_positions: int
    # Calibration activations (HF module name -> [tokens, in_features] float32) for AWQ, GPTQ and the W8A8 scales.
    activations: Mapping[str, Any] | None = None
    sliding_window: int = 0  # the model's attention window (0 = none); only plugin passes can honour it


# name -> pass class. A recipe's options are the class's keyword arguments
# (e.g. `{pass: quantize-int4-rtn, block_size: 32, targets: ["model.layers.*.mlp.*"]}`); build facts
# (positions, activations, the attention window) come through the class's `from_context`.
REGISTRY: dict[str, type[LlmcPass]] = {
    "cleanup": CleanupPass,
    "rotary-2d-cache": Rotary2DCachePass,
    "gqa-native-attention": GqaNativeAttentionPass,
    "kv-cache-scatter": KvCacheScatterPass,
    "last-position-logits": LastPositionLogitsPass,
    "logits-fp32-topk": LogitsFp32TopKPass,
    "cast-fp16": CastFp16Pass,
    "residual-fp32": ResidualFp32Pass,
    "quantize-int4-rtn": QuantizeInt4RtnPass,
    "quantize-int4-awq": QuantizeInt4AwqPass,
    "quantize-int4-gptq": QuantizeInt4GptqPass,
    "quantize-int8-wo": QuantizeInt8WoPass,
    "quantize-int8-embedding": QuantizeInt8EmbeddingPass,
    "quantize-int4-embedding": QuantizeInt4EmbeddingPass,
    "quantize-fp8-wo": QuantizeFp8WoPass,
    "quantize-fp8": QuantizeFp8Pass,
    "quantize-int8-sq": QuantizeInt8SqPass,
    "attention-plugin": AttentionPluginPass,
    "attention-plugin-fp8kv": AttentionPluginFp8KvPass,
}


def pass_class(name: str) -> type[LlmcPass]:
    """The class a recipe's pass name stands for; an unknown name (a test's own pass) gets the defaults."""
    return REGISTRY.get(name, LlmcPass)


def needs_calibration(names) -> bool:
    return any(pass_class(n).needs_calibration for n in names)


def needs_plugins(names) -> bool:
    return any(pass_class(n).needs_plugins for n in names)


def quantizes(names) -> bool:
    return any(pass_class(n).weight_format is not None for n in names)


def make_pass(name: str, ctx: PassContext, options: Mapping[str, Any] | None = None) -> ir.passes.PassBase:
    """Instantiate a registered pass; a bad option raises TypeError/ValueError naming the pass."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(REGISTRY)}") from None
    try:
        return cls.from_context(ctx, **dict(options or {}))
    except TypeError as exc:
        raise TypeError(f"pass {name!r}: bad option ({exc})") from None
