"""Stamped export (compiler/frontend/stamp.py): a 2-layer export cloned per layer must equal the full export.

The Llama (GQA) is exported twice at 6 layers (full, then stamped) and the two graphs compared;
Qwen2 (biases) and Mistral are stamped only and compared with PyTorch directly (a full export of each
costs ~45 s of CI for what the PyTorch comparison also proves). Norm weights and biases are perturbed
per layer first: random init makes them all ones / zeros, which would hide a stamped layer that
picked up another layer's (or the template's) weights.
"""

from __future__ import annotations

import time

import numpy as np
import onnx_ir as ir
import pytest

from tests.helpers import build_with_backend, feeds_with_past, op_counts, run_onnx, save

ARCHS = ("llama", "qwen2", "mistral", "qwen3")
FULL_ARCHS = ("llama",)  # compared against a full export; the others against PyTorch
LAYERS = 6


def _load_deep(root, arch: str, layers: int, seed: int):
    import torch

    from compiler.frontend.default_model import make_tiny_model
    from compiler.frontend.load import load_model

    loaded = load_model(make_tiny_model(root / f"{arch}-{layers}", arch, num_layers=layers, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loaded.model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return loaded


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deep")
    return {arch: _load_deep(root, arch, LAYERS, seed) for seed, arch in enumerate(ARCHS)}


@pytest.fixture(scope="module")
def exports(deep, tmp_path_factory):
    """arch -> {"full": (ExportedGraph, path), "stamp": (...)}; full first so stamp's time has no warm-up in it."""
    from compiler.frontend.export import export_onnx

    root = tmp_path_factory.mktemp("stamp-exports")
    done: dict[str, dict] = {}

    def get(arch: str) -> dict:
        if arch not in done:
            done[arch] = {}
            for method in ("full", "stamp") if arch in FULL_ARCHS else ("stamp",):
                graph = export_onnx(deep[arch], method=method)
                done[arch][method] = (graph, save(graph.model, root / f"{arch}-{method}.onnx"))
        return done[arch]

    return get


def _io(model: ir.Model):
    return ([(v.name, str(v.shape), v.dtype) for v in model.graph.inputs],
            [(v.name, str(v.shape), v.dtype) for v in model.graph.outputs])


@pytest.mark.parametrize("arch", FULL_ARCHS)
def test_stamped_graph_has_full_export_io_and_ops(exports, arch):
    full, stamp = exports(arch)["full"][0], exports(arch)["stamp"][0]
    assert stamp.model.graph.metadata_props["llmc.export"].startswith("stamp")
    assert "llmc.export" not in full.model.graph.metadata_props
    assert _io(stamp.model) == _io(full.model)
    assert len(stamp.model.graph.inputs) == 3 + 2 * LAYERS and stamp.io == full.io
    assert op_counts(stamp.model) == op_counts(full.model)
    # Passes change dtypes in place: no two values may share a type object (a shared one made
    # cast-fp16 relabel stamped FP32 weights as FP16 without converting them).
    values = [*stamp.model.graph.inputs, *stamp.model.graph.initializers.values(),
              *(o for n in stamp.model.graph for o in n.outputs)]
    typed = [id(v.type) for v in values if isinstance(v.type, ir.TensorType)]
    assert len(typed) == len(set(typed))
    print(f"{arch}: full export {full.seconds:.1f} s, stamped {stamp.seconds:.1f} s, "
          f"{sum(op_counts(stamp.model).values())} nodes")


@pytest.mark.parametrize("arch", FULL_ARCHS)
@pytest.mark.parametrize("past,seq", [(0, 5), (4, 2)])
def test_stamped_graph_matches_full_export_numerically(exports, deep, arch, past, seq):
    full, stamp = exports(arch)["full"], exports(arch)["stamp"]
    feeds = feeds_with_past(full[0].io, np.float32, batch=2, seq=seq, past=past, seed=past)
    want, got = run_onnx(full[1], feeds), run_onnx(stamp[1], feeds)
    assert sorted(got) == sorted(want) == sorted(full[0].io.output_names)
    for name in want:
        assert got[name].shape == want[name].shape
        np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=0, err_msg=name)


def _matmul_modules(model: ir.Model) -> dict[bytes, str]:
    """weight bytes -> module_name of the MatMul that multiplies by it (weights identify the same MatMul across graphs)."""
    from passes.weight_quant import module_name

    out = {}
    for node in model.graph:
        if node.op_type == "MatMul" and node.inputs[1] is not None and node.inputs[1].const_value is not None:
            key = node.inputs[1].const_value.numpy().tobytes()
            assert key not in out, "two MatMuls share a weight: the comparison would be ambiguous"
            out[key] = module_name(node)
    return out


@pytest.mark.parametrize("arch", FULL_ARCHS)
def test_stamped_matmuls_keep_their_module_names(exports, arch):
    full = _matmul_modules(exports(arch)["full"][0].model)
    stamp = _matmul_modules(exports(arch)["stamp"][0].model)
    assert len(full) == 7 * LAYERS + 1  # q k v o gate up down per layer + lm_head
    assert stamp == full
    assert f"model.layers.{LAYERS - 1}.mlp.down_proj" in stamp.values()


def _pytorch(loaded, feeds, layers: int):
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    for i in range(layers):
        cache.update(torch.from_numpy(feeds[f"past_key_values.{i}.key"]),
                     torch.from_numpy(feeds[f"past_key_values.{i}.value"]), i)
    with torch.no_grad():
        return loaded.model(input_ids=torch.from_numpy(feeds["input_ids"]),
                            attention_mask=torch.from_numpy(feeds["attention_mask"]),
                            position_ids=torch.from_numpy(feeds["position_ids"]), cache=cache, use_cache=True)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a == "mistral" else a
                                  for a in ARCHS if a not in FULL_ARCHS])  # Mistral: Llama's layer, minus GQA tweaks
