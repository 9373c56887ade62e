"""`llmc bench` (compiler/serving/bench.py): the limits copied into a served repository (checked with
Triton's ModelConfig proto), the choice under a time-to-first-token objective, the cost figure, the
limits file `llmc serve` applies, and clear refusals. The load generator itself (aiperf, its own venv)
runs in the slow test only, where it is installed."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
from click.testing import CliRunner
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from compiler.commands.cli import main
from compiler.serving.bench import Limits, choose, cost_per_million, limits_file, read_limits, repository_with


@pytest.fixture(scope="module")
def artifact(model_dirs, build_cache, tmp_path_factory):
    from compiler.driver.build import BuildRequest, run_build
    from compiler.engine.engine_build import BuildOptions

    out = tmp_path_factory.mktemp("bench") / "tiny"
    run_build(BuildRequest(model=model_dirs["llama"], output=out, options=BuildOptions(max_batch=1, max_seq=64),
                           triton_cpu_fallback=True, cache_dir=build_cache))
    return out


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def scheduler_limits(repo, model):
    config = text_format.Parse((repo / model / "config.pbtxt").read_text(), mc.ModelConfig())
    return (int(config.parameters["llmc_scheduler_max_batch"].string_value),
            int(config.parameters["llmc_scheduler_tokens_per_step"].string_value))


def test_a_served_copy_carries_the_limits_and_the_artifact_stays_as_built(artifact, tmp_path):
    before = digest(artifact)
    repo = repository_with(artifact, Limits(5, 48), tmp_path)
    assert scheduler_limits(repo, "generate") == (5, 48) and scheduler_limits(repo, "llm_onnx") == (5, 48)
    assert scheduler_limits(artifact / "triton", "generate") != (5, 48)
    assert digest(artifact) == before
    static = repository_with(artifact, Limits(4, 64, static=True), tmp_path)
    config = text_format.Parse((static / "generate" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.parameters["llmc_scheduler_policy"].string_value == "static"
    assert scheduler_limits(static, "llm_onnx") == (4, 64)
    config = text_format.Parse((repo / "generate" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.parameters["llmc_scheduler_policy"].string_value == "inflight"
    plan = repo / "llm" / "1" / "model.plan"
    assert os.path.samefile(plan, artifact / "triton" / "llm" / "1" / "model.plan")  # hard-linked, not copied


def test_serve_applies_the_limits_file_from_a_copy(artifact, tmp_path, capsys):
    from rich.console import Console

    from compiler.serving.serve import served_repository

    console = Console(file=None, highlight=False)
    repo, copy = served_repository(artifact, console)
    assert repo == artifact / "triton" and copy is None
    limits_file(artifact).write_text(json.dumps({"max_batch": 3, "tokens_per_step": 30}))
    try:
        repo, copy = served_repository(artifact, console)
        assert scheduler_limits(repo, "generate") == (3, 30) and copy is not None and repo.is_relative_to(copy)
        assert "scheduler limits from" in capsys.readouterr().out
        shutil.rmtree(copy)
        limits_file(artifact).write_text("{\"max_batch\": \"x\"}")
        with pytest.raises(Exception, match="is not a serving limits file"):
            read_limits(artifact)
    finally:
        limits_file(artifact).unlink()


def row(limits, concurrency, ttft, tokens_per_s):
    return {"limits": limits.label, "max_batch": limits.max_batch, "tokens_per_step": limits.tokens_per_step,
            "concurrency": concurrency, "time_to_first_token": {"p50": ttft, "p99": ttft * 2},
            "output_token_throughput": {"avg": tokens_per_s}}


def test_the_choice_is_the_fastest_setting_that_meets_the_objective():
    rows = [row(Limits(0), 16, 9000.0, 80.0), row(Limits(16, 256), 16, 400.0, 300.0),
            row(Limits(16, 256), 64, 2500.0, 420.0), row(Limits(8, 64), 64, 450.0, 350.0)]
    assert choose(rows, 500)["max_batch"] == 8 and choose(rows, 500)["concurrency"] == 64
    assert choose(rows, 3000)["output_token_throughput"]["avg"] == 420.0
    assert choose(rows, 100) is None
    lone_fast = rows + [row(Limits(4, 64, static=True), 1, 20.0, 900.0)]  # fastest, but one client
    assert choose(lone_fast, 500)["max_batch"] == 8


def test_cost_per_million_tokens_is_the_hourly_price_over_the_hours_tokens():
    tokens_per_hour = 250.0 * 3600
    assert cost_per_million(250.0, 2.0) == pytest.approx(2.0 / tokens_per_hour * 1e6)
    assert cost_per_million(0.0, 2.0) == float("inf")


def test_bench_refuses_a_missing_load_generator_and_a_non_artifact(artifact, tmp_path):
    result = CliRunner().invoke(main, ["bench", str(artifact), "--aiperf", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no aiperf executable" in result.output and "pip install aiperf" in result.output
    fake = tmp_path / "aiperf"
    fake.write_text("#!/bin/sh\nexit 3\n")
    fake.chmod(0o755)
    result = CliRunner().invoke(main, ["bench", str(tmp_path), "--aiperf", str(fake)])
    assert result.exit_code == 2 and "has no Triton repository" in result.output
    result = CliRunner().invoke(main, ["bench", str(artifact), "--aiperf", str(fake), "--concurrency", "4,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


@pytest.mark.slow
def test_bench_drives_the_server_with_aiperf(artifact, tmp_path):
    aiperf = os.environ.get("LLMC_AIPERF") or shutil.which("aiperf")
    if not aiperf:
        pytest.skip("aiperf is not installed (its own venv: pip install aiperf; LLMC_AIPERF=V/bin/aiperf)")
    out = tmp_path / "bench"
    result = CliRunner().invoke(main, ["bench", str(artifact), "--aiperf", aiperf, "--concurrency", "1,4",
                                       "--max-batch", "0,4", "--tokens-per-step", "32", "--requests-per-client", "2",
                                       "--isl", "8", "--osl", "8", "--price-per-hour", "1", "--slo-ttft-ms", "60000",
                                       "-o", str(out)])
    try:
        assert result.exit_code == 0, result.output
        report = json.loads((out / "bench.json").read_text())
        assert [(r["max_batch"], r["concurrency"]) for r in report["runs"]] == [(0, 1), (0, 4), (4, 1), (4, 4)]
        for r in report["runs"]:
            assert r["output_token_throughput"]["avg"] > 0 and r["cost_per_million_output_tokens"] > 0
        assert read_limits(artifact) == Limits(report["chosen"]["max_batch"], report["chosen"]["tokens_per_step"])
        assert "| limits | concurrency |" in (out / "bench.md").read_text()
    finally:
        limits_file(artifact).unlink(missing_ok=True)
