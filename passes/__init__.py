"""Graph passes, one per file; recipes name them, this registry maps names to classes.

The registry below is the only list of passes in llmc: to find where a rewrite happens, look up
its recipe name here and open the file.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import onnx_ir as ir

from .attention_plugin import AttentionPluginPass
from .cast_fp16 import CastFp16Pass
from .cleanup import CleanupPass
from .gqa_native_attention import GqaNativeAttentionPass
from .kv_cache_scatter import KvCacheScatterPass
from .quantize_int4_rtn import QuantizeInt4RtnPass
from .rotary_2d_cache import Rotary2DCachePass


@dataclasses.dataclass(frozen=True)
class PassContext:
    """Build facts some passes need (e.g. how many positions the rotary table must cover)."""

    max_positions: int
    int4_block_size: int = 128
    sliding_window: int = 0  # the model's attention window (0 = none); only plugin passes can honour it


REGISTRY: dict[str, Callable[[PassContext], ir.passes.PassBase]] = {
    "cleanup": lambda ctx: CleanupPass(),
    "rotary-2d-cache": lambda ctx: Rotary2DCachePass(max_positions=ctx.max_positions),
    "gqa-native-attention": lambda ctx: GqaNativeAttentionPass(),
    "kv-cache-scatter": lambda ctx: KvCacheScatterPass(capacity=ctx.max_positions),
    "cast-fp16": lambda ctx: CastFp16Pass(),
    "quantize-int4-rtn": lambda ctx: QuantizeInt4RtnPass(block_size=ctx.int4_block_size),
    "attention-plugin": lambda ctx, **o: AttentionPluginPass(window=ctx.sliding_window, **o),
    "attention-plugin-fp8kv": lambda ctx, **o: AttentionPluginPass(kv_dtype="float8e4m3fn",
                                                                   window=ctx.sliding_window, **o),
}

# Passes whose output has custom-domain nodes: only a TensorRT with plugin layers can build it.
NEEDS_PLUGINS = frozenset({"attention-plugin", "attention-plugin-fp8kv"})


def needs_plugins(passes) -> bool:
    return any(name in NEEDS_PLUGINS for name in passes)


def make_pass(name: str, ctx: PassContext) -> ir.passes.PassBase:
    try:
        return REGISTRY[name](ctx)
    except KeyError:
        raise KeyError(f"unknown pass {name!r}; known passes: {', '.join(REGISTRY)}") from None
