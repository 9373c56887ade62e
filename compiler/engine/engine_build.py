"""The engine build (the build stage): parse the final ONNX with TensorRT(-RTX) and serialize an engine.

One optimization profile spans prefill and decode (sequence 1..max_seq, past 0..max_seq-1);
the timing cache is reused across builds; parser errors name the ONNX node and op.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from pathlib import Path

import onnx

from compiler.engine.backend import Backend
from compiler.engine.trt_logger import process_logger
from compiler.errors import BackendBuildError
from compiler.graph_io import BATCH, LOGITS_AT_DIM, PAST, SEQ, TOTAL, TensorInfo


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Engine shape limits: one optimization profile covers prefill and decode."""

    max_batch: int = 1
    max_seq: int = 256

    def __post_init__(self) -> None:
        from compiler.errors import BadInputError

        if self.max_batch < 1:
            raise BadInputError(f"--max-batch must be >= 1 (got {self.max_batch})")
        if self.max_seq < 2:
            raise BadInputError(f"--max-seq must be >= 2 (got {self.max_seq})")


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

STANDARD_DOMAINS = ("", "ai.onnx")


def custom_domain_nodes(onnx_path: Path) -> list[str]:
    """Nodes that need plugins; checked before parsing because TensorRT-RTX aborts on them."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return [f"{n.name or '?'} ({n.domain}::{n.op_type})" for n in proto.graph.node if n.domain not in STANDARD_DOMAINS]


def native_cache_updates(onnx_path: Path) -> list[str]:
    """Standard-domain TensorScatter nodes: the parser maps them to KVCacheUpdate (passes/kv_cache_scatter.py)."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    return [n.name or "?" for n in proto.graph.node if n.op_type == "TensorScatter" and n.domain in STANDARD_DOMAINS]


_PLUGIN_LAYERS = ("PLUGIN", "PLUGIN_V2", "PLUGIN_V3")


def plugin_layer_count(trt, network) -> int:
    kinds = {getattr(trt.LayerType, k) for k in _PLUGIN_LAYERS if hasattr(trt.LayerType, k)}
    return sum(network.get_layer(i).type in kinds for i in range(network.num_layers))


def enable_aliased_plugin_io(trt, config, plugin_layers: int) -> bool:
    """Turn on PreviewFeature.ALIASED_PLUGIN_IO_10_03 when the network has plugin layers and this TensorRT has it.

    Why: a plugin's `getAliasedInput` (llmc's `past_key.aliased()` outputs: the cache updated in place)
    "will only be called and have an effect when PreviewFeature::kALIASED_PLUGIN_IO_10_03 is turned on"
    (NVIDIA/TensorRT include/NvInferRuntime.h:1201 at a892d22); NVIDIA's aliased_io_plugin sample sets it
    (samples/python/aliased_io_plugin/aliased_io_plugin.py:432). Returns whether it was set."""
    feature = getattr(getattr(trt, "PreviewFeature", None), "ALIASED_PLUGIN_IO_10_03", None)
    if feature is None or plugin_layers == 0:
        return False
    config.set_preview_feature(feature, True)
    return True


NUM_BLOCKS = "num_blocks"  # a paged graph's pool dim (passes/attention_plugin.py)


