"""last-position-logits, tested three ways: the gather before the lm_head MatMul, onnxruntime before vs after
on the gathered rows, TensorRT-RTX parse + build (a native GATHER layer).

The graph is the fp16 recipe's of the bundled trained model (capacity 256). Tolerance through llmc's
onnxruntime executor: exact. Its FP16 MatMuls run as FP32 GEMMs (compiler/runtime/ort_widen.py), which give
each gathered row the same dot product whatever the number of rows, so the logits must be bit-identical
(measured 0.0). onnxruntime's own FP16 MatMul is one ulp off at another M: the per-pass check's bound below.
"""

import numpy as np
import onnx_ir as ir
import pytest

from compiler.graph_io import LOGITS_AT, LOGITS_AT_DIM
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from helpers import build_with_backend, op_counts, save
from passes import REGISTRY
from passes.last_position_logits import LastPositionLogitsPass, lm_head

CAPACITY = 256


@pytest.fixture(scope="module")
def graphs(trained, exported, tmp_path_factory):
    """(before, after) paths: the fp16 recipe's graph without its last pass, and with it (the recipe's own)."""
    from compiler.frontend.default_model import default_model_dir
    from compiler.recipe import load_recipe
    from conftest import final_graph

    recipe = load_recipe("fp16").passes
    assert recipe[-1] == "last-position-logits"  # every recipe ends with it (recipes/*.yaml)
    folder = tmp_path_factory.mktemp("last-position")
    before = final_graph(trained, folder / "before.onnx", passes=recipe[:-1], capacity=CAPACITY,
                         exported=exported(default_model_dir(), trained))
    model = ir.load(before)
    assert LastPositionLogitsPass()(model).modified
    return before, save(model, folder / "after.onnx"), model


def _feeds(executor, ids, start=0):
    io = executor.io
    batch, seq = ids.shape
    feeds = {"input_ids": ids, "position_ids": np.tile(np.arange(start, start + seq), (batch, 1))}
    for name in io.past_names:
        feeds[name] = np.zeros((batch, io.num_kv_heads, CAPACITY, io.head_dim), executor.input_dtype(name))
    return feeds


def test_graph_shape_after(graphs):
    _, _, model = graphs
    assert REGISTRY["last-position-logits"] is LastPositionLogitsPass
    counts = op_counts(model)
    assert counts["GatherND"] == 1
    matmul = lm_head(model.graph)
    gather = matmul.inputs[0].producer()
    assert gather.op_type == "GatherND" and gather.attributes["batch_dims"].value == 1
    assert gather.inputs[0].producer().op_type == "RMSNormalization"  # the final norm's output, gathered
    assert gather.inputs[1].producer().op_type == "Unsqueeze"
    positions = next(v for v in model.graph.inputs if v.name == LOGITS_AT)
    assert positions.dtype == ir.DataType.INT64 and list(positions.shape)[1] == LOGITS_AT_DIM
    logits = next(v for v in model.graph.outputs if v.name == "logits")
    assert list(logits.shape)[1] == LOGITS_AT_DIM
    axes = model.graph.initializers["llmc.logits_positions.axes"]
    assert axes.dtype == ir.DataType.INT64 and list(axes.shape) == [1]  # typed, as weight_footprint reads them
    assert not LastPositionLogitsPass()(model).modified  # once is enough


