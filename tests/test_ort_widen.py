"""The CPU executor's FP16-MatMul widening (compiler/ort_widen.py): graph shape, numerics, the file untouched."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx_ir as ir
import pytest

from compiler.ort_widen import F16, F32, widen_fp16_matmuls
from compiler.runner import Runner
from compiler.runtime_onnx import OnnxRuntimeExecutor
from compiler.validate import reference_decode
from helpers import op_counts

# One FP16 ulp at the trained model's logit magnitudes (|logit| < 16) is 2**-7 = 0.0078: the
# widened product rounds once, where onnxruntime's FP16 fallback may round differently.
LOGIT_ULP_TOL = 2 * 2**-7


def _fp16_matmuls(model: ir.Model) -> int:
    return sum(1 for n in model.graph if n.op_type == "MatMul" and all(v.dtype == F16 for v in n.inputs))


@pytest.mark.parametrize("graph", ["fp16", "int4"])
def test_graph_shape_after(graph, trained_fp16, trained_quantized):
    path = trained_fp16 if graph == "fp16" else trained_quantized("quantize-int4-awq")
    model = ir.load(path)
    before = op_counts(model)
    count, weights = widen_fp16_matmuls(model)
    after = op_counts(model)
    assert count == before["MatMul"] == after["MatMul"] > 0
    assert _fp16_matmuls(model) == 0
    assert all(n.outputs[0].dtype == F32 for n in model.graph if n.op_type == "MatMul")
    # Every weight operand was computed ahead (DequantizeLinear and the tied-embedding Transpose
    # included): only the activation side is cast at run time.
    assert after["DequantizeLinear"] == 0
    assert len(weights) == count and all(w.dtype == np.float32 for w in weights.values())
    assert after["Cast"] == before["Cast"] + 2 * count  # activation in, product out
    assert [v.name for v in model.graph.outputs] == [v.name for v in ir.load(path).graph.outputs]


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
