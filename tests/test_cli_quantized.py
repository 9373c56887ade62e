"""`llmc build --recipe int4-awq` end to end on the shipped trained model, and the perplexity budget.

Both builds share one stage cache, so the second reuses the export.
"""

import json

import numpy as np
import onnx
import pytest
import yaml
from click.testing import CliRunner
from onnx import numpy_helper
from safetensors.numpy import load_file

from compiler.commands.cli import main
from compiler.frontend.default_model import default_model_dir
from compiler.recipe import RECIPES_DIR


@pytest.fixture(scope="module")
def cache_dir(trained_build_cache):
    return trained_build_cache


def test_int4_awq_build_reports_what_it_costs(tmp_path, cache_dir):
    out = tmp_path / "awq"
    result = CliRunner().invoke(main, ["build", "--recipe", "int4-awq", "-o", str(out), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    assert "calibrate" in result.stderr and "held-out" in result.stdout
    report = json.loads((out / "report.json").read_text())
    q = report["quality"]
    assert q["eval_tokens"] > 1000 and q["agreement_tokens"] == 4 * 64
    assert q["reference_perplexity"] < 30  # the trained model (uniform would be 1024)
    assert 0 < q["ppl_delta"] <= report["recipe"]["max_ppl_delta"]
    # Decided on held-out quality; the windows used are on record (--max-seq 256 holds the 128-token window).
    assert report["status"] == "pass" and report["verdict_basis"] == "held-out quality and the validation prompt"
    assert (q["window"], q["windows"], q["window_cut_to_max_seq"]) == (128, 16, False)
    assert report["numerics"]["max_rel_error"] <= report["recipe"]["tolerance"]["max_rel_logit_error"]
    card = (out / "report.md").read_text()
    assert "Decided on held-out quality and the validation prompt." in card
    assert "| perplexity windows | 16 x 128 tokens |" in card
    assert report["calibration"]["tokens"] >= 4096 and report["eval_data"] == "built-in held-out sample"
    # Every linear layer of the 4 blocks is INT4-AWQ; lm_head is not in the map (kept FP16).
    assert len(report["precision"]) == 28 and set(report["precision"].values()) == {"int4-awq"}
    assert "lm_head" not in report["precision"]
    w = report["weights"]
    assert w["by_dtype"]["int4"]["elements"] == sum(
        p["in"] * p["out"] for p in [{"in": 256, "out": 256}, {"in": 256, "out": 64}, {"in": 256, "out": 64},
                                     {"in": 256, "out": 256}, {"in": 256, "out": 512}, {"in": 256, "out": 512},
                                     {"in": 512, "out": 256}]) * 4
    onnx_bytes = report["sizes_bytes"]["model.onnx"]
    assert onnx_bytes < 0.5 * w["fp16_bytes"] and onnx_bytes >= w["floor_bytes"]


def test_perplexity_budget_fails_the_build_with_the_figure(tmp_path, cache_dir):
    data = yaml.safe_load((RECIPES_DIR / "int4-rtn.yaml").read_text())
    data["max_ppl_delta"] = 0.0001
    recipe = tmp_path / "strict.yaml"
    recipe.write_text(yaml.safe_dump(data))
    out = tmp_path / "strict"
    result = CliRunner().invoke(main, ["build", "--recipe", str(recipe), "-o", str(out), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 5, result.output
    assert "held-out perplexity rose" in result.stderr and "max_ppl_delta 0.01%" in result.stderr
    assert "less aggressive recipe (int4-gptq, int8-wo or fp8-wo)" in result.stderr
    assert not out.exists()
    report = json.loads((tmp_path / "strict.failed" / "report.json").read_text())
    assert report["status"] == "fail" and report["quality"]["ppl_delta"] > 0.0001
    assert f"held-out perplexity rose {report['quality']['ppl_delta']:.2%}" in result.stderr  # the figure itself


def test_bad_calibration_file_fails_before_any_work(tmp_path):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"txt": "no text field"}\n')
    result = CliRunner().invoke(main, ["build", "--recipe", "int4-awq", "--calib-data", str(bad), "-o", str(tmp_path / "o")])
    assert result.exit_code == 2 and "calib.jsonl:1" in result.stderr and '"text"' in result.stderr
    assert not (tmp_path / "o").exists()


def test_quantizing_build_without_quality_warns_that_wiring_alone_decided(tmp_path, cache_dir):
    out = tmp_path / "rtn"
    result = CliRunner().invoke(main, ["build", "--recipe", "int4-rtn", "--no-measure-quality", "-o", str(out),
                                       "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["quality"] is None and report["verdict_basis"] == "the validation prompt"
    assert any("wiring check alone" in w for w in report["warnings"]) and "wiring check alone" in result.stderr


def test_fp8_w8a8_build_quantizes_weights_and_activations(tmp_path, cache_dir):
    """`llmc build --recipe fp8`: every decoder matmul's weight FP8 and its input behind a calibrated FP8
    Q/DQ in model.onnx, TensorRT-RTX built QUANTIZE layers for them, and held-out quality in budget."""
    out = tmp_path / "fp8"
    result = CliRunner().invoke(main, ["build", "--recipe", "fp8", "-o", str(out), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "pass" and report["verdict_basis"] == "held-out quality and the validation prompt"
    assert len(report["precision"]) == 28 and set(report["precision"].values()) == {"fp8-w8a8"}
    q = report["quality"]
    assert 0 < q["ppl_delta"] <= report["recipe"]["max_ppl_delta"] and q["kl_mean"] <= report["recipe"]["max_kl"]
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    quantizes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizes) == 4 * 4  # per block: the q/k/v input, o_proj's, the gate/up input, down_proj's
    zeros = {i.name: i for i in proto.graph.initializer}
    assert {zeros[n.input[2]].data_type for n in quantizes} == {onnx.TensorProto.FLOAT8E4M3FN}
    assert report["engine"]["layer_types"]["QUANTIZE"] == len(quantizes)
    assert report["weights"]["by_dtype"]["float8e4m3fn"]["elements"] >= 2_228_224  # the 28 block projections


def test_int8_sq_build_folds_smoothing_and_quantizes_activations(tmp_path, cache_dir):
    """`llmc build --recipe int8-sq`: INT8 weights, a calibrated INT8 Q/DQ on every decoder matmul's input,
    SmoothQuant's scales in the norms (the artifact's norm weights differ from the checkpoint's)."""
    out = tmp_path / "sq"
    result = CliRunner().invoke(main, ["build", "--recipe", "int8-sq", "-o", str(out), "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "pass" and set(report["precision"].values()) == {"int8-sq"}
    q = report["quality"]
    assert q["ppl_delta"] <= report["recipe"]["max_ppl_delta"] and q["kl_mean"] <= report["recipe"]["max_kl"]
    proto = onnx.load(str(out / "model.onnx"))
    inits = {i.name: i for i in proto.graph.initializer}
    quantizes = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizes) == 16 and {inits[n.input[2]].data_type for n in quantizes} == {onnx.TensorProto.INT8}
    assert report["engine"]["layer_types"]["QUANTIZE"] == 16
    norm = numpy_helper.to_array(inits["model.model.layers.0.input_layernorm.weight"])
    original = load_file(default_model_dir() / "model.safetensors")["model.layers.0.input_layernorm.weight"]
    assert norm.shape == original.shape and not np.allclose(norm, original, rtol=1e-2)


def test_w8a8_budget_miss_points_to_the_weight_only_recipes(tmp_path, cache_dir):
    data = yaml.safe_load((RECIPES_DIR / "fp8.yaml").read_text())
    data["max_ppl_delta"] = 0.0001
    recipe = tmp_path / "fp8.yaml"
    recipe.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["build", "--recipe", str(recipe), "-o", str(tmp_path / "o"),
                                       "--cache-dir", str(cache_dir)])
    assert result.exit_code == 5, result.output
    assert "held-out perplexity rose" in result.stderr and "less aggressive recipe (fp8-wo or int8-wo)" in result.stderr


@pytest.mark.parametrize("recipe, hint", [
    ("int4-awq", "int4-gptq, int8-wo or fp8-wo"),  # the INT4 recipe that lost least on Gemma 3 270M
    ("int4-gptq", "int8-wo or fp8-wo"),           # never suggests itself
    ("int8-sq", "fp8-wo or int8-wo"),
    ("fp8-wo", "fp16"),
])
def test_a_failed_build_suggests_a_less_aggressive_recipe(recipe, hint):
    from compiler.driver.build import _safer_recipe

    assert _safer_recipe(recipe) == hint
