"""`llmc build` end to end, as a user runs it (bad input and faults: test_bad_input.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from compiler.commands.cli import main

LAYOUT = ["manifest.json", "model.onnx", "model.plan", "report.json", "report.md", "tokenizer", "triton", "weights.png"]


def _check_artifact(out: Path, arch: str) -> dict:
    assert sorted(p.name for p in out.iterdir()) == LAYOUT
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "pass"
    assert report["model"]["architecture"] == arch
    assert set(report["timings_s"]) >= {"load", "export", "passes", "build", "validate", "package", "total"}
    assert report["numerics"]["passed"] and report["numerics"]["decode_steps"] >= 16
    assert report["numerics"]["max_abs_error"] <= report["recipe"]["tolerance"]["max_abs_logit_error"]
    assert report["engine"]["layer_types"].get("ATTENTION_INPUT", 0) >= 1
    assert report["engine"]["layer_types"].get("ROTARY_EMBEDDING", 0) >= 1
    layers = report["model"]["spec"]["num_layers"]
    assert report["engine"]["layer_types"].get("KV_CACHE_UPDATE", 0) == 2 * layers  # in-place K and V per layer
    assert report["engine"]["layer_types"].get("ATTENTION_INPUT", 0) == layers
    assert report["sizes_bytes"]["model.plan"] == (out / "model.plan").stat().st_size
    for tool in ("torch", "onnx", "onnxruntime", "transformers"):
        assert tool in report["versions"]
    model_dir = out / report["triton_model"]
    cfg = text_format.Parse((model_dir / "config.pbtxt").read_text(), mc.ModelConfig())
    # llm: llmc's scheduler over the engine (ids in, ids out); the KV cache never crosses Triton
    assert cfg.backend == "python" and cfg.model_transaction_policy.decoupled and not cfg.HasField("sequence_batching")
    assert [i.name for i in cfg.output] == ["output_ids"]
    assert (model_dir / "1" / "model.plan").read_bytes() == (out / "model.plan").read_bytes()
    # Nothing half-written left next to the output.
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return report


def test_default_build_subprocess(tmp_path, build_cache):
    """`llmc build` with no model: bundled trained tiny Llama, exit 0, summary ending in pass.

    It shares the run's stage cache, so the export of the bundled model is made once per test run."""
    out = tmp_path / "default"
    proc = subprocess.run([sys.executable, "-m", "compiler.commands.cli", "build", "-o", str(out), "--cache-dir", str(build_cache)],
                          capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "result: pass"
    assert "[11/11] package" in proc.stderr
    report = _check_artifact(out, "LlamaForCausalLM")
    assert report["model"]["name"] == "llmc-tiny-shakespeare"
    # This process's own peak (torch, onnxruntime and TensorRT loaded: over 200 MB); a model this small is
    # built in-process, so there is no builder child to report.
    assert 200 << 20 < report["memory"]["llmc_process_peak_rss_bytes"] < 16 << 30
    assert report["memory"]["builder_peak_rss_bytes"] is None

    # `llmc generate` on the artifact: the runner over model.onnx, with the copied tokenizer.
    gen = CliRunner().invoke(main, ["generate", str(out), "--prompt", "The compiler", "--prompt",
                                    "Once upon a time", "--max-new-tokens", "8"])
    assert gen.exit_code == 0, gen.output
    assert "time to first token" in gen.stdout and "tokens/s" in gen.stdout
    assert gen.stdout.count("The compiler") == 1 and "Once upon a time" in gen.stdout
    trt = CliRunner().invoke(main, ["generate", str(out), "--prompt", "x", "--executor", "tensorrt"])
    from compiler.engine.backend import get_backend

    if get_backend().execution_unavailable_reason():
        assert trt.exit_code == 4 and "cannot run model.plan here" in trt.stderr


@pytest.mark.parametrize("arch,cls", [("qwen2", "Qwen2ForCausalLM"), ("mistral", "MistralForCausalLM")])
def test_build_other_architectures(model_dirs, build_cache, tmp_path, arch, cls):
    out = tmp_path / arch
    result = CliRunner().invoke(main, ["build", str(model_dirs[arch]), "--max-batch", "2", "--max-seq", "128", "-o", str(out),
                                       "--cache-dir", str(build_cache)])
    assert result.exit_code == 0, result.output
    report = _check_artifact(out, cls)
    assert report["options"] == {"max_batch": 2, "max_seq": 128}


def test_out_of_tolerance_fails_with_exit_5_and_keeps_nothing_at_output(model_dirs, build_cache, tmp_path):
    recipe = tmp_path / "too-strict.yaml"
    recipe.write_text(
        "name: too-strict\npasses: [cleanup, rotary-2d-cache, gqa-native-attention, kv-cache-scatter, cast-fp16]\n"
        "tolerance: {max_abs_logit_error: 1.0e-7, mean_abs_logit_error: 1.0e-8, min_greedy_agreement: 1.0}\n"
    )
    out = tmp_path / "strict"
    result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "--recipe", str(recipe), "-o", str(out),
                                       "--cache-dir", str(build_cache)])
    assert result.exit_code == 5
    assert "max |logit error|" in result.stderr and "too-strict" in result.stderr
    assert not out.exists()
    failed = tmp_path / "strict.failed"
    assert json.loads((failed / "report.json").read_text())["status"] == "fail"


def test_llmc_command_exits_fast_with_its_output_and_codes(tmp_path):
    """The `llmc` command leaves through compiler.commands.cli.run (os._exit, skipping the interpreter's
    teardown): piped output is still complete and every exit code is still the documented one."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["llmc"] == "compiler.commands.cli:run"
    cli = [sys.executable, "-m", "compiler.commands.cli"]
    codes = subprocess.run([*cli, "exit-codes"], capture_output=True, text=True, timeout=300)
    assert codes.returncode == 0 and codes.stdout.strip().splitlines()[-1].startswith("143")  # flushed to the pipe
    missing = subprocess.run([*cli, "build", str(tmp_path / "missing")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2 and "model directory not found" in missing.stderr
    usage = subprocess.run([*cli, "build", "--no-such-option"], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "No such option" in usage.stderr
    assert not (tmp_path / "missing").exists()
