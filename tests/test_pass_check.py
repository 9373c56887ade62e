"""--check-passes (per-pass differential check) and the accuracy card (report.md, llmc report).

Two in-process builds of the tiny random Llama share one stage cache, so the model is exported
once: a healthy fp16 build with --check-passes, and one whose recipe has a deliberately broken
pass (it scales the largest weight by 1.5) injected into the pass registry.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

import passes
from passes.base import LlmcPass
from compiler.commands.cli import main
from compiler.measure.pass_check import PassChecker, first_divergent, prefill_logits, tolerance_for
from compiler.report.card import SIZE_LINE
from compiler.measure.sizes import weight_footprint
from compiler.frontend.run_passes import PassRecord

BROKEN = "test-scale-weight"
FP16_PASSES = ["cleanup", "rotary-2d-cache", "gqa-native-attention", "kv-cache-scatter", "cast-fp16", "residual-fp32",
               "cleanup", "last-position-logits", "logits-fp32-topk"]


class _ScaleLargestWeight(LlmcPass):
    """A broken 'rewrite': multiplies the largest float initializer by 1.5 (here the tied embedding / lm_head)."""

    def call(self, model):
        value = max((v for v in model.graph.initializers.values() if v.dtype == ir.DataType.FLOAT),
                    key=lambda v: v.const_value.size)
        value.const_value = ir.tensor(value.const_value.numpy() * np.float32(1.5), name=value.name)
        return ir.passes.PassResult(model, modified=True)


def _recipe(path, pass_list, name):
    lines = [f"name: {name}", "passes:", *[f"  - {p}" for p in pass_list], "tolerance:",
             "  max_abs_logit_error: 0.1", "  mean_abs_logit_error: 0.01", "  min_greedy_agreement: 0.94"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def builds(model_dirs, build_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("pass-check")
    cache = build_cache
    runner = CliRunner()
    common = [str(model_dirs["llama"]), "--max-seq", "64", "--check-passes", "--cache-dir", str(cache)]
    healthy = runner.invoke(main, ["build", *common, "--recipe", "fp16", "-o", str(root / "healthy")])
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(passes.REGISTRY, BROKEN, _ScaleLargestWeight)
        broken_passes = FP16_PASSES[:4] + [BROKEN] + FP16_PASSES[4:]
        recipe = _recipe(root / "broken.yaml", broken_passes, "broken")
        broken = runner.invoke(main, ["build", *common, "--recipe", str(recipe), "-o", str(root / "broken")])
    return {"root": root, "cache": cache, "healthy": healthy, "broken": broken}


def test_healthy_fp16_records_each_pass_within_tolerance(builds):
    result = builds["healthy"]
    assert result.exit_code == 0, result.output
    report = json.loads((builds["root"] / "healthy" / "report.json").read_text())
    records = report["passes"]
    assert [r["name"] for r in records] == FP16_PASSES
    for r in records:
        c = r["check"]
        assert not c["skipped"], c  # Concat-form (before kv-cache-scatter) and FP16 graphs are both fed
        assert c["within"] and c["max_abs"] <= tolerance_for(r["name"])[0], r
        assert 0 <= c["mean_abs"] <= c["max_abs"]
    by_name = {r["name"]: r["check"] for r in records}
    for exact in ("rotary-2d-cache", "gqa-native-attention", "kv-cache-scatter"):
        assert by_name[exact]["max_abs"] <= 1e-3 and by_name[exact]["agreement"] == 1.0
    assert by_name["cast-fp16"]["max_abs"] > 0  # FP16 rounding is real: the check sees it
    # The per-pass line is printed with its numbers
    printed = " ".join(result.output.split())  # the console wraps long lines
    assert re.search(r"pass cast-fp16 changed \d+ -> \d+ nodes, max \|dlogit\| [\d.e-]+, agreement \d+% \(ok\)", printed)


def test_broken_pass_is_named_by_the_bisect(builds):
    result = builds["broken"]
    assert result.exit_code == 5, result.output
    message = " ".join(result.output.split())
    assert f"first pass beyond its tolerance is '{BROKEN}' (pass #5 of the recipe)" in message
    report = json.loads((builds["root"] / "broken.failed" / "report.json").read_text())
    records = [PassRecord(**r) for r in report["passes"]]
    index, record = first_divergent(records)
    assert (index, record.name) == (4, BROKEN)
    assert all(r.check["within"] for r in records[:4])
    card = (builds["root"] / "broken.failed" / "report.md").read_text()
    assert re.search(rf"\| 5 \| {BROKEN} \|.*\*\*NO\*\* \|", card)
    assert "**Result: FAIL**" in card


def test_checker_bisects_only_out_of_tolerance_passes():
    checks = [{"within": True}, {"within": None, "skipped": "x"}, {"within": False}, {"within": False}]
    records = [PassRecord(f"p{i}", True, 0.0, 1, 1, {}, c) for i, c in enumerate(checks)]
    assert first_divergent(records)[0] == 2
    assert first_divergent(records[:2]) is None
    assert tolerance_for("a-pass-nobody-registered") == (1e-3, 1.0)
    assert tolerance_for("cast-fp16") == (0.1, 0.9)  # a lossy pass states its own, from its class


def test_card_numbers_recomputed_from_the_artifact(builds):
    out = builds["root"] / "healthy"
    card = (out / "report.md").read_text()
    m = SIZE_LINE.search(card)
    assert m, card
    size, x_fp16, fp16, x_floor, floor = int(m[1]), float(m[2]), int(m[3]), float(m[4]), int(m[5])
    on_disk = sum(p.stat().st_size for p in out.glob("model.onnx*"))
    footprint = weight_footprint(ir.load(out / "model.onnx"))
    assert size == on_disk
    assert (fp16, floor) == (footprint["fp16_bytes"], footprint["floor_bytes"])
    assert x_fp16 == pytest.approx(on_disk / footprint["fp16_bytes"], abs=1e-3)
    assert x_floor == pytest.approx(on_disk / footprint["floor_bytes"], abs=1e-3)
    # The last row's "vs export" error, recomputed: run the cached export and the artifact's graph.
    report = json.loads((out / "report.json").read_text())
    export = ir.load(builds["cache"] / "export" / report["cache"]["stages"]["export"]["key"] / "model.onnx")
    ids = PassChecker(export).input_ids
    recomputed = float(np.abs(prefill_logits(export, ids) - prefill_logits(ir.load(out / "model.onnx"), ids)).max())
    rows = re.findall(rf"^\| {len(FP16_PASSES)} \| {FP16_PASSES[-1]} \| \w+ \| [\d>-]+ \| [^|]+ \| [^|]+ \| [^|]+ \| ([\d.e-]+) \|", card, re.MULTILINE)
    assert rows and float(rows[0]) == pytest.approx(recomputed, rel=1e-2, abs=1e-6)
    assert (out / "pass_errors.png").stat().st_size > 1000
    assert "pass_errors.png" in {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}


def test_llmc_report_prints_the_card(builds, tmp_path):
    out = builds["root"] / "healthy"
    result = CliRunner().invoke(main, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert "accuracy card" in result.output and "Per-pass check" in result.output and "cast-fp16" in result.output
    # An artifact from before the card existed: rendered from report.json
    old = tmp_path / "old"
    shutil.copytree(out, old)
    (old / "report.md").unlink()
    again = CliRunner().invoke(main, ["report", str(old)])
    assert again.exit_code == 0 and "Per-pass check" in again.output
    bad = CliRunner().invoke(main, ["report", str(tmp_path)])
    assert bad.exit_code == 2 and "no report.json" in bad.output


def test_card_precision_table_and_quality(builds):
    """Rendering a quantized build's fields: one row per layer, unlisted projections at the graph's default."""
    from compiler.report.card import render_card

    report = json.loads((builds["root"] / "healthy" / "report.json").read_text())
    report["precision"] = {"model.layers.0.self_attn.q_proj": "int4-awq", "model.layers.1.mlp.down_proj": "int8"}
    report["quality"] = {"reference_perplexity": 10.0, "compiled_perplexity": 10.25, "ppl_delta": 0.025,
                         "kl_mean": 0.0123, "greedy_agreement": 0.9, "agreement_tokens": 256, "eval_tokens": 2032}
    card = render_card(report)
    assert "| layer | down_proj | q_proj |" in card
    assert "| 0 | fp16 | int4-awq |" in card and "| 1 | int8 | fp16 |" in card
    assert "| perplexity delta | +2.50% |" in card and "| KL (nats/token) | 0.01230 |" in card


def test_large_graphs_are_checked_through_external_data(builds, monkeypatch):
    """Above protobuf's cap the graph goes through a temp file with external weights: same logits, model intact."""
    import compiler.measure.pass_check as pass_check

    model = ir.load(builds["root"] / "healthy" / "model.onnx")
    ids = PassChecker(model).input_ids
    in_memory = prefill_logits(model, ids)
    monkeypatch.setattr(pass_check, "_PROTO_LIMIT", 0)
    assert np.array_equal(prefill_logits(model, ids), in_memory)
    assert np.array_equal(prefill_logits(model, ids), in_memory)  # the in-memory model still has its weights