def test_stamped_graph_matches_pytorch(exports, deep, arch):
    """Qwen2 / Mistral: every logit and present of the stamped graph against the HF model, and the
    module names its MatMuls carry (what quantization selects by) are exactly the model's Linear layers."""
    import torch

    from passes.weight_quant import module_name

    stamp, path = exports(arch)["stamp"]
    assert stamp.model.graph.metadata_props["llmc.export"].startswith("stamp")
    feeds = feeds_with_past(stamp.io, np.float32, batch=2, seq=3, past=4, seed=1)
    got, want = run_onnx(path, feeds), _pytorch(deep[arch], feeds, LAYERS)
    np.testing.assert_allclose(got["logits"], want.logits.numpy(), atol=1e-4, rtol=0)
    for i in range(LAYERS):
        np.testing.assert_allclose(got[f"present.{i}.key"], want.past_key_values.layers[i].keys.numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(got[f"present.{i}.value"], want.past_key_values.layers[i].values.numpy(), atol=1e-4,
                                   rtol=0)
    linears = {n for n, m in deep[arch].model.named_modules() if isinstance(m, torch.nn.Linear)}
    names = [module_name(n) for n in stamp.model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None]
    assert sorted(names) == sorted(linears)


def test_stamped_fp16_graph_builds_with_backend(exports, tmp_path):
    """The fp16 recipe's passes rewrite the stamped graph, and TensorRT(-RTX) parses and builds it."""
    from compiler.frontend.run_passes import run_passes
    from compiler.recipe import load_recipe
    from passes import PassContext

    from compiler.graph_io import ExportedGraph

    capacity = 128
    stamped, path = exports("llama")["stamp"]
    source = ExportedGraph(ir.load(path), stamped.io)  # passes rewrite in place: leave the fixture's graph alone
    graph, _ = run_passes(source, load_recipe("fp16"), PassContext(max_positions=capacity))
    engine = build_with_backend(save(graph.model, tmp_path / "stamped-fp16.onnx"), tmp_path, max_seq=capacity)
    assert engine.plan_path.is_file() and engine.plan_path.stat().st_size > 0
    assert sum(1 for t in engine.tensors if t.name.startswith("present.")) == 2 * LAYERS
    assert engine.layer_types


@pytest.mark.slow  # a 24-layer export (~1 min); NOTES.md records the measurement
def test_stamp_export_time_flat_in_depth(exports, tmp_path_factory):
    """24 stamped layers cost about what 6 do: the exporter only ever sees 2. Also checked against PyTorch."""
    from compiler.frontend.export import export_onnx

    full6, stamp6 = exports("llama")["full"][0].seconds, exports("llama")["stamp"][0].seconds
    loaded = _load_deep(tmp_path_factory.mktemp("deep24"), "llama", 24, seed=7)
    start = time.perf_counter()
    graph = export_onnx(loaded, method="stamp")
    stamp24 = time.perf_counter() - start
    print(f"export seconds: full 6 layers {full6:.1f}, stamp 6 layers {stamp6:.1f}, stamp 24 layers {stamp24:.1f}")
    assert stamp24 < 2 * stamp6, (stamp24, stamp6)

    path = save(graph.model, tmp_path_factory.mktemp("deep24-onnx") / "m.onnx")
    feeds = feeds_with_past(graph.io, np.float32, batch=2, seq=3, past=4)
    got = run_onnx(path, feeds)
    out = _pytorch(loaded, feeds, 24)
    np.testing.assert_allclose(got["logits"], out.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["present.23.value"], out.past_key_values.layers[23].values.numpy(), atol=1e-4, rtol=0)


# --- when auto stamps -------------------------------------------------------------------------------

def _tiny_hf(arch: str, layers: int, **extra):
    import transformers

    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config}[arch]
    config = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=64, **extra)
    return transformers.AutoModelForCausalLM.from_config(config)


