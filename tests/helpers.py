"""Helpers for tests: run graphs with onnxruntime, build them with the backend, count ops."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx_ir as ir

from compiler.engine.backend import get_backend
from compiler.engine.engine_build import build_engine
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.engine.engine_build import BuildOptions
from compiler.graph_io import GraphIO


def op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph)


def save(model: ir.Model, path: Path) -> Path:
    ir.save(model, path)
    return path


def feeds_with_past(io: GraphIO, dtype, batch=2, seq=3, past=4, seed=0, vocab=None) -> dict[str, np.ndarray]:
    """A decode-like step: nonzero past length and positions, so rotary positions > 0 are exercised."""
    rng = np.random.default_rng(seed)
    feeds = {
        "input_ids": rng.integers(0, vocab or io.vocab_size, (batch, seq)).astype(np.int64),
        "attention_mask": np.ones((batch, past + seq), np.int64),
        "position_ids": np.tile(np.arange(past, past + seq, dtype=np.int64), (batch, 1)),
    }
    for name in io.past_names:
        feeds[name] = (0.5 * rng.standard_normal((batch, io.num_kv_heads, past, io.head_dim))).astype(dtype)
    return feeds


def run_onnx(path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ex = OnnxRuntimeExecutor(path)
    return {k: v.astype(np.float32) for k, v in ex.run(feeds).items()}


def run_small(model: ir.Model, x: np.ndarray) -> np.ndarray:
    """A hand-built graph with one input `x`, on onnxruntime's CPU provider (the executor of every numerics
    claim here), straight from memory; its one output as float32."""
    import onnxruntime as ort

    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0].astype(np.float32)


def build_with_backend(onnx_path: Path, tmp: Path, max_seq: int = 64):
    """Parse + build with TensorRT(-RTX); returns the EngineArtifact (layer types, I/O)."""
    return build_engine(onnx_path, tmp / "model.plan", BuildOptions(max_batch=2, max_seq=max_seq), get_backend())


def trained_feeds(model: ir.Model, ids: np.ndarray) -> dict:
    """Feeds for a decoder graph over token ids [B, T]: positions 0..T-1 and empty FP16 pasts."""
    feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(ids.shape[1]), (ids.shape[0], 1))}
    for v in model.graph.inputs[2:]:
        feeds[v.name] = np.zeros([ids.shape[0] if not isinstance(d, int) else d for d in v.shape], np.float16)
    return feeds


def held_out_ids(trained, n=2, seq=48) -> np.ndarray:
    """n consecutive seq-token windows of the held-out text, [n, seq]."""
    from compiler.frontend.corpus import default_eval_text

    ids = trained.tokenizer(default_eval_text()).input_ids
    return np.array([ids[i * seq:(i + 1) * seq] for i in range(n)], np.int64)


def norm_matmul_graph(k=64, n=32, sibling=False):
    """x -> RMSNormalization(gamma) -> MatMul(W) named model.layers.0.self_attn.q_proj; with `sibling`, the
    norm's output is also read by a MatMul outside the targets (a reader a fold would change)."""
    rng = np.random.default_rng(7)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 8, k]))
    graph = ir.Graph([x], [], nodes=[], name="g", opset_imports={"": 23})

    def init(name, array):
        v = ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(list(array.shape)),
                     const_value=ir.tensor(array, name=name))
        graph.register_initializer(v)
        return v

    gamma = init("gamma", rng.uniform(0.5, 1.5, k).astype(np.float32))
    norm = ir.node("RMSNormalization", [x, gamma], name="norm")
    norm.outputs[0].type, norm.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, 8, k])
    graph.append(norm)
    readers = [("model.layers.0.self_attn.q_proj", "q")] + ([("other.proj", "other")] if sibling else [])
    for module, name in readers:
        mm = ir.node("MatMul", [norm.outputs[0], init(f"{name}.w", (rng.standard_normal((k, n)) * 0.05).astype(np.float32))],
                     name=name)
        mm.metadata_props["pkg.torch.onnx.name_scopes"] = repr([module, "linear"])
        mm.outputs[0].name = f"{name}.out"
        graph.append(mm)
        graph.outputs.append(mm.outputs[0])
    activations = {"model.layers.0.self_attn.q_proj": (rng.standard_normal((256, k)) * np.linspace(0.1, 30, k)).astype(np.float32)}
    return ir.Model(graph, ir_version=10), gamma, activations
