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


@pytest.mark.parametrize("external", [False, True], ids=["inline", "external-data"])
def test_weights_through_a_scratch_file_match_in_memory(external, trained_fp16, tmp_path, monkeypatch):
    """The executor stages the FP32 weights in a memory-mapped scratch file (not 2x in memory while
    the session is created): same logits as the in-memory arrays, the file and its folder deleted,
    the graph's own external data read into the graph bytes."""
    import onnxruntime as ort

    from compiler.ort_widen import ALIGN, WeightFile, widened

    path = trained_fp16
    if external:  # the layout of a graph over EXTERNAL_DATA_THRESHOLD: weights in model.onnx.data
        path = tmp_path / "ext" / "model.onnx"
        path.parent.mkdir()
        ir.save(ir.load(trained_fp16), path, external_data="model.onnx.data")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    wide = widened(path, scratch)
    assert wide.initializers == {} and wide.folder == scratch
    blob = (scratch / WeightFile.NAME).stat().st_size
    assert blob >= sum(n.nbytes for n in widened(path).initializers.values())
    model = ir.from_proto(__import__("onnx").load_from_string(wide.model_bytes))
    offsets = [v.const_value.offset for v in model.graph.initializers.values()
               if isinstance(v.const_value, ir.ExternalTensor) and v.const_value.location == WeightFile.NAME]
    assert len(offsets) == wide.matmuls and all(o % ALIGN == 0 for o in offsets)
    assert sorted(f.name for f in scratch.iterdir()) == [WeightFile.NAME]  # nothing else needed beside it
    feeds_prompt = [5, 17, 3, 99, 42, 7]
    monkeypatch.setenv("LLMC_SCRATCH_DIR", str(tmp_path / "env"))
    (tmp_path / "env").mkdir()
    from_file = Runner(OnnxRuntimeExecutor(path)).teacher_forced(feeds_prompt, [1, 2, 3])
    assert list((tmp_path / "env").iterdir()) == []  # the scratch folder is gone once the session holds the weights
    monkeypatch.setattr("compiler.runtime_onnx.widened", lambda p, scratch=None: widened(p))  # arrays in memory
    in_memory = Runner(OnnxRuntimeExecutor(path)).teacher_forced(feeds_prompt, [1, 2, 3])
    assert all(np.array_equal(a, b) for a, b in zip(from_file, in_memory))
    del ort


def test_unusable_scratch_folder_falls_back_to_memory_and_says_so(trained_fp16, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMC_SCRATCH_DIR", str(tmp_path / "missing"))
    with pytest.warns(UserWarning, match="LLMC_SCRATCH_DIR"):
        ex = OnnxRuntimeExecutor(trained_fp16)
    assert ex.widened == _fp16_matmuls(ir.load(trained_fp16))
    assert np.isfinite(Runner(ex).teacher_forced([5, 17, 3], [1])[-1]).all()
