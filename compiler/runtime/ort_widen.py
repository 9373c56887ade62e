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

INT4 weights stay 4-bit: a MatMul fed by a block-wise INT4 DequantizeLinear (axis 0, zero point 0,
FP16 scales) whose every dequantized value is exact in FP16 becomes onnxruntime's `MatMulNBits`
(com.microsoft, accuracy level 1: FP32 activations, weights dequantized to FP32 in-kernel). Its
dequantized weight is then the graph's exactly, so the numbers are the widened ones up to FP32
summation order; passes/quantize_int4_rtn.py rounds scales so that every product is exact, and the
check here runs on every scale (all 16 int4 values times it). A DQ that fails the check is widened
as before. At 1B INT4 the session holds 1.83 GB instead of 7.19 GB with FP32 weights, and is created
in half the time (benchmarks/NOTES.md, memory at 1B).

Where the FP32 weights live: given a scratch folder, they are written one at a time to a file there
(`WeightFile`) that onnxruntime memory-maps, and the graph's remaining external data (embeddings,
norms) is copied in beside them. onnxruntime packs each weight into its GEMM layout, its own
copy, then unmaps the file. Handed over as arrays instead, both copies are resident while the
session is created (at 1B INT4 a 13.0 GB peak against 6.5 GB before it; benchmarks/NOTES.md), with
identical logits either way.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT
MS_DOMAIN = "com.microsoft"
NBITS_ACCURACY_FP32 = 1  # MatMulNBits' accuracy_level: A is never downcast (4 would quantize it to int8)
_CHECK_COLUMNS = 4096  # the exactness check dequantizes this many columns at a time
_PLACEHOLDER = "llmc-widened-weights"  # never read: onnxruntime takes these initializers from memory
ALIGN = 1 << 16  # weights start at 64 KiB offsets: onnxruntime memory-maps page-aligned external data


@dataclasses.dataclass
class Widened:
    """A graph ready for an onnxruntime CPU session: serialized bytes, plus the FP32 weights by name
    unless they are in a WeightFile in `folder`."""

    model_bytes: bytes
    initializers: dict[str, np.ndarray]  # empty when the weights are in a WeightFile
    matmuls: int  # FP16 MatMuls now computed in FP32, the 4-bit ones included
    folder: Path  # where onnxruntime reads the graph's external data
    int4_matmuls: int = 0  # of which run as MatMulNBits on the 4-bit weights

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


CHUNK_BYTES = 64 << 20  # a widened weight is made and stored this many FP32 bytes at a time


