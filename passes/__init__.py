"""Graph passes, one per file; recipes name them, this registry maps names to classes.

The registry below is the only list of passes in llmc: to find where a rewrite happens, look up
its recipe name here and open the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Callable

import onnx_ir as ir

from .attention_plugin import AttentionPluginPass
from .cast_fp16 import CastFp16Pass
from .cleanup import CleanupPass
from .gqa_native_attention import GqaNativeAttentionPass
from .kv_cache_scatter import KvCacheScatterPass
from .quantize_fp8_wo import QuantizeFp8WoPass
from .quantize_int4_awq import QuantizeInt4AwqPass
from .quantize_int4_rtn import QuantizeInt4RtnPass
from .quantize_int8_wo import QuantizeInt8WoPass
from .residual_fp32 import ResidualFp32Pass
from .rotary_2d_cache import Rotary2DCachePass


@dataclasses.dataclass(frozen=True)
class PassContext:
    """Build facts some passes need (e.g. how many positions the rotary table must cover)."""

    max_positions: int
    # Calibration activations (HF module name -> [tokens, in_features] float32) for AWQ.
    activations: Mapping[str, Any] | None = None
    sliding_window: int = 0  # the model's attention window (0 = none); only plugin passes can honour it


# name -> factory(ctx, **options from the recipe). Options are the pass's own keyword arguments
# (e.g. `{pass: quantize-int4-rtn, block_size: 32, targets: ["model.layers.*.mlp.*"]}`).
REGISTRY: dict[str, Callable[..., ir.passes.PassBase]] = {
    "cleanup": lambda ctx: CleanupPass(),
    "rotary-2d-cache": lambda ctx: Rotary2DCachePass(max_positions=ctx.max_positions),
    "gqa-native-attention": lambda ctx: GqaNativeAttentionPass(),
    "kv-cache-scatter": lambda ctx: KvCacheScatterPass(capacity=ctx.max_positions),
    "cast-fp16": lambda ctx: CastFp16Pass(),
    "residual-fp32": lambda ctx: ResidualFp32Pass(),
    "quantize-int4-rtn": lambda ctx, **o: QuantizeInt4RtnPass(**o),
    "quantize-int4-awq": lambda ctx, **o: QuantizeInt4AwqPass(ctx.activations, **o),
    "quantize-int8-wo": lambda ctx, **o: QuantizeInt8WoPass(**o),
    "quantize-fp8-wo": lambda ctx, **o: QuantizeFp8WoPass(**o),
    "attention-plugin": lambda ctx, **o: AttentionPluginPass(window=ctx.sliding_window, **o),
    "attention-plugin-fp8kv": lambda ctx, **o: AttentionPluginPass(kv_dtype="float8e4m3fn",
                                                                   window=ctx.sliding_window, **o),
}

# Passes that need calibration activations (the driver runs the calibrate stage for them).
NEEDS_CALIBRATION = frozenset({"quantize-int4-awq"})

# Passes whose output has custom-domain nodes: only a TensorRT with plugin layers can build it.
NEEDS_PLUGINS = frozenset({"attention-plugin", "attention-plugin-fp8kv"})


def needs_plugins(passes) -> bool:
    return any(name in NEEDS_PLUGINS for name in passes)


def make_pass(name: str, ctx: PassContext, options: Mapping[str, Any] | None = None) -> ir.passes.PassBase:
    """Instantiate a registered pass; a bad option raises TypeError/ValueError naming the pass."""
    try:
        factory = REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(REGISTRY)}") from None
    try:
        return factory(ctx, **dict(options or {}))
    except TypeError as exc:
        raise TypeError(f"pass {name!r}: bad option ({exc})") from None
