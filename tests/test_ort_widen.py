"""The CPU executor's FP16-MatMul widening (compiler/runtime/ort_widen.py): graph shape, numerics, the file untouched."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import pytest

from compiler.runtime.ort_widen import F16, F32, widen_fp16_matmuls
from compiler.runtime.runner import Runner
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.measure.validate import reference_decode
from helpers import op_counts

# One FP16 ulp at the trained model's logit magnitudes (|logit| < 16) is 2**-7 = 0.0078: the
# widened product rounds once, where onnxruntime's FP16 fallback may round differently.
LOGIT_ULP_TOL = 2 * 2**-7


def _fp16_matmuls(model: ir.Model) -> int:
    return sum(1 for n in model.graph if n.op_type == "MatMul" and all(v.dtype == F16 for v in n.inputs))


@pytest.mark.parametrize("graph", ["fp16", "int4", "int4-widened"])
def test_graph_shape_after(graph, trained_fp16, trained_quantized):
    path = trained_fp16 if graph == "fp16" else trained_quantized("quantize-int4-awq")
    model = ir.load(path)
    before = op_counts(model)
    count, weights = widen_fp16_matmuls(model, int4=graph == "int4")
    after = op_counts(model)
    nbits = model.meta["llmc.int4_matmuls"]
    # INT4 weights stay 4-bit (MatMulNBits) unless asked otherwise; the rest is widened.
    assert nbits == (before["DequantizeLinear"] if graph == "int4" else 0)
    assert graph != "int4" or nbits > 0
    assert count == before["MatMul"] == after["MatMul"] + after["MatMulNBits"] > 0
    assert after["MatMulNBits"] == nbits
    assert _fp16_matmuls(model) == 0
    assert all(n.outputs[0].dtype == F32 for n in model.graph if n.op_type in ("MatMul", "MatMulNBits"))
    # Every weight operand was computed ahead (DequantizeLinear and the tied-embedding Transpose
    # included): only the activation side is cast at run time.
    assert after["DequantizeLinear"] == 0
    fp32 = [w for w in weights.values() if w.dtype == np.float32 and w.ndim == 2]
    assert len(fp32) == count - nbits and len(weights) == len(fp32) + 2 * nbits  # packed B + scales
    assert after["Cast"] == before["Cast"] + 2 * count  # activation in, product out
    assert [v.name for v in model.graph.outputs] == [v.name for v in ir.load(path).graph.outputs]
    if nbits:  # 4 bits per weight plus an FP32 scale per block of 128: < 1/7 of the widened FP32 bytes
        four_bit = sum(w.nbytes for w in weights.values() if w.dtype == np.uint8)
        scales = sum(w.nbytes for w in weights.values() if w.ndim == 1)
        dq_elems = sum(v.const_value.size for v in ir.load(path).graph.initializers.values() if v.dtype == ir.DataType.INT4)
        assert four_bit == dq_elems // 2 and four_bit + scales < dq_elems * 4 / 7


def test_int4_matmuls_compute_the_widened_numbers(trained_quantized):
    """MatMulNBits dequantizes in FP32; the graph's scales make every product exact in FP16, so its
    weights are the graph's and the logits are the fully widened ones up to FP32 summation order (one
    FP16 ulp of the rounded products). The packing is checked by this too: a nibble out of place
    moves logits by whole units."""
    path = trained_quantized("quantize-int4-rtn")
    nbits = OnnxRuntimeExecutor(path)
    wide = OnnxRuntimeExecutor(path, int4_matmul=False)
    dq = op_counts(ir.load(path))["DequantizeLinear"]
    assert (nbits.int4_matmuls, wide.int4_matmuls) == (dq, 0) and dq > 0
    prompt = [5, 17, 3, 99, 42, 7, 11, 250, 31, 8]
    a = Runner(nbits).teacher_forced(prompt, [1, 2, 3, 4])
    b = Runner(wide).teacher_forced(prompt, [1, 2, 3, 4])
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) <= LOGIT_ULP_TOL


def test_a_scale_whose_products_are_not_exact_is_widened(trained_quantized, tmp_path):
    """The exactness check runs on every block: a graph from elsewhere (or older llmc) whose FP16
    scales leave products inexact keeps that MatMul widened, with the same logits."""
    model = ir.load(trained_quantized("quantize-int4-rtn"))
    scale = next(v for v in model.graph.initializers.values() if v.name.endswith(".scale"))
    bits = scale.const_value.numpy().copy().view(np.uint16)
    bits[0, 0] |= 1  # a 11-bit scale: 7 * scale no longer fits FP16 (unless this block has no odd q)
    scale.const_value = ir.tensor(bits.view(np.float16), name=scale.name)
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    dq = op_counts(model)["DequantizeLinear"]
    assert OnnxRuntimeExecutor(path).int4_matmuls == dq - 1
    prompt = [5, 17, 3, 99, 42]
    a = Runner(OnnxRuntimeExecutor(path)).teacher_forced(prompt, [1, 2])
    b = Runner(OnnxRuntimeExecutor(path, int4_matmul=False)).teacher_forced(prompt, [1, 2])
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) <= LOGIT_ULP_TOL


@pytest.mark.parametrize("graph", ["fp16", "int4"])
def test_outputs_match_the_fp16_fallback_and_pytorch(graph, trained, trained_fp16, trained_quantized):
    path = trained_fp16 if graph == "fp16" else trained_quantized("quantize-int4-awq")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    prompt = trained.tokenizer("To be, or not to be, that is the question").input_ids
    ref, tokens = reference_decode(trained, prompt, 6)
    native = OnnxRuntimeExecutor(path, widen_fp16_matmul=False)
    wide = OnnxRuntimeExecutor(path)  # the CPU default
    assert (native.widened, wide.widened) == (0, _fp16_matmuls(ir.load(path)))
    a = Runner(native).teacher_forced(prompt, tokens[:6])
    b = Runner(wide).teacher_forced(prompt, tokens[:6])
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) <= LOGIT_ULP_TOL
    err_native = np.mean([np.abs(x - r).mean() for x, r in zip(a, ref)])
    err_wide = np.mean([np.abs(y - r).mean() for y, r in zip(b, ref)])
    assert err_wide <= err_native * 1.25  # no less faithful to PyTorch than the fallback
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest  # the artifact is never rewritten


@pytest.mark.parametrize("graph,external", [("fp16", False), ("fp16", True), ("int4", True)],
                         ids=["inline", "external-data", "int4-external-data"])
def test_weights_through_a_scratch_file_match_in_memory(graph, external, trained_fp16, trained_quantized, tmp_path,
                                                        monkeypatch):
    """The executor stages the FP32 weights in a memory-mapped scratch file (not 2x in memory while
    the session is created): same logits as the in-memory arrays, the file and its folder deleted,
    the graph's own external data copied in beside them (no link out of the folder, no 2 GB proto)."""
    import onnxruntime as ort

    from compiler.runtime.ort_widen import ALIGN, WeightFile, widened

    path = trained_fp16 if graph == "fp16" else trained_quantized("quantize-int4-rtn")
    if external:  # the layout of a graph over EXTERNAL_DATA_THRESHOLD: weights in model.onnx.data
        source, path = path, tmp_path / "ext" / "model.onnx"
        path.parent.mkdir()
        ir.save(ir.load(source), path, external_data="model.onnx.data")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    wide = widened(path, scratch)
    assert wide.initializers == {} and wide.folder == scratch
    blob = (scratch / WeightFile.NAME).stat().st_size
    assert blob >= sum(n.nbytes for n in widened(path).initializers.values())
    model = ir.from_proto(__import__("onnx").load_from_string(wide.model_bytes))
    staged = [v.const_value for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert {t.location for t in staged} == {WeightFile.NAME}  # everything from the scratch folder
    own = {n for n, v in ir.load(path).graph.initializers.items() if isinstance(v.const_value, ir.ExternalTensor)}
    copied = own & set(model.graph.initializers)  # the graph's external data still used: embeddings, norms
    assert bool(copied) == external and len(wide.model_bytes) < 2 << 20  # the graph bytes hold no weights
    assert (wide.int4_matmuls > 0) == (graph == "int4")
    assert len(staged) == wide.matmuls + wide.int4_matmuls + len(copied)
    assert all(t.offset % ALIGN == 0 for t in staged)
    assert sorted(f.name for f in scratch.iterdir()) == [WeightFile.NAME]  # nothing else needed beside it
    feeds_prompt = [5, 17, 3, 99, 42, 7]
    monkeypatch.setenv("LLMC_SCRATCH_DIR", str(tmp_path / "env"))
    (tmp_path / "env").mkdir()
    from_file = Runner(OnnxRuntimeExecutor(path)).teacher_forced(feeds_prompt, [1, 2, 3])
    assert list((tmp_path / "env").iterdir()) == []  # the scratch folder is gone once the session holds the weights
    monkeypatch.setattr("compiler.runtime.onnx_executor.widened", lambda p, scratch=None, int4=True: widened(p))  # in memory
    in_memory = Runner(OnnxRuntimeExecutor(path)).teacher_forced(feeds_prompt, [1, 2, 3])
    assert all(np.array_equal(a, b) for a, b in zip(from_file, in_memory))
    del ort


def test_unusable_scratch_folder_falls_back_to_memory_and_says_so(trained_fp16, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_SCRATCH_DIR", str(tmp_path / "missing"))
    with pytest.warns(UserWarning, match="LLMC_SCRATCH_DIR"):
        ex = OnnxRuntimeExecutor(trained_fp16)
    assert ex.widened == _fp16_matmuls(ir.load(trained_fp16))
    assert np.isfinite(Runner(ex).teacher_forced([5, 17, 3], [1])[-1]).all()
