"""residual-fp32, tested three ways: the stream's dtypes after it, onnxruntime against PyTorch where the
all-FP16 graph overflows, TensorRT-RTX parse + build.

The tiny Gemma 3's post-branch norms are scaled up (Gemma's norm: x * (1 + w)) until its residual sum
exceeds FP16's 65504 while every branch output stays inside it: Gemma 3 270M's situation (|hidden|
~1e5, branch outputs <= 3.3e4) at tiny size. The test asserts both facts of the PyTorch model first.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from helpers import build_with_backend, op_counts, save
from passes.residual_fp32 import MARK, ResidualFp32Pass, residual_stream

CAP = 32
LAYERS = 3
BRANCH_SCALE = 9000.0  # 1 + w of the post-attention / post-feedforward norms
F16_MAX = 65504.0


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(model dir, loaded model, PyTorch max |residual|, max |branch output|) of the scaled tiny Gemma 3."""
    import torch

    from compiler.frontend.default_model import make_tiny_model
    from compiler.frontend.load import load_model

    root = tmp_path_factory.mktemp("residual")
    loaded = load_model(make_tiny_model(root / "base", "gemma3", num_layers=LAYERS, seed=11))
    with torch.no_grad():
        for layer in loaded.model.model.layers:
            for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
                norm.weight.add_(BRANCH_SCALE - 1)
    loaded.model.save_pretrained(root / "scaled")
    loaded.tokenizer.save_pretrained(root / "scaled")
    loaded = load_model(root / "scaled")
    seen = {"stream": 0.0, "branch": 0.0}
    hooks = [loaded.model.model.norm.register_forward_pre_hook(
        lambda m, args: seen.__setitem__("stream", max(seen["stream"], args[0].abs().max().item())))]
    for layer in loaded.model.model.layers:
        for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
            hooks.append(norm.register_forward_hook(
                lambda m, args, out: seen.__setitem__("branch", max(seen["branch"], out.abs().max().item()))))
    ids = _ids(loaded)
    with torch.no_grad():
        logits = loaded.model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    for hook in hooks:
        hook.remove()
    return root / "scaled", loaded, ids, logits, seen


def _ids(loaded) -> np.ndarray:
    return np.random.default_rng(3).integers(0, loaded.spec.vocab_size, (2, 12)).astype(np.int64)


@pytest.fixture(scope="module")
def fp16_graph(gemma, exported):
    """The fp16 recipe's graph up to cast-fp16 (residual-fp32 not yet applied)."""
    from passes import PassContext, make_pass

    model_dir, loaded, *_ = gemma
    model = ir.load(exported(model_dir, loaded))
    for name in ("cleanup", "rotary-2d-cache", "gqa-native-attention", "kv-cache-scatter", "cast-fp16"):
        make_pass(name, PassContext(max_positions=CAP))(model)
    return model


def _copy(model: ir.Model) -> ir.Model:
    return ir.from_proto(ir.to_proto(model))


def _prefill(path, loaded, ids) -> np.ndarray:
    from compiler.runtime.onnx_executor import OnnxRuntimeExecutor

    feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(ids.shape[1], dtype=np.int64), (ids.shape[0], 1))}
    spec = loaded.spec
    for i in range(spec.num_layers):
        for t in ("key", "value"):
            feeds[f"past_key_values.{i}.{t}"] = np.zeros((ids.shape[0], spec.num_kv_heads, CAP, spec.head_dim), np.float16)
    return OnnxRuntimeExecutor(path).run(feeds)["logits"].astype(np.float32)


def test_the_scaled_model_overflows_fp16_only_in_its_residual_sum(gemma):
    *_, seen = gemma
    assert seen["stream"] > 1.2 * F16_MAX and seen["branch"] < 0.9 * F16_MAX


def test_graph_shape_after(fp16_graph):
    model = _copy(fp16_graph)
    assert model.graph.metadata_props.get(MARK) == "1"  # the export marked Gemma 3
    before = op_counts(model)
    assert ResidualFp32Pass()(model).modified
    after = op_counts(model)
    stream = residual_stream(model.graph)
    assert len(stream) == 2 * LAYERS + 1 and all(v.dtype == ir.DataType.FLOAT for v in stream)
    # Casts: each branch into its Add, the embedding once, and each norm that reads the stream back to FP16.
    assert after["Cast"] - before["Cast"] == 2 * LAYERS + 1 + (2 * LAYERS + 1)
    assert {k: v for k, v in after.items() if k != "Cast"} == {k: v for k, v in before.items() if k != "Cast"}
    norms = {u.node for v in stream for u in v.uses() if u.node.op_type == "RMSNormalization"}
    assert len(norms) == 2 * LAYERS + 1
    for norm in norms:
        assert norm.inputs[1].dtype == norm.outputs[0].dtype == ir.DataType.FLOAT
        assert all(u.node.op_type == "Cast" for u in norm.outputs[0].uses())
    mms = [n for n in model.graph if n.op_type in ("MatMul", "Attention")]
    assert all(n.outputs[0].dtype == ir.DataType.FLOAT16 for n in mms)  # the heavy ops stay FP16


def test_unmarked_graph_is_left_alone(fp16_graph):
    model = _copy(fp16_graph)
    del model.graph.metadata_props[MARK]
    before = op_counts(model)
    assert not ResidualFp32Pass()(model).modified and op_counts(model) == before


def test_onnxruntime_fp16_overflow_fixed(gemma, fp16_graph, tmp_path):
    """All-FP16: the residual sum overflows (non-finite or far-off logits). With the pass: PyTorch's
    logits within FP16 rounding of the branches (1% of the logit range)."""
    _, loaded, ids, want, _ = gemma
    plain = _prefill(save(_copy(fp16_graph), tmp_path / "plain.onnx"), loaded, ids)
    fixed_model = _copy(fp16_graph)
    ResidualFp32Pass()(fixed_model)
    fixed = _prefill(save(fixed_model, tmp_path / "fixed.onnx"), loaded, ids)
    scale = np.abs(want).max()
    assert not np.isfinite(plain).all() or np.abs(plain - want).max() > 0.1 * scale
    assert np.isfinite(fixed).all()
    assert np.abs(fixed - want).max() < 0.01 * scale
    assert (fixed.argmax(-1) == want.argmax(-1)).mean() >= 0.9


def test_backend_builds_mixed_precision_stream(fp16_graph, tmp_path):
    model = _copy(fp16_graph)
    ResidualFp32Pass()(model)
    engine = build_with_backend(save(model, tmp_path / "m.onnx"), tmp_path, max_seq=CAP)
    assert engine.layer_types.get("ATTENTION_INPUT") == LAYERS
    assert engine.layer_types.get("KV_CACHE_UPDATE") == 2 * LAYERS