@dataclasses.dataclass
class Rows:
    """An array made one block of rows (axis 0) at a time, so a big widened weight never exists
    whole in memory before its store: the tied lm_head is 1.05 GB in FP32 at 1B, and widening it
    whole (FP16 -> FP32, then its transposed copy) was a 2 GB transient of the session's creation."""

    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Iterator[np.ndarray]

    @classmethod
    def of(cls, arr: np.ndarray) -> "Rows":
        return cls(tuple(arr.shape), arr.dtype, iter([arr]))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def _row_blocks(rows: int, row_bytes: int) -> Iterator[slice]:
    step = max(1, CHUNK_BYTES // max(1, row_bytes))
    return (slice(r, min(r + step, rows)) for r in range(0, rows, step))


def _by_rows(src: np.ndarray, convert=None, dtype=None) -> Rows:
    """src a block of rows at a time, each converted by `convert` to `dtype` (default: as it is)."""
    dtype = np.dtype(dtype or src.dtype)
    convert = convert or (lambda block: block)
    if src.ndim < 2:
        return Rows(tuple(src.shape), dtype, iter([convert(src)]))
    row = int(np.prod(src.shape[1:])) * dtype.itemsize
    return Rows(tuple(src.shape), dtype, (convert(src[r]) for r in _row_blocks(src.shape[0], row)))


def _widen_rows(src: np.ndarray) -> Rows:
    return _by_rows(src, _to_f32, np.float32)


def _widen_transposed(src: np.ndarray) -> Rows:
    """src.T (2-D) in FP32, a block of its rows (src's columns) at a time, transposed by torch."""
    import torch

    def chunks():
        with warnings.catch_warnings():  # read-only (memory-mapped) arrays are only read here
            warnings.simplefilter("ignore", UserWarning)
            for cols in _row_blocks(src.shape[1], src.shape[0] * 4):
                yield torch.from_numpy(src[:, cols]).to(torch.float32).t().contiguous().numpy()  # cast first: 2x faster

    return Rows((src.shape[1], src.shape[0]), np.dtype(np.float32), chunks())


def _constant_fp32(value: ir.Value) -> Rows | None:
    """value in FP32 if it is computable ahead (initializer, Transpose of one, DQ of initializers)."""
    if value.is_graph_input():
        return None
    if value.const_value is not None:
        return _widen_rows(value.const_value.numpy())
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Transpose" and (node.inputs[0].const_value is not None or _constant_dq(node.inputs[0].producer())):
        # A tied lm_head reads the embedding table through a Transpose, the table possibly an INT8 DQ
        # (passes/quantize_int8_embedding.py).
        src = node.inputs[0].const_value
        src = src.numpy() if src is not None else _dequantize(node.inputs[0].producer())
        perm = node.attributes["perm"].as_ints() if "perm" in node.attributes else list(range(src.ndim))[::-1]
        if src.ndim == 2 and list(perm) == [1, 0]:
            return _widen_transposed(src)
        return Rows.of(np.ascontiguousarray(_to_f32(src).transpose(perm)))
    if _constant_dq(node):
        return Rows.of(_to_f32(_dequantize(node)))
    return None


def _constant_dq(node: ir.Node | None) -> bool:
    return (node is not None and node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx")
            and all(v is None or v.const_value is not None for v in node.inputs))


class InMemory(dict):
    """The session's new weights (FP32, packed 4-bit) as arrays by name; the graph gets placeholders
    (session_options hands them over)."""

    def __call__(self, name: str, arr: np.ndarray | Rows) -> ir.ExternalTensor:
        rows = arr if isinstance(arr, Rows) else Rows.of(arr)
        out = np.empty(rows.shape, rows.dtype)
        at = 0
        for chunk in rows.chunks:
            out[at:at + len(chunk)] = chunk
            at += len(chunk)
        self[name] = out
        return ir.ExternalTensor(_PLACEHOLDER, 0, out.nbytes, ir.DataType.from_numpy(out.dtype),
                                 shape=ir.Shape(out.shape), name=name)


class WeightFile:
    """The session's new weights appended, a block of rows at a time, to `folder`/widened.bin: never
    all in memory."""

    NAME = "widened.bin"

    def __init__(self, folder: Path):
        self.path = Path(folder) / self.NAME
        self._fh = open(self.path, "wb")

    def __call__(self, name: str, arr: np.ndarray | Rows) -> ir.ExternalTensor:
        rows = arr if isinstance(arr, Rows) else Rows.of(arr)
        pos = self._fh.tell()
        if pos % ALIGN:
            self._fh.write(bytes(ALIGN - pos % ALIGN))
            pos += ALIGN - pos % ALIGN
        for chunk in rows.chunks:
            self._fh.write(np.ascontiguousarray(chunk, rows.dtype).data)
        assert self._fh.tell() - pos == rows.nbytes, f"{name}: wrote {self._fh.tell() - pos} of {rows.nbytes} bytes"
        return ir.ExternalTensor(self.NAME, pos, rows.nbytes, ir.DataType.from_numpy(rows.dtype),
                                 shape=ir.Shape(rows.shape), name=name)

    def close(self) -> None:
        self._fh.close()


_INT4_VALUES = np.arange(-8, 8, dtype=np.float32)[:, None, None]


def _int4_operands(value: ir.Value) -> tuple[np.ndarray, np.ndarray, int] | None:
    """MatMulNBits' (B [N, K/block, block/2] uint8, scales [N * K/block] FP32, block) for a weight
    that is a block-wise INT4 DequantizeLinear of initializers whose scales make every product
    q * scale exact in FP16 (for all 16 q: a check on the scales alone); None for anything else
    (widened instead)."""
    node = value.producer()
    if node is None or node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    q_val, s_val = node.inputs[0], node.inputs[1]
    zero = node.inputs[2] if len(node.inputs) > 2 else None
    if q_val.const_value is None or s_val.const_value is None or q_val.dtype != ir.DataType.INT4:
        return None
    if s_val.dtype != F16 or value.dtype != F16 or len(q_val.shape) != 2:
        return None
    if zero is not None and (zero.const_value is None or zero.const_value.numpy().astype(np.int8).any()):
        return None
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else 1
    block = node.attributes["block_size"].as_int() if "block_size" in node.attributes else 0
    k, n = q_val.shape
    if axis not in (0, -2) or block < 16 or block & (block - 1) or k % block:
        return None
    scale = s_val.const_value.numpy()  # [K/block, N] FP16
    products = _INT4_VALUES * scale.astype(np.float32)[None]
    if not np.array_equal(products.astype(np.float16).astype(np.float32), products):
        return None
    packed_kn = np.frombuffer(q_val.const_value.tobytes(), np.uint8)  # ONNX INT4: 2 per byte, low nibble first
    nibbles = np.empty(k * n, np.uint8)
    nibbles[0::2], nibbles[1::2] = packed_kn & 0xF, packed_kn >> 4
    u = _transposed(nibbles ^ 8, k, n).reshape(n, k // block, block)  # q + 8: MatMulNBits' zero point 8
    packed = u[..., 0::2] | (u[..., 1::2] << 4)  # element 2i in the low nibble
    return packed, np.ascontiguousarray(scale.T.astype(np.float32)).reshape(-1), block


def _transposed(flat: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """flat viewed as [rows, cols], transposed and contiguous (torch's copy: ~4x numpy's for bytes)."""
    import torch

    return torch.from_numpy(flat.reshape(rows, cols)).t().contiguous().numpy()


def _as_int4_matmul(graph: ir.Graph, node: ir.Node, store, operands) -> ir.Node:
    """Cast(A, FP32) -> MatMulNBits(4-bit B, FP32 scales), before `node`; returns the MatMulNBits."""
    packed, scales, block = operands
    n, k = packed.shape[0], packed.shape[1] * block
    weight = node.inputs[1]
    inits = []
    for suffix, arr in (("__nbits", packed), ("__nbits_scale", scales)):
        name = f"{weight.name}{suffix}"
        stored = store(name, arr)
        init = ir.Value(name=name, type=ir.TensorType(stored.dtype), shape=stored.shape, const_value=stored)
        graph.register_initializer(init)
        inits.append(init)
    cast = ir.node("Cast", [node.inputs[0]], {"to": F32}, name=f"{node.name}__widen_in0")
    cast.outputs[0].dtype, cast.outputs[0].shape = F32, node.inputs[0].shape
    matmul = ir.node("MatMulNBits", [cast.outputs[0], *inits], domain=MS_DOMAIN, name=f"{node.name}__nbits",
                     attributes={"K": k, "N": n, "bits": 4, "block_size": block,
                                 "accuracy_level": NBITS_ACCURACY_FP32})
    matmul.outputs[0].dtype, matmul.outputs[0].shape = F32, node.outputs[0].shape
    graph.insert_before(node, [cast, matmul])
    return matmul


def widen_fp16_matmuls(model: ir.Model, store: InMemory | WeightFile | None = None, int4: bool = True
                       ) -> tuple[int, InMemory | WeightFile]:
    """Rewrite FP16 MatMuls in place; return their count and the store the new weights went to
    (default: an InMemory dict; a WeightFile writes them to disk). With `int4`, exact INT4 weights
    stay 4-bit in MatMulNBits (counted in `model.meta["llmc.int4_matmuls"]`)."""
    store = InMemory() if store is None else store
    graph = model.graph
    count = int4_count = 0
    for node in list(graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            continue
        if not all(v is not None and v.dtype == F16 for v in node.inputs):
            continue
        operands = _int4_operands(node.inputs[1]) if int4 else None
        if operands is not None:
            matmul = _as_int4_matmul(graph, node, store, operands)
            del operands
            int4_count += 1
            model.opset_imports.setdefault(MS_DOMAIN, 1)
            _cast_back(graph, node, matmul)
            count += 1
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
        matmul = ir.node("MatMul", wide, name=f"{node.name}__fp32")
        matmul.outputs[0].dtype, matmul.outputs[0].shape = F32, node.outputs[0].shape
        graph.insert_before(node, matmul)
        _cast_back(graph, node, matmul)
        count += 1
    ir.passes.common.RemoveUnusedNodesPass()(model)
    model.meta["llmc.int4_matmuls"] = int4_count
    return count, store


def _cast_back(graph: ir.Graph, node: ir.Node, matmul: ir.Node) -> None:
    """Round `matmul`'s FP32 product to FP16 under `node`'s output name, and drop `node`."""
    out = node.outputs[0]
    back = ir.node("Cast", [matmul.outputs[0]], {"to": F16}, name=f"{node.name}__widen_out")
    graph.insert_after(matmul, back)
    out.replace_all_uses_with(back.outputs[0], replace_graph_outputs=True)
    name = out.name
    out.name = f"{name}__fp16_unused"
    back.outputs[0].name, back.outputs[0].dtype, back.outputs[0].shape = name, F16, out.shape
    graph.remove(node, safe=True)


def _copy_external_data(model: ir.Model, store: WeightFile) -> None:
    """Copy the graph's own external data (embeddings, norms) into the WeightFile, a block of rows at
    a time, so onnxruntime reads everything from the scratch folder (it reads external data from one
    folder and refuses links out of it). Inlined instead, the 1B embedding (0.5 GB) went through the
    proto and its serialized bytes, and was capped by protobuf's 2 GB."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and tensor.location != WeightFile.NAME:
            value.const_value = store(tensor.name or value.name, _by_rows(tensor.numpy()))


def widened(onnx_path: Path, scratch: Path | None = None, int4: bool = True) -> Widened:
    """The graph at onnx_path, widened. With `scratch` (an empty folder that outlives the session's
    creation) the new weights go to a WeightFile there; without, they are arrays in memory. `int4`:
    exact INT4 weights run as MatMulNBits (else widened to FP32 like the rest)."""
    model = ir.load(onnx_path)
    if scratch is None:
        count, weights = widen_fp16_matmuls(model, int4=int4)
        return Widened(ir.to_proto(model).SerializeToString(), weights, count, Path(onnx_path).resolve().parent,
                       model.meta["llmc.int4_matmuls"])
    store = WeightFile(scratch)
    try:
        count, _ = widen_fp16_matmuls(model, store, int4)
        _copy_external_data(model, store)
    finally:
        store.close()
    return Widened(ir.to_proto(model).SerializeToString(), {}, count, scratch, model.meta["llmc.int4_matmuls"])
