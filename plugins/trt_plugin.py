"""`llmc::PagedAttention` for full TensorRT: an ahead-of-time (AOT) Python plugin embedding the Triton kernel.

Why AOT: the plugin's kernel is compiled to PTX at engine-build time and serialized into the
engine, so the engine runs where no Python exists (trtexec, Triton Inference Server's TensorRT
backend). TensorRT's ONNX parser maps the pass's node to this plugin because the node's op type is
the plugin name and it carries `plugin_namespace="llmc"` and `aot=1` (passes/attention_plugin.py).

What the three registered callbacks say:
- shape/type inference (`register`): attention has the query's shape and dtype; present_key and
  present_value are *aliases* of past_key / past_value (in-place cache update, like TensorRT's own
  KV_CACHE_UPDATE: the runtime binds one buffer for both);
- formats (`autotune`): linear row-major everywhere; the cache is FP16 or FP8-E4M3 (both caches
  alike), position_ids INT64, scales FP32, the rest FP16;
- implementation (`aot_impl`): compiles `_plugin_kernel_trt` (plugins/attention_kernel.py: cache
  write + causal/windowed GQA attention in one race-free launch) with the node's scale and window
  as compile-time constants; grid (ceil(S / 16), Hq, B) as symbolic shape expressions; the
  sequence length and cache capacity as the extra int32 arguments.
Serialization is TensorRT's: the attributes and the PTX go into the engine.

The paged node (`llmc::PagedAttentionBlockTable`, attention-plugin with `paged: true`) is a second
plugin: a TensorRT plugin's input list is fixed, and this one has a ninth input, block_tables
[B, max_blocks] INT32. Its caches are block pools [num_blocks, Hkv, block_size, D] (present aliases
past, as above); the kernel is `_plugin_kernel_trt_paged` with the block size (the pool's static
dim 2) as a compile-time constant and the table's width as its CAP argument.

Everything is imported lazily: this module imports on machines without TensorRT (CI, TensorRT-RTX,
which has no plugin layers at all) and `unavailable_reason()` says why it cannot register there.
Static dims (head counts, head size, block size) are read through `tensorrt.plugin`'s ShapeExpr API:
`is_constant` is a property and `constant_value()` a method that raises on a symbolic dim
(NVIDIA/TensorRT python/packaging/bindings_wheel/tensorrt/plugin/_tensor.py, ShapeExpr, lines 291-314
at a892d22); read as an attribute it is a bound method, not a number.

The Triton-language version is checked against the one NVIDIA's AOT plugin sample pins for the
installed TensorRT (samples/python/quickly_deployable_plugins/requirements.txt: triton==3.2.0 from
TensorRT 10.10 through 10.15, triton==3.5.0 from 10.16): Triton >= 3.3 appends scratch-pointer
parameters to compiled kernels, and only the launcher of a TensorRT of that generation knows them.
Known limit, not checked on a real TensorRT here: decode runs this one-launch kernel, not the
split-K decode kernel (a QDP AOT plugin launches one kernel and has no workspace for the split partials).
"""

from __future__ import annotations

import re
from typing import Any

PLUGIN_NAMESPACE = "llmc"
PLUGIN_NAME = "PagedAttention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PAGED_PLUGIN_NAME = "PagedAttentionBlockTable"  # passes/attention_plugin.PAGED_OP
PAGED_PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PAGED_PLUGIN_NAME}"
BLOCK_M, BLOCK_N, NUM_WARPS = 16, 64, 4
_registered = False


def unavailable_reason() -> str | None:
    """None when the plugin can be registered here, else why not."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        return f"full TensorRT is not installed ({exc}); TensorRT-RTX has no plugin layers"
    if not hasattr(getattr(trt, "INetworkDefinition", None), "add_plugin_v3"):
        return f"tensorrt {getattr(trt, '__version__', '?')} has no plugin layers (a stub or RTX build)"
    try:
        import tensorrt.plugin as trtp
    except ImportError as exc:
        return f"tensorrt.plugin is missing ({exc}); AOT plugins need TensorRT >= 10.9"
    if not hasattr(trtp, "aot_impl"):
        return "this tensorrt.plugin has no aot_impl; AOT plugins need TensorRT >= 10.9"
    try:
        import triton
    except ImportError as exc:
        return f"triton is not installed ({exc}): it compiles the kernel the plugin embeds"
    return triton_version_problem(str(getattr(trt, "__version__", "0")), str(triton.__version__))


# TensorRT release from which NVIDIA's AOT plugin sample pins this Triton (major, minor): newest first.
# samples/python/quickly_deployable_plugins/requirements.txt at the 10.10, 10.13.3, 10.14, 10.15 (triton==3.2.0)
# and 10.16, 11.0, 11.1 (triton==3.5.0) OSS releases of NVIDIA/TensorRT.
TRITON_PINS = (((10, 16), (3, 5)), ((10, 10), (3, 2)))


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def pinned_triton(trt_version: str) -> tuple[int, int] | None:
    """The Triton (major, minor) NVIDIA pins for AOT plugins on this TensorRT; None before 10.10 (no pin)."""
    release = _release(trt_version)
    return next((triton for first, triton in TRITON_PINS if release >= first), None)


def triton_version_problem(trt_version: str, triton_version: str) -> str | None:
    """Why this Triton cannot compile kernels for this TensorRT's AOT launcher, or None."""
    pin = pinned_triton(trt_version)
    if pin is None or _release(triton_version) == pin:
        return None
    want = ".".join(map(str, pin))
    return (f"triton {triton_version} is installed but AOT plugins on tensorrt {trt_version} take kernels from "
            f"triton {want} (the version NVIDIA's AOT plugin sample pins for it; kernel parameters differ between "
            f"Triton releases): pip install 'triton=={want}.*'")