def test_onnxruntime_before_vs_after_on_the_gathered_rows(graphs):
    before_path, after_path, _ = graphs
    before, after = OnnxRuntimeExecutor(before_path), OnnxRuntimeExecutor(after_path)
    ids = np.random.default_rng(0).integers(4, 1024, (3, 9)).astype(np.int64)
    full = before.run(_feeds(before, ids))["logits"].astype(np.float32)
    assert full.shape[:2] == (3, 9)
    every = after.run({**_feeds(after, ids), LOGITS_AT: np.tile(np.arange(9), (3, 1))})
    np.testing.assert_array_equal(every["logits"].astype(np.float32), full)  # validation: every position
    last = np.array([[8], [3], [5]])  # serving: each row's last real position (rows right-padded)
    got = after.run({**_feeds(after, ids), LOGITS_AT: last})
    assert got["logits"].shape == (3, 1, full.shape[2])
    np.testing.assert_array_equal(got["logits"][:, 0].astype(np.float32), full[np.arange(3), last[:, 0]])
    two = np.array([[0, 8], [1, 2], [7, 7]])
    got = after.run({**_feeds(after, ids), LOGITS_AT: two})["logits"].astype(np.float32)
    np.testing.assert_array_equal(got, full[np.arange(3)[:, None], two])
    for present in after.io.present_names:  # the cache is written as before: every position
        np.testing.assert_array_equal(every[present], before.run(_feeds(before, ids))[present])


def test_backend_parses_and_builds_a_native_gather(graphs, tmp_path):
    _, after_path, _ = graphs
    engine = build_with_backend(after_path, tmp_path, max_seq=CAPACITY)
    assert "GATHER" in engine.layer_types and "PLUGIN_V3" not in engine.layer_types
    io = {t.name: t for t in engine.tensors}
    assert io[LOGITS_AT].is_input and io[LOGITS_AT].dtype == "int64" and io[LOGITS_AT].shape == (-1, -1)
    assert io["logits"].shape[:2] == (-1, -1) and io["logits"].shape[2] > 0  # [batch, n, vocab]


def test_the_scheduler_asks_for_the_last_positions_and_every_request_gets_its_solo_tokens(graphs):
    """The in-flight scheduler over the graph after the pass (host slots, and the device manager through
    test_scheduler_device's in-place stand-in executor) gives each request the tokens of its solo run on the
    graph before it; every logits it received was [rows, 1, vocab]."""
    from compiler.runtime.runner import Runner
    from compiler.runtime.scheduler import Request, Scheduler
    from tests.test_scheduler_device import InPlaceStandIn

    before_path, after_path, _ = graphs
    before, after = OnnxRuntimeExecutor(before_path), OnnxRuntimeExecutor(after_path)
    assert after.io.logits_positions and not before.io.logits_positions
    rng = np.random.default_rng(3)
    requests = [Request(rng.integers(4, 1024, n).tolist(), m) for n, m in [(5, 20), (30, 9), (2, 25), (12, 14)]]
    solo = [Runner(before, pad_token_id=3).generate([r.prompt], r.max_tokens).tokens[0] for r in requests]
    runner = Runner(after, pad_token_id=3)  # its prefill asks for each prompt's last position
    assert [runner.generate([r.prompt], r.max_tokens).tokens[0] for r in requests] == solo
    assert runner.prefill([requests[1].prompt, requests[0].prompt]).shape == (2, after.io.vocab_size)
    widths = []
    run = after.run

    def counted(feeds):
        out = run(feeds)
        widths.append(out["logits"].shape[1])
        return out

    after.run = counted
    for executor in (after, InPlaceStandIn(after)):
        scheduler = Scheduler(executor, max_batch=3, max_tokens_per_step=16, pad_token_id=3)
        handles = [scheduler.submit(r) for r in requests]
        scheduler.run_until_idle()
        assert [h.tokens for h in handles] == solo
        assert max(s.width for s in scheduler.steps) > 1  # prompt chunks ran: n = 1 of a wider step
    assert set(widths) == {1}


def test_the_per_pass_check_measures_it_as_exact(graphs):
    """--check-passes feeds every position to the graph after the pass. Its plain onnxruntime session runs the
    FP16 lm_head in FP16, where a GEMM of other M rounds differently: at most one FP16 ulp of the logits."""
    from compiler.measure.pass_check import PassChecker

    before_path, after_path, _ = graphs
    checker = PassChecker(ir.load(before_path))
    check = checker.after("last-position-logits", ir.load(after_path))
    assert check.within and check.agreement == 1.0, check
    assert check.max_abs <= 2.0 ** -7, check  # one FP16 ulp for |logit| in [8, 16)
