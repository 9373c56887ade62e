"""Run FP16 MatMuls as FP32 products on onnxruntime's CPU provider.

Why: onnxruntime has no FP16 GEMM on x86, and its FP16 Cast and Transpose are scalar loops.
Measured on a 1B FP16 graph (2 cores): prefill of 20 tokens + 3 decode steps took 160 s, a
one-node 20x2048 @ 2048x8192 FP16 MatMul 450 ms vs 9.5 ms in FP32; validating took four minutes.

What: every default-domain MatMul whose inputs are FP16 becomes Cast(FP32) -> MatMul -> Cast(FP16).
TensorRT's FP16 GEMMs multiply FP16 inputs and accumulate in FP32 before rounding the output to
FP16; the widened node computes exactly that (FP16 x FP16 products are exact in FP32), so the CPU
proxy is at least as faithful as the FP16 fallback it replaces. A weight operand that is constant
(an initializer, its Transpose, or a DequantizeLinear of initializers) is computed once here, the
dequantization by onnxruntime's own kernel so its FP16 rounding is the graph's, and handed to the
session as an FP32 initializer; activations get a Cast node. Every other node is the graph that
TensorRT parsed. The cost is an FP32 copy of the matmul weights in memory, in place of the FP16 one.

Where the FP32 weights live: given a scratch folder, they are written one at a time to a file there
(`WeightFile`) that onnxruntime memory-maps, and the graph's remaining external data (embeddings,
norms) is read into the graph bytes. onnxruntime packs each weight into its GEMM layout, its own
copy, then unmaps the file. Handed over as arrays instead, both copies were resident while the
session was created: measured on a 1B INT4 graph (2026-11-28), 6.5 GB before the session and
12.0 GB after it, 13.0 GB peak; at 135M the peak fell from 1.82 to 1.42 GB with the file, with
identical logits.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
_PLACEHOLDER = "llmc-widened-weights"  # never read: onnxruntime takes these initializers from memory
ALIGN = 1 << 16  # weights start at 64 KiB offsets: onnxruntime memory-maps page-aligned external data
INLINE_LIMIT = 3 << 29  # 1.5 GB of non-matmul weights (embeddings, norms) go inside the graph bytes


@dataclasses.dataclass
class Widened:
    """A graph ready for an onnxruntime CPU session: serialized bytes, plus the FP32 weights by name
    unless they are in a WeightFile in `folder`."""

    model_bytes: bytes
    initializers: dict[str, np.ndarray]  # empty when the weights are in a WeightFile
    matmuls: int
    folder: Path  # where onnxruntime reads the graph's external data

    def session_options(self, opts):
        import onnxruntime as ort

        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(self.folder))
        if self.initializers:
            names = list(self.initializers)
            opts.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(self.initializers[n]) for n in names])
        return opts


def _to_f32(arr: np.ndarray) -> np.ndarray:
    """FP16 -> FP32 with torch (F16C, all cores); numpy's conversion is a scalar loop."""
    import torch

    with warnings.catch_warnings():  # read-only (memory-mapped) arrays are only read here
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32).numpy()


def _dequantize(node: ir.Node) -> np.ndarray:
    """Run one DequantizeLinear of initializers with onnxruntime's kernel (its output rounding)."""
    import onnxruntime as ort

    inputs = [ir.Value(name=f"in{i}", type=v.type, shape=v.shape, const_value=v.const_value)
              for i, v in enumerate(node.inputs) if v is not None]
    out = ir.Value(name="out", type=node.outputs[0].type, shape=node.outputs[0].shape)
    dq = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), outputs=[out])
    graph = ir.Graph([], [out], nodes=[dq], initializers=inputs, opset_imports={"": node.graph.opset_imports[""]})
    proto = ir.to_proto(ir.Model(graph, ir_version=10))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    folder = getattr(node.inputs[0].const_value, "base_dir", "")  # external INT4 data lives beside the model
    if folder:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, {})[0]


def _constant_fp32(value: ir.Value) -> np.ndarray | None:
    """value's FP32 array if it is computable ahead (initializer, Transpose of one, DQ of initializers)."""
    if value.is_graph_input():
        return None
    if value.const_value is not None:
        return _to_f32(value.const_value.numpy())
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Transpose" and node.inputs[0].const_value is not None:
        src = node.inputs[0].const_value.numpy()
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else list(range(src.ndim))[::-1]
        return np.ascontiguousarray(_to_f32(src).transpose(perm))
    if node.op_type == "DequantizeLinear" and all(v is None or v.const_value is not None for v in node.inputs):
        return _to_f32(_dequantize(node))
    return None