def register() -> None:
    """Register llmc::PagedAttention and llmc::PagedAttentionBlockTable with TensorRT's plugin registry (once)."""
    global _registered
    if _registered:
        return
    reason = unavailable_reason()
    if reason:
        from compiler.errors import BackendBuildError

        raise BackendBuildError(f"cannot register the {PLUGIN_ID} plugin: {reason}")
    _define()
    _registered = True


def triton_signature(fp8: bool, paged: bool = False) -> dict[str, str]:
    """Pointer and scalar types of `_plugin_kernel_trt`'s (paged: `_plugin_kernel_trt_paged`'s) runtime arguments,
    in order: the node's inputs, the extra int32s (CAP = the block table's width when paged), its outputs."""
    cache = "*fp8e4nv" if fp8 else "*fp16"
    inputs = {"Q": "*fp16", "Knew": "*fp16", "Vnew": "*fp16", "Kc": cache, "Vc": cache, "Pos": "*i64",
              "KScale": "*fp32", "VScale": "*fp32", **({"BT": "*i32"} if paged else {})}
    return {**inputs, "Q_LEN": "i32", "CAP": "i32", "Out": "*fp16", "KcOut": cache, "VcOut": cache}


def triton_constants(scale: float, window: int, q_heads: int, kv_heads: int, head_dim: int, fp8: bool,
                     page: int | None = None) -> dict[str, Any]:
    consts = {"QK_SCALE": float(scale), "WINDOW": int(window), "H_Q": q_heads, "H_KV": kv_heads, "D": head_dim,
              "BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "FP8": fp8, "HAS_WINDOW": window > 0}
    if page is not None:
        consts["PAGE"] = int(page)
    return consts


def compile_kernel(scale: float, window: int, q_heads: int, kv_heads: int, head_dim: int, fp8: bool, target=None,
                   page: int | None = None):
    """Triton AOT compile of the plugin kernel for one node configuration (page: the paged node's block size).

    target: a triton.backends.compiler.GPUTarget to compile without a GPU (e.g. GPUTarget("cuda", 90, 32));
    None = the current device.
    """
    import triton
    from triton.compiler import ASTSource

    from .attention_kernel import _plugin_kernel_trt, _plugin_kernel_trt_paged

    kernel = _plugin_kernel_trt if page is None else _plugin_kernel_trt_paged
    runtime = triton_signature(fp8, paged=page is not None)
    consts = triton_constants(scale, window, q_heads, kv_heads, head_dim, fp8, page)
    signature = {**runtime, **{name: "constexpr" for name in consts}}
    try:
        source = ASTSource(fn=kernel, signature=signature, constexprs=consts)
    except TypeError:  # Triton < 3.2 named them `constants`
        source = ASTSource(fn=kernel, signature=runtime, constants=consts)
    return triton.compile(source, target=target, options={"num_warps": NUM_WARPS, "num_stages": 2})


def static_dim(expr, what: str) -> int:
    """A dim the kernel compiles in as a constant. `tensorrt.plugin`'s ShapeExpr has `is_constant` as a property
    and `constant_value()` as a method that raises on a symbolic dim (_tensor.py, ShapeExpr)."""
    if not expr.is_constant:
        from compiler.errors import BackendBuildError

        raise BackendBuildError(f"{PLUGIN_ID}: {what} is dynamic in the graph but the kernel compiles it in; "
                                "export the model with a static one (it comes from the model's config)")
    return int(expr.constant_value())


def node_dims(query, past_key, paged: bool = False) -> dict[str, int]:
    """The node's compile-time dims from its TensorDescs: query [B, Hq, S, D], past_key [B|blocks, Hkv, C|page, D]."""
    dims = {"q_heads": static_dim(query.shape_expr[1], "the query head count"),
            "kv_heads": static_dim(past_key.shape_expr[1], "the KV head count"),
            "head_dim": static_dim(query.shape_expr[3], "the head size")}
    if paged:
        dims["page"] = static_dim(past_key.shape_expr[2], "the block size")
    return dims


def _launch(trtp, query, compiled):
    """Grid (ceil(S / BLOCK_M), Hq, B) and block of the plugin kernel, as TensorRT symbolic expressions."""
    launch = trtp.KernelLaunchParams()
    launch.grid_x = trtp.cdiv(query.shape_expr[2], BLOCK_M)
    launch.grid_y = query.shape_expr[1]
    launch.grid_z = query.shape_expr[0]
    launch.block_x = compiled.metadata.num_warps * 32
    launch.shared_mem = compiled.metadata.shared
    return launch


def _define() -> None:
    from typing import List, Tuple, Union

    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(PLUGIN_ID)
    def paged_attention_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                             past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, position_ids: trtp.TensorDesc,
                             k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc, scale: float,
                             window: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return query.like(), past_key.aliased(), past_value.aliased()

    @trtp.autotune(PLUGIN_ID)
    def paged_attention_formats(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                                past_key: trtp.TensorDesc, past_value: trtp.TensorDesc,
                                position_ids: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                                scale: float, window: int,
                                outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        # positions: 8 inputs then 3 outputs; "A|B" options are taken index-wise (both caches FP16, or both FP8)
        return [trtp.AutoTuneCombination(
            "FP16, FP16, FP16, FP16|FP8, FP16|FP8, INT64, FP32, FP32, FP16, FP16|FP8, FP16|FP8", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def paged_attention_aot(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                            past_key: trtp.TensorDesc, past_value: trtp.TensorDesc, position_ids: trtp.TensorDesc,
                            k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc, scale: float, window: int,
                            outputs: Tuple[trtp.TensorDesc], tactic: int,
                            ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        fp8 = past_key.dtype == trt.fp8
        compiled = compile_kernel(scale, window, fp8=fp8, **node_dims(query, past_key))
        extra = trtp.SymIntExprs(2)
        extra[0] = trtp.SymInt32(query.shape_expr[2])  # Q_LEN
        extra[1] = trtp.SymInt32(past_key.shape_expr[2])  # CAP
        return compiled.metadata.name, compiled.asm["ptx"], _launch(trtp, query, compiled), extra

    # --- the paged node: pools [num_blocks, Hkv, block_size, D] + block_tables [B, max_blocks] INT32 ---------------

    @trtp.register(PAGED_PLUGIN_ID)
    def paged_attention_bt_desc(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                                past_key: trtp.TensorDesc, past_value: trtp.TensorDesc,
                                position_ids: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                                block_tables: trtp.TensorDesc, scale: float,
                                window: int) -> Tuple[trtp.TensorDesc, trtp.TensorDesc, trtp.TensorDesc]:
        return query.like(), past_key.aliased(), past_value.aliased()  # the pools are updated in place

    @trtp.autotune(PAGED_PLUGIN_ID)
    def paged_attention_bt_formats(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                                   past_key: trtp.TensorDesc, past_value: trtp.TensorDesc,
                                   position_ids: trtp.TensorDesc, k_scale: trtp.TensorDesc,
                                   v_scale: trtp.TensorDesc, block_tables: trtp.TensorDesc, scale: float, window: int,
                                   outputs: Tuple[trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        # 9 inputs (block_tables INT32 last) then 3 outputs
        return [trtp.AutoTuneCombination(
            "FP16, FP16, FP16, FP16|FP8, FP16|FP8, INT64, FP32, FP32, INT32, FP16, FP16|FP8, FP16|FP8", "LINEAR")]

    @trtp.aot_impl(PAGED_PLUGIN_ID)
    def paged_attention_bt_aot(query: trtp.TensorDesc, key: trtp.TensorDesc, value: trtp.TensorDesc,
                               past_key: trtp.TensorDesc, past_value: trtp.TensorDesc,
                               position_ids: trtp.TensorDesc, k_scale: trtp.TensorDesc, v_scale: trtp.TensorDesc,
                               block_tables: trtp.TensorDesc, scale: float, window: int,
                               outputs: Tuple[trtp.TensorDesc], tactic: int,
                               ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        fp8 = past_key.dtype == trt.fp8
        compiled = compile_kernel(scale, window, fp8=fp8, **node_dims(query, past_key, paged=True))
        extra = trtp.SymIntExprs(2)
        extra[0] = trtp.SymInt32(query.shape_expr[2])  # Q_LEN
        extra[1] = trtp.SymInt32(block_tables.shape_expr[1])  # CAP = blocks per sequence (the table's row stride)
        return compiled.metadata.name, compiled.asm["ptx"], _launch(trtp, query, compiled), extra