def test_heterogeneous_layers_are_detected():
    from compiler.frontend.stamp import heterogeneity

    assert heterogeneity(_tiny_hf("llama", 6), 6) is None
    mixed = _tiny_hf("qwen2", 6, use_sliding_window=True, sliding_window=16, max_window_layers=3)
    assert len(set(mixed.config.layer_types)) == 2
    assert "differ" in heterogeneity(mixed, 6)
    assert "expected one decoder layer list" in heterogeneity(_tiny_hf("llama", 6), 5)


def test_auto_stamps_only_deep_homogeneous_models(monkeypatch, deep, llama):
    """auto: > 4 layers and homogeneous -> stamp; shallow -> full; a failing stamp falls back to full."""
    import dataclasses

    import compiler.frontend.export as export
    from compiler.errors import UnsupportedModelError
    from compiler.frontend.stamp import StampError

    calls = []
    monkeypatch.setattr(export, "_export_full", lambda loaded, verbose: calls.append("full"))
    monkeypatch.setattr(export, "_export_stamped", lambda loaded, verbose: calls.append("stamp"))
    export.export_onnx(deep["qwen2"])
    export.export_onnx(llama)  # the session's 2-layer model
    export.export_onnx(deep["llama"], method="full")
    assert calls == ["stamp", "full", "full"]

    mixed = dataclasses.replace(deep["llama"], model=_tiny_hf("qwen2", 6, use_sliding_window=True,
                                                               sliding_window=16, max_window_layers=3))
    export.export_onnx(mixed)
    assert calls[-1] == "full"
    with pytest.raises(UnsupportedModelError, match="cannot stamp"):
        export.export_onnx(mixed, method="stamp")

    def broken(loaded, verbose):
        raise StampError("template not found")

    monkeypatch.setattr(export, "_export_stamped", broken)
    export.export_onnx(deep["mistral"])
    assert calls[-1] == "full"
    with pytest.raises(UnsupportedModelError, match="template not found"):
        export.export_onnx(deep["mistral"], method="stamp")
    with pytest.raises(ValueError, match="not one of"):
        export.export_onnx(llama, method="quick")