class InMemory(dict):
    """The FP32 weights as arrays by name; the graph gets placeholders (session_options hands them over)."""

    def __call__(self, name: str, arr: np.ndarray) -> ir.ExternalTensor:
        self[name] = arr
        return ir.ExternalTensor(_PLACEHOLDER, 0, arr.nbytes, F32, shape=ir.Shape(arr.shape), name=name)


class WeightFile:
    """The FP32 weights appended, one at a time, to `folder`/widened.bin: never all in memory."""

    NAME = "widened.bin"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME
        self._fh = open(self.path, "wb")

    def __call__(self, name: str, arr: np.ndarray) -> ir.ExternalTensor:
        pos = self._fh.tell()
        if pos % ALIGN:
            self._fh.write(bytes(ALIGN - pos % ALIGN))
            pos += ALIGN - pos % ALIGN
        self._fh.write(np.ascontiguousarray(arr).data)
        return ir.ExternalTensor(self.NAME, pos, arr.nbytes, F32, shape=ir.Shape(arr.shape), name=name)

    def close(self) -> None:
        self._fh.close()


def widen_fp16_matmuls(model: ir.Model, store: InMemory | WeightFile | None = None
                       ) -> tuple[int, InMemory | WeightFile]:
    """Rewrite FP16 MatMuls in place; return their count and the store the FP32 weights went to
    (default: an InMemory dict; a WeightFile writes them to disk)."""
    store = InMemory() if store is None else store
    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        if not all(v is not None and v.dtype == F16 for v in node.inputs):
            continue
        wide: list[ir.Value] = []
        for i, value in enumerate(node.inputs):
            arr = _constant_fp32(value)
            if arr is not None:
                name = f"{value.name}__fp32"
                stored = store(name, arr)
                del arr  # a WeightFile holds it on disk only
                init = ir.Value(name=name, type=ir.TensorType(F32), shape=stored.shape, const_value=stored)
                graph.register_initializer(init)
                wide.append(init)
            else:
                cast = ir.node("Cast", [value], {"to": F32}, name=f"{node.name}__widen_in{i}")
                cast.outputs[0].dtype, cast.outputs[0].shape = F32, value.shape
                graph.insert_before(node, cast)
                wide.append(cast.outputs[0])
        out = node.outputs[0]
        matmul = ir.node("MatMul", wide, name=f"{node.name}__fp32")
        matmul.outputs[0].dtype, matmul.outputs[0].shape = F32, out.shape
        back = ir.node("Cast", [matmul.outputs[0]], {"to": F16}, name=f"{node.name}__widen_out")
        graph.insert_before(node, [matmul, back])
        out.replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
        name = out.name
        out.name = f"{name}__fp16_unused"
        back.outputs[0].name, back.outputs[0].dtype, back.outputs[0].shape = name, F16, out.shape
        graph.remove(node, safe=True)
        count += 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    return count, store


def _inline_external_data(model: ir.Model) -> bool:
    """Read the graph's own external data into it, so onnxruntime needs only the scratch folder (it
    reads external data from one folder, and refuses links out of it). False, leaving the graph as
    it is, when that data would pass protobuf's 2 GB cap."""
    external = [v for v in model.graph.initializers.values()
                if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.location != WeightFile.NAME]
    if sum(v.const_value.nbytes for v in external) > INLINE_LIMIT:
        return False
    for value in external:
        value.const_value = ir.tensor(value.const_value.numpy(), name=value.const_value.name)
    return True


def widened(onnx_path: Path, scratch: Path | None = None) -> Widened:
    """The graph at onnx_path, widened. With `scratch` (an empty folder that outlives the session's
    creation) the FP32 weights go to a WeightFile there; without, they are arrays in memory."""
    model = ir.load(onnx_path)
    if scratch is None:
        count, weights = widen_fp16_matmuls(model)
        return Widened(ir.to_proto(model).SerializeToString(), weights, count, Path(onnx_path).resolve().parent)
    store = WeightFile(scratch)
    try:
        count, _ = widen_fp16_matmuls(model, store)
    finally:
        store.close()
    if not _inline_external_data(model):  # > 1.5 GB of embeddings and norms: the in-memory path
        (scratch / WeightFile.NAME).unlink()
        return widened(onnx_path)
    return Widened(ir.to_proto(model).SerializeToString(), {}, count, scratch)