def profile_shapes(dims, options: BuildOptions) -> tuple[tuple, tuple, tuple]:
    """(min, opt, max) for one input; opt is a decode step at half the context (what serving runs most).

    A paged pool [num_blocks, Hkv, block_size, D] spans 1 block up to max_batch sequences at max_seq each
    (what the executors allocate: batch x max_blocks, compiler/runtime/executor.py)."""
    b, s = options.max_batch, options.max_seq
    table = {
        BATCH: (1, b, b),
        SEQ: (1, 1, s),
        PAST: (0, s // 2, s - 1),
        TOTAL: (1, s // 2 + 1, s),
        LOGITS_AT_DIM: (1, 1, s),  # positions whose logits a step returns: serving asks for 1, validation for all
    }
    if NUM_BLOCKS in dims and len(dims) == 4 and isinstance(dims[2], int) and dims[2] > 0:
        blocks = b * -(-s // dims[2])
        table[NUM_BLOCKS] = (1, blocks, blocks)
    mins, opts, maxs = [], [], []
    for d in dims:
        if isinstance(d, int) and d >= 0:
            mins.append(d), opts.append(d), maxs.append(d)
        elif d in table:
            lo, mid, hi = table[d]
            mins.append(lo), opts.append(mid), maxs.append(hi)
        else:
            raise BackendBuildError(f"graph input has a dynamic dim {d!r} llmc has no profile rule for")
    return tuple(mins), tuple(opts), tuple(maxs)


def _input_dims(onnx_path: Path) -> dict[str, list]:
    proto = onnx.load(str(onnx_path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    out = {}
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        out[vi.name] = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in vi.type.tensor_type.shape.dim]
    return out


def _np_dtype(trt, dtype) -> str:
    names = {
        trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int8: "int8",
        trt.int32: "int32", trt.int64: "int64", trt.bool: "bool", trt.uint8: "uint8",
        trt.fp8: "float8e4m3fn",  # ONNX's name, as the fp8kv cache is declared in model.onnx
    }
    return names.get(dtype, str(dtype).split(".")[-1].lower())


def write_plan(trt, builder, network, config, plan_path: Path) -> bool:
    """Build and write the plan without a host copy of it where the backend allows.

    Why: a plan is as big as the weights (2.5 GB at 1B FP16). `build_serialized_network` returns it
    in host memory, and `bytes()` of that copied it again: two plan-sized buffers beside the parsed
    weights. `build_serialized_network_to_stream` (TensorRT 10.x, TensorRT-RTX) hands it to us in
    chunks, written straight to the file; the same bytes (checked on the 1B plan). Otherwise the
    buffer is written through a memoryview, not copied."""
    if hasattr(builder, "build_serialized_network_to_stream"):
        with open(plan_path, "wb") as fh:
            ok = builder.build_serialized_network_to_stream(network, config, _file_writer(trt, fh))
        if not ok:
            plan_path.unlink(missing_ok=True)
        return bool(ok)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        return False
    with open(plan_path, "wb") as fh:
        fh.write(memoryview(engine))
    return True


def _file_writer(trt, fh):
    """An IStreamWriter that appends each chunk to an open file (the class needs the backend module)."""

    class FileWriter(trt.IStreamWriter):
        def __init__(self):
            trt.IStreamWriter.__init__(self)

        def write(self, data) -> int:
            return fh.write(data)

    return FileWriter()


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    options: BuildOptions,
    backend: Backend,
    timing_cache_path: Path | None = None,
) -> EngineArtifact:
    """Parse, build and write `plan_path`; raise BackendBuildError naming the node/op on failure."""
    trt = backend.trt
    start = time.perf_counter()
    _require_features(onnx_path, backend)
    logger = process_logger(trt)  # one per process (trt_logger.py); its messages are this build's
    logger.messages.clear()
    builder = trt.Builder(logger)
    network, _parser = _parse(trt, builder, logger, onnx_path, backend)
    config = builder.create_builder_config()
    enable_aliased_plugin_io(trt, config, plugin_layer_count(trt, network))
    config.add_optimization_profile(_profile(builder, network, _input_dims(onnx_path), options))
    timing = _TimingCache(timing_cache_path, backend)
    timing.load(config)
    if not write_plan(trt, builder, network, config, plan_path):
        raise BackendBuildError(f"{backend.name} failed to build the engine: " + " | ".join(logger.messages[-5:]))
    timing.save(config)
    layer_types = collections.Counter(str(network.get_layer(i).type).split(".")[-1] for i in range(network.num_layers))
    return EngineArtifact(
        plan_path=plan_path,
        onnx_path=onnx_path,
        backend=backend.name,
        backend_version=backend.version,
        tensors=_network_tensors(trt, network),
        layer_types=dict(sorted(layer_types.items())),
        seconds=time.perf_counter() - start,
        timing_cache=timing.note,
    )


def _require_features(onnx_path: Path, backend: Backend) -> None:
    """Fail before parsing when the graph needs what the backend lacks (TensorRT-RTX's parser aborts the
    process on a custom-domain node); register llmc's plugin when the graph has its nodes."""
    custom = custom_domain_nodes(onnx_path)
    if custom:
        backend.require_plugins(f"custom-domain nodes {', '.join(custom[:3])}")
        from plugins.trt_plugin import register  # the parser maps llmc::PagedAttention to this AOT plugin

        register()
    scatters = native_cache_updates(onnx_path)
    if scatters:
        backend.require_kv_cache_update(
            f"the native KV cache ({len(scatters)} TensorScatter nodes, e.g. {scatters[0]})")


def _parse(trt, builder, logger, onnx_path: Path, backend: Backend):
    """(network, parser) for the ONNX file; strongly typed, as TensorRT 11 keeps only strongly typed networks."""
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            errors.append(f"node {e.node_name() or e.node()!r} (op {e.node_operator() or '?'}): {e.desc()}")
        raise BackendBuildError(f"{backend.name} could not parse {onnx_path.name}: " + "; ".join(errors or logger.messages))
    return network, parser  # the parser owns the parsed weights: it must live until the plan is written


def _profile(builder, network, dims: dict, options: BuildOptions):
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in dims:
            raise BackendBuildError(f"network input {tensor.name} not found among the ONNX graph inputs")
        profile.set_shape(tensor.name, *profile_shapes(dims[tensor.name], options))
    return profile


class _TimingCache:
    """The builder's timing cache file: read before the build, written after (atomically), and a note
    for the report (TensorRT-RTX's timing-cache operations are no-ops)."""

    def __init__(self, path: Path | None, backend: Backend):
        self.path = path
        self.used = path is not None and backend.supports_timing_cache
        self.note = "none" if path is None or self.used else \
            f"not used: timing-cache operations are no-ops in {backend.name} {backend.version}"

    def load(self, config) -> None:
        if self.used:
            blob = self.path.read_bytes() if self.path.is_file() else b""
            config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=True)
            self.note = f"reused {self.path}" if blob else f"created {self.path}"

    def save(self, config) -> None:
        if self.used:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
            tmp.replace(self.path)


def _network_tensors(trt, network) -> list[TensorInfo]:
    tensors = []
    for getter, count, is_input in ((network.get_input, network.num_inputs, True),
                                    (network.get_output, network.num_outputs, False)):
        for i in range(count):
            t = getter(i)
            tensors.append(TensorInfo(t.name, _np_dtype(trt, t.dtype), tuple(int(d) for d in t.shape), is_input))
    return tensors


def build_engine_isolated(
    onnx_path: Path,
    plan_path: Path,
    options: BuildOptions,
    backend: Backend,
    timing_cache_path: Path | None = None,
) -> EngineArtifact:
    """build_engine in a spawned child process, for models whose weights are over 256 MiB (external data).

    Why: the builder's working memory (parsed weights, tactics, the serialized plan: ~3x the FP16
    weights on a 1B model) stays in the parent's heap after the build returns, under the stages
    that follow; a child gives it all back to the OS when it exits. A builder that aborts the
    process (TensorRT-RTX's parser does on some nodes) or is killed for memory becomes a
    BackendBuildError instead of taking llmc down with it. Interrupting the parent kills the child.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_build_in_child, args=(send, onnx_path, plan_path, options, backend.name,
                                                      timing_cache_path), name="llmc-trt-build")
    child.start()
    send.close()
    try:
        ok, payload = receive.recv()
    except EOFError:
        child.join()
        raise BackendBuildError(
            f"the {backend.name} builder process died building {onnx_path.name} (exit code {child.exitcode}: "
            "a crash, or killed for memory); rerun with a smaller --max-batch / --max-seq or on a larger machine"
        ) from None
    except BaseException:  # Ctrl-C / SIGTERM in the parent: the build is abandoned
        child.kill()
        child.join()
        raise
    child.join(timeout=60)
    if child.is_alive():
        child.kill()
        child.join()
    if not ok:
        raise payload
    return payload


def _build_in_child(conn, onnx_path, plan_path, options, backend_name, timing_cache_path) -> None:
    import dataclasses

    from compiler.engine.backend import _load
    from compiler.host.memory import own_peak_rss_bytes

    try:
        engine = build_engine(onnx_path, plan_path, options, _load(backend_name), timing_cache_path)
        conn.send((True, dataclasses.replace(engine, builder_peak_rss_bytes=own_peak_rss_bytes())))
    except Exception as exc:  # noqa: BLE001 - sent to the parent, which raises it
        conn.send((False, exc if isinstance(exc, BackendBuildError) else BackendBuildError(f"{type(exc).__name__}: {exc}")))
    finally:
        conn.close()
