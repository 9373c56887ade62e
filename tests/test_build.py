"""The backend adapter and the build stage: capability checks, profiles, parser errors that name the node."""

import onnx
import onnx.helper as h
import pytest
from onnx import TensorProto as TP

from compiler.engine.backend import get_backend
from compiler.engine.engine_build import build_engine, profile_shapes
from compiler.errors import BackendBuildError
from compiler.frontend.export import BATCH, PAST, SEQ, TOTAL
from compiler.engine.engine_build import BuildOptions


def _save(tmp_path, nodes, inputs, outputs, opset=23, extra_opsets=()):
    model = h.make_model(h.make_graph(nodes, "g", inputs, outputs),
                         opset_imports=[h.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 10
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def test_adapter_prefers_tensorrt_then_rtx():
    backend = get_backend()
    try:
        import tensorrt  # noqa: F401

        full = hasattr(tensorrt, "Builder")
    except ImportError:
        full = False
    assert backend.name == ("tensorrt" if full else "tensorrt_rtx")
    assert backend.version[0].isdigit()


def test_forced_backend_env(monkeypatch):
    monkeypatch.setenv("LLMC_BACKEND", "nonsense")
    with pytest.raises(BackendBuildError, match="not one of"):
        get_backend()


def test_profile_covers_prefill_and_decode():
    opts = BuildOptions(max_batch=8, max_seq=2048)
    mn, opt, mx = profile_shapes([BATCH, 2, PAST, 64], opts)
    assert mn == (1, 2, 0, 64) and mx == (8, 2, 2047, 64)
    mn, opt, mx = profile_shapes([BATCH, SEQ], opts)
    assert mn == (1, 1) and mx == (8, 2048) and opt == (8, 1)
    assert profile_shapes([BATCH, TOTAL], opts)[2] == (8, 2048)
    with pytest.raises(BackendBuildError, match="mystery"):
        profile_shapes(["mystery"], opts)


def test_plugin_node_fails_cleanly_before_parsing_when_backend_has_no_plugins(tmp_path):
    backend = get_backend()
    if backend.supports_plugins:
        pytest.skip(f"{backend.name} supports plugins: the pre-parse refusal does not apply")
    x = h.make_tensor_value_info("x", TP.FLOAT16, [1, 4])
    y = h.make_tensor_value_info("y", TP.FLOAT16, [1, 4])
    path = _save(tmp_path, [h.make_node("PagedAttention", ["x"], ["y"], domain="llmc", name="attn0")], [x], [y],
                 extra_opsets=[h.make_opsetid("llmc", 1)])
    # TensorRT-RTX's parser would abort this process on the node; the adapter must refuse first.
    with pytest.raises(BackendBuildError, match=r"attn0 \(llmc::PagedAttention\).*install full TensorRT"):
        build_engine(path, tmp_path / "m.plan", BuildOptions(), backend)
    assert not (tmp_path / "m.plan").exists()


def test_parser_error_names_node_and_op(tmp_path):
    """Attention with present K/V outputs is rejected by the parser: the message must say where."""
    F16 = TP.FLOAT16
    vi = h.make_tensor_value_info
    inputs = [vi("q", F16, [1, 8, 4, 16]), vi("k", F16, [1, 2, 4, 16]), vi("v", F16, [1, 2, 4, 16]),
              vi("pk", F16, [1, 2, 3, 16]), vi("pv", F16, [1, 2, 3, 16])]
    outputs = [vi("y", F16, [1, 8, 4, 16]), vi("pk_out", F16, [1, 2, 7, 16]), vi("pv_out", F16, [1, 2, 7, 16])]
    node = h.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pk_out", "pv_out"], name="layer0_attn")
    path = _save(tmp_path, [node], inputs, outputs)
    with pytest.raises(BackendBuildError) as err:
        build_engine(path, tmp_path / "m.plan", BuildOptions(), get_backend())
    assert "layer0_attn" in str(err.value) and "Attention" in str(err.value)


def test_timing_cache_written_then_reused_where_supported(tmp_path):
    F16 = TP.FLOAT16
    vi = h.make_tensor_value_info
    path = _save(tmp_path, [h.make_node("Relu", ["x"], ["y"])], [vi("x", F16, [BATCH, 8])], [vi("y", F16, [BATCH, 8])])
    cache = tmp_path / "timing.cache"
    backend = get_backend()
    first = build_engine(path, tmp_path / "a.plan", BuildOptions(max_batch=2), backend, cache)
    if not backend.supports_timing_cache:
        assert first.timing_cache.startswith("not used") and not cache.exists()
        return
    assert first.timing_cache.startswith("created") and cache.stat().st_size > 0
    second = build_engine(path, tmp_path / "b.plan", BuildOptions(max_batch=2), get_backend(), cache)
    assert second.timing_cache.startswith("reused")
    assert [t.shape for t in second.tensors] == [(-1, 8), (-1, 8)]


def test_isolated_build_matches_in_process_and_returns_errors(tmp_path, trained_fp16):
    """The child-process build (used for >1 GiB models) gives the same engine I/O and layers, and
    a parser failure in the child reaches the parent as the same BackendBuildError."""
    from compiler.engine.engine_build import build_engine_isolated

    opts = BuildOptions(max_batch=1, max_seq=64)
    here = build_engine(trained_fp16, tmp_path / "a.plan", opts, get_backend())
    there = build_engine_isolated(trained_fp16, tmp_path / "b.plan", opts, get_backend())
    assert (tmp_path / "b.plan").stat().st_size > 0
    assert there.layer_types == here.layer_types and there.tensors == here.tensors
    # The child reports its own peak: at least the plan it wrote, far below a machine's memory.
    assert here.builder_peak_rss_bytes is None
    assert (tmp_path / "b.plan").stat().st_size < there.builder_peak_rss_bytes < 8 << 30


def test_isolated_build_reports_the_childs_peak_not_the_parents(tmp_path, trained_fp16):
    """A spawned child inherits its parent's ru_maxrss on Linux (the mark survives vfork + exec): a
    parent that once held 2 GiB must not make the builder child report 2 GiB."""
    from compiler.engine.engine_build import build_engine_isolated
    from compiler.host.memory import own_peak_rss_bytes

    if own_peak_rss_bytes() is None:
        pytest.skip("no /proc/self/status VmHWM on this platform")
    ballast = bytearray(2 << 30)
    ballast[::4096] = b"\1" * len(range(0, len(ballast), 4096))  # touch every page: resident
    del ballast
    parent_peak = own_peak_rss_bytes()
    assert parent_peak > 2 << 30
    there = build_engine_isolated(trained_fp16, tmp_path / "b.plan", BuildOptions(max_batch=1, max_seq=64), get_backend())
    assert (tmp_path / "b.plan").stat().st_size < there.builder_peak_rss_bytes < parent_peak - (1 << 30)

    F16 = TP.FLOAT16
    vi = h.make_tensor_value_info
    node = h.make_node("Attention", ["q", "k", "v", "", "pk", "pv"], ["y", "pk_out", "pv_out"], name="layer0_attn")
    path = _save(tmp_path, [node], [vi("q", F16, [1, 8, 4, 16]), vi("k", F16, [1, 2, 4, 16]),
                                    vi("v", F16, [1, 2, 4, 16]), vi("pk", F16, [1, 2, 3, 16]),
                                    vi("pv", F16, [1, 2, 3, 16])],
                 [vi("y", F16, [1, 8, 4, 16]), vi("pk_out", F16, [1, 2, 7, 16]), vi("pv_out", F16, [1, 2, 7, 16])])
    with pytest.raises(BackendBuildError, match="layer0_attn"):
        build_engine_isolated(path, tmp_path / "c.plan", BuildOptions(), get_backend())


class _NoStream:
    """A builder without build_serialized_network_to_stream: the fallback path of write_plan."""

    def __init__(self, builder):
        self._builder = builder

    def build_serialized_network(self, network, config):
        return self._builder.build_serialized_network(network, config)


def test_streamed_plan_is_the_serialized_plan(tmp_path, trained_fp16):
    """write_plan streams the plan to the file (no plan-sized host copy); it must be the same engine
    as the in-memory serialization, which is written through a memoryview.

    Not byte for byte: two TensorRT-RTX builds of this graph differ in a few hundred of their ~8M
    bytes run to run (519 measured), so the check is the size and that nearly every byte matches; a
    dropped, repeated or reordered chunk would change most of them. (The 1B plan, built both ways by
    hand, was byte-identical.)"""
    import numpy as np

    from compiler.engine import engine_build as build_module

    backend = get_backend()
    opts = BuildOptions(max_batch=1, max_seq=64)
    streamed = build_engine(trained_fp16, tmp_path / "streamed.plan", opts, backend)
    assert hasattr(backend.trt.Builder, "build_serialized_network_to_stream")  # so the test took the stream path

    real = build_module.write_plan
    seen = []

    def fallback(trt, builder, network, config, plan_path):
        seen.append(plan_path)
        return real(trt, _NoStream(builder), network, config, plan_path)

    build_module.write_plan = fallback
    try:
        buffered = build_engine(trained_fp16, tmp_path / "buffered.plan", opts, backend)
    finally:
        build_module.write_plan = real
    assert seen == [tmp_path / "buffered.plan"]
    a, b = (np.fromfile(p, np.uint8) for p in (streamed.plan_path, buffered.plan_path))
    assert a.size > 1_000_000 and a.size == b.size
    assert np.count_nonzero(a != b) < a.size // 1000
    assert streamed.layer_types == buffered.layer_types and streamed.tensors == buffered.tensors


def test_aliased_plugin_io_is_set_on_the_builder_config_only_with_plugin_layers(tmp_path):
    """getAliasedInput has an effect only with PreviewFeature.ALIASED_PLUGIN_IO_10_03 on (NvInferRuntime.h):
    set on a real builder config of the installed TensorRT(-RTX) when the network has plugin layers."""
    from types import SimpleNamespace

    from compiler.engine.engine_build import enable_aliased_plugin_io, plugin_layer_count
    from compiler.engine.trt_logger import process_logger

    trt = get_backend().trt
    feature = trt.PreviewFeature.ALIASED_PLUGIN_IO_10_03
    builder = trt.Builder(process_logger(trt))  # a temporary logger would dangle in TensorRT (trt_logger.py)
    config = builder.create_builder_config()
    assert not enable_aliased_plugin_io(trt, config, 0) and not config.get_preview_feature(feature)
    assert enable_aliased_plugin_io(trt, config, 2) and config.get_preview_feature(feature)
    # a TensorRT without the feature (older than 10.3): nothing to set, no error
    assert not enable_aliased_plugin_io(SimpleNamespace(PreviewFeature=SimpleNamespace()), config, 2)

    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    x = network.add_input("x", trt.float16, (1, 4))
    network.mark_output(network.add_activation(x, trt.ActivationType.RELU).get_output(0))
    assert plugin_layer_count(trt, network) == 0


def test_native_cache_graph_needs_tensorrt_with_kv_cache_update(tmp_path):
    """KVCacheUpdate (what TensorScatter parses to) appears in TensorRT 10.15: an older one is named before parsing."""
    import dataclasses

    from compiler.engine.engine_build import native_cache_updates

    F16, vi = TP.FLOAT16, h.make_tensor_value_info
    node = h.make_node("TensorScatter", ["cache", "new", "idx"], ["out"], axis=2, name="layer0_k_scatter")
    path = _save(tmp_path, [node], [vi("cache", F16, [1, 2, 8, 4]), vi("new", F16, [1, 2, 1, 4]),
                                    vi("idx", TP.INT64, [1])], [vi("out", F16, [1, 2, 8, 4])], opset=24)
    assert native_cache_updates(path) == ["layer0_k_scatter"]
    backend = get_backend()
    assert backend.supports_kv_cache_update  # the installed one has the layer (TensorRT-RTX 1.7 / TensorRT >= 10.15)
    old = dataclasses.replace(backend, name="tensorrt", version="10.14.1.48")  # same API, an older release label
    assert not old.supports_kv_cache_update
    with pytest.raises(BackendBuildError, match=r"layer0_k_scatter.*appears in TensorRT 10\.15; tensorrt 10\.14\.1\.48"):
        build_engine(path, tmp_path / "m.plan", BuildOptions(), old)
    assert not (tmp_path / "m.plan").exists()
    assert dataclasses.replace(backend, name="tensorrt", version="10.15.0.1").supports_kv_cache_update


def test_every_builder_gets_the_one_process_logger():
    """TensorRT keeps the first logger it is given for the process (compiler/engine/trt_logger.py): a
    per-build logger, freed after its build, hung the next Builder of the process for good."""
    import gc

    from compiler.engine.trt_logger import process_logger

    trt = get_backend().trt
    first = process_logger(trt)
    del first
    gc.collect()
    assert process_logger(trt) is process_logger(trt)
    for _ in range(3):  # Builders made and dropped one after another in one process
        builder = trt.Builder(process_logger(trt))
        assert builder.create_builder_config() is not None
        del builder
        gc.collect()
