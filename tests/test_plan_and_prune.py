"""`llmc build --plan` (each stage's cache hit or skip reason, before any work) and the stage cache's bound
(`llmc cache prune`, least recently used first out)."""

from __future__ import annotations

import os
import shutil

from click.testing import CliRunner

from compiler.commands.cli import main
from compiler.driver.build import STAGES
from compiler.driver.cache import StageCache


def _plan(model, out, cache, *extra) -> dict[str, str]:
    result = CliRunner().invoke(main, ["build", str(model), "--max-seq", "128", "-o", str(out), "--cache-dir",
                                       str(cache), "--plan", *extra])
    assert result.exit_code == 0, result.output
    lines = [line.split(None, 2) for line in result.stdout.splitlines() if line.startswith("[")]
    assert [name for _, name, _ in lines] == list(STAGES)
    return {name: what for _, name, what in lines}


def test_plan_of_an_unchanged_build_names_every_cache_hit_and_writes_nothing(cached_build, model_dirs, tmp_path):
    _, cache, report, _ = cached_build
    keys = {stage: v["key"] for stage, v in report["cache"]["stages"].items()}
    plan = _plan(model_dirs["llama"], tmp_path / "out", cache)
    for stage in ("passes", "build", "validate"):
        assert plan[stage] == f"cached {keys[stage][:12]}", plan
    assert plan["load"].startswith("skipped") and plan["export"] == "skipped: passes are cached"
    assert plan["calibrate"] == "skipped: no pass of this recipe calibrates"
    assert plan["package"] == "run"
    assert not (tmp_path / "out").exists()  # the plan does no work


def test_plan_runs_from_the_first_stage_a_change_touches(cached_build, model_dirs, tmp_path):
    _, cache, report, _ = cached_build
    plan = _plan(model_dirs["llama"], tmp_path / "out", cache, "--recipe", "int8-wo")
    assert plan["export"].startswith("cached ")  # same model, same exporter
    assert plan["load"] == "run"  # the reference (quality) reads the model
    assert plan["passes"] == plan["build"] == plan["validate"] == plan["quality"] == "run"


def test_plan_checks_inputs_like_a_build(model_dirs, tmp_path):
    result = CliRunner().invoke(main, ["build", str(model_dirs["llama"]), "--plan", "--recipe", "no-such-recipe",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code != 0 and "no-such-recipe" in result.output


def _fill(root, sizes):
    """Entries of the given byte sizes, stored oldest first (last use one second apart)."""
    cache = StageCache(root, max_bytes=1 << 40)
    for i, size in enumerate(sizes):
        payload = root.parent / f"payload-{i}"
        payload.write_bytes(b"x" * size)
        cache.put("export", f"k{i}", {"model.onnx": payload}, {"i": i})
        meta = root / "export" / f"k{i}" / "meta.json"
        os.utime(meta, (1_000_000 + i, 1_000_000 + i))
    return cache


def test_store_keeps_the_cache_under_its_byte_bound_dropping_least_recently_used(tmp_path):
    cache = _fill(tmp_path / "c", [1000, 1000, 1000])
    cache.get("export", "k0")  # a hit refreshes k0: k1 is now the least recently used
    bounded = StageCache(tmp_path / "c", max_bytes=2500)
    payload = tmp_path / "new"
    payload.write_bytes(b"y" * 1000)
    bounded.put("export", "k3", {"model.onnx": payload}, {})
    left = {entry.name for _, _, entry in bounded.entries()}
    assert left == {"k0", "k3"}  # two of ~1 KB entries fit in 2500 bytes with their meta.json; k1, k2 went
    assert sum(size for _, size, _ in bounded.entries()) <= 2500


def test_cache_prune_command_applies_count_and_size_bounds(tmp_path):
    _fill(tmp_path / "c", [2000, 2000, 2000, 2000])
    runner = CliRunner()
    result = runner.invoke(main, ["cache", "prune", str(tmp_path / "c"), "--max-entries", "2"])
    assert result.exit_code == 0, result.output
    assert "removed 2 entries; 2 left" in result.stdout
    assert sorted(e.name for _, _, e in StageCache(tmp_path / "c").entries()) == ["k2", "k3"]
    result = runner.invoke(main, ["cache", "prune", str(tmp_path / "c"), "--max-gb", "0"])
    assert result.exit_code == 0 and "removed 2 entries; 0 left" in result.stdout
    assert not [p for p in (tmp_path / "c" / "export").iterdir() if not p.name.startswith(".")]
    result = runner.invoke(main, ["cache", "prune", str(tmp_path / "c"), "--max-entries", "-1"])
    assert result.exit_code == 2 and "must be >= 0" in result.output


def test_a_real_build_cache_prunes_to_its_newest_entries(cached_build, tmp_path):
    _, cache, _, _ = cached_build
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    before = StageCache(copy).entries()
    assert len(before) >= 4
    newest = before[-1][2].relative_to(copy)
    result = CliRunner().invoke(main, ["cache", "prune", str(copy), "--max-entries", "1"])
    assert result.exit_code == 0, result.output
    assert [e.relative_to(copy) for _, _, e in StageCache(copy).entries()] == [newest]
