"""cleanup, tested three ways: fewer nodes and no dead ones, onnxruntime unchanged, backend builds."""

import numpy as np

from passes import CastFp16Pass, CleanupPass
from helpers import build_with_backend, feeds_with_past, op_counts, run_onnx, save


def test_graph_shrinks_and_second_run_is_noop(fresh_llama_model):
    model = fresh_llama_model
    before = len(model.graph)
    assert CleanupPass()(model).modified
    assert len(model.graph) < before
    counts = op_counts(model)
    assert counts["Cos"] == 1 and counts["Sin"] == 1  # the per-layer rotary duplicates merged by CSE
    assert not CleanupPass()(model).modified  # fixed point


def test_onnxruntime_unchanged(fresh_llama_model, llama_export, tmp_path):
    path, io = llama_export
    feeds = feeds_with_past(io, np.float32)
    before = run_onnx(path, feeds)
    CleanupPass()(fresh_llama_model)
    after = run_onnx(save(fresh_llama_model, tmp_path / "clean.onnx"), feeds)
    for name in io.output_names:  # a semantics-preserving rewrite: 1e-6
        np.testing.assert_allclose(after[name], before[name], atol=1e-6, rtol=1e-6)


def test_backend_parses_and_builds(fresh_llama_model, tmp_path):
    CastFp16Pass()(fresh_llama_model)
    CleanupPass()(fresh_llama_model)
    engine = build_with_backend(save(fresh_llama_model, tmp_path / "m.onnx"), tmp_path)
    assert engine.layer_types.get("MATRIX_MULTIPLY", 0) > 0


def test_leaves_no_reference_to_the_graph(llama_export):
    """onnxscript's module-level rules keep the last graph their matchers saw; the pass clears that,
    so dropping the model frees it (and its weights): at 1B this held 3.6 GB."""
    import gc
    import weakref

    import onnx_ir as ir

    model = ir.load(llama_export[0])
    assert CleanupPass()(model).modified
    graph = weakref.ref(model.graph)
    del model
    gc.collect()
    assert graph() is None
