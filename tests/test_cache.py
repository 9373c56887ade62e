"""CI artifact builds: the stage cache, byte-identical ONNX, manifest.json and `llmc inspect`.

Every build here starts from the session's one cold build (conftest `cached_build`), so only the
stages a test changes are recomputed.
"""

import json
import shutil
import time

from click.testing import CliRunner

from compiler.commands.cli import main
from compiler.report.manifest import file_sha256
from compiler.recipe import load_recipe

FP16_PASSES = f"[{', '.join(load_recipe('fp16').passes)}]"  # the default build's passes, so its cache entries match
FP16_TOLERANCE = "{max_abs_logit_error: 0.1, mean_abs_logit_error: 0.01, min_greedy_agreement: 0.94}"


def _build(model, out, cache, *extra):
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["build", str(model), "--max-seq", "128", "-o", str(out), "--cache-dir",
                                       str(cache), *extra])
    return result, time.perf_counter() - start


def _hits(out) -> dict[str, bool]:
    report = json.loads((out / "report.json").read_text())
    return {stage: v["hit"] for stage, v in report["cache"]["stages"].items()}


def test_unchanged_rebuild_hits_every_stage_and_is_much_faster(cached_build, model_dirs, tmp_path):
    first, cache, cold_report, cold_seconds = cached_build
    assert not any(_hits(first).values())  # the cold build computed everything
    out = tmp_path / "again"
    result, seconds = _build(model_dirs["llama"], out, cache)
    assert result.exit_code == 0, result.output
    assert _hits(out) == {"export": True, "passes": True, "build": True, "validate": True}
    assert "[1/11] load      skipped" in result.stderr and "[8/11] validate  done in" in result.stderr
    assert result.stderr.count("cached ") == 3  # passes, build, validate (export is not even read)
    assert "export hit, passes hit, build hit, validate hit" in result.stdout
    assert seconds < cold_seconds / 5, (seconds, cold_seconds)
    for name in ("model.onnx", "model.plan"):
        assert (out / name).read_bytes() == (first / name).read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["numerics"] == cold_report["numerics"] | {"seconds": report["numerics"]["seconds"]}
    assert report["model"]["parameters"] == cold_report["model"]["parameters"] > 0
    print(f"cold build {cold_seconds:.1f} s, all-stages-cached rebuild {seconds:.2f} s")


def test_changing_passes_reuses_export_only(cached_build, model_dirs, tmp_path):
    _, cache, _, _ = cached_build
    recipe = tmp_path / "no-final-cleanup.yaml"
    recipe.write_text("name: no-final-cleanup\npasses: [cleanup, rotary-2d-cache, gqa-native-attention, "
                      f"kv-cache-scatter, cast-fp16]\ntolerance: {FP16_TOLERANCE}\n")
    out = tmp_path / "other-passes"
    result, _ = _build(model_dirs["llama"], out, cache, "--recipe", str(recipe))
    assert result.exit_code == 0, result.output
    assert _hits(out) == {"export": True, "passes": False, "build": False, "validate": False}
    assert "[4/11] export    done" in result.stderr and "pass cast-fp16" in result.stderr


def test_changing_max_batch_rebuilds_only_the_engine(cached_build, model_dirs, tmp_path):
    _, cache, _, _ = cached_build
    out = tmp_path / "batch2"
    result, _ = _build(model_dirs["llama"], out, cache, "--max-batch", "2")
    assert result.exit_code == 0, result.output
    assert _hits(out) == {"export": True, "passes": True, "build": False, "validate": True}
    assert json.loads((out / "manifest.json").read_text())["build"]["max_batch"] == 2


def test_changing_tolerance_only_rejudges_the_cached_measurement(cached_build, model_dirs, tmp_path):
    first, cache, cold_report, _ = cached_build
    recipe = tmp_path / "strict.yaml"
    recipe.write_text(f"name: strict\npasses: {FP16_PASSES}\ntolerance: {{max_abs_logit_error: 1.0e-6, "
                      "mean_abs_logit_error: 1.0e-7, min_greedy_agreement: 1.0}\n")
    out = tmp_path / "strict"
    result, _ = _build(model_dirs["llama"], out, cache, "--recipe", str(recipe))
    assert result.exit_code == 5 and "max |logit error|" in result.stderr
    assert not out.exists()
    failed = out.with_name("strict.failed")
    assert _hits(failed) == {"export": True, "passes": True, "build": True, "validate": True}
    assert json.loads((failed / "report.json").read_text())["numerics"]["max_abs_error"] == \
        cold_report["numerics"]["max_abs_error"]


def test_same_inputs_give_byte_identical_onnx(cached_build, llama, llama_export, tmp_path):
    """Two exports of the same model (the build's, in memory; the session's, saved and re-loaded) +
    the fp16 recipe's passes -> the same model.onnx bytes."""
    from compiler.recipe import load_recipe
    from conftest import final_graph

    first, cache, _, _ = cached_build
    exported = next(cache.glob("export/*/model.onnx"))
    assert file_sha256(exported) == file_sha256(llama_export[0])  # export itself is deterministic
    again = final_graph(llama, tmp_path / "again.onnx", passes=load_recipe("fp16").passes, capacity=128,
                        exported=llama_export[0])
    assert file_sha256(again) == file_sha256(first / "model.onnx")


def test_model_onnx_names_no_path_of_the_checkout_or_the_environment(cached_build):
    """The artifact's bytes do not depend on where llmc or its Python environment is installed (torch.onnx
    writes each node's stack trace, with absolute file paths, into its metadata: the export drops it)."""
    import sys
    from pathlib import Path

    first, cache, _, _ = cached_build
    checkout = str(Path(__file__).resolve().parents[1]).encode()
    for path in (first / "model.onnx", next(cache.glob("export/*/model.onnx"))):
        data = path.read_bytes()
        assert checkout not in data and sys.prefix.encode() not in data and b"site-packages" not in data, path
        assert b"pkg.torch.onnx.name_scopes" in data  # the node metadata stamping reads is kept


def test_manifest_lists_every_file_with_hash_and_versions(cached_build):
    out, _, report, _ = cached_build
    manifest = json.loads((out / "manifest.json").read_text())
    files = {f["path"]: f for f in manifest["files"]}
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(files) == on_disk and "model.plan" in files and "tokenizer/tokenizer.json" in files
    for path, entry in files.items():
        assert entry["sha256"] == file_sha256(out / path) and entry["size"] == (out / path).stat().st_size
    for tool in ("llmc", "torch", "onnx", "onnxruntime"):
        assert tool in manifest["versions"]
    assert manifest["backend"]["name"] == report["backend"]["name"]
    assert manifest["backend"]["version"] == report["backend"]["version"]
    build = manifest["build"]
    assert (build["recipe"], build["max_batch"], build["max_seq"], build["dtype"]) == ("fp16", 1, 128, "float32")  # logits-fp32-topk
    assert build["recipe_sha256"] == file_sha256(report["recipe"]["source"])


def test_inspect_verifies_hashes_and_warns_on_backend_mismatch(cached_build, tmp_path):
    out, _, report, _ = cached_build
    ok = CliRunner().invoke(main, ["inspect", str(out)])
    assert ok.exit_code == 0, ok.output
    listed = len(json.loads((out / "manifest.json").read_text())["files"])
    assert {"report.md", "weights.png"} <= {f["path"] for f in json.loads((out / "manifest.json").read_text())["files"]}
    assert f"manifest: {listed} files verified" in ok.stdout and "model.plan" in ok.stdout
    assert report["backend"]["version"] in ok.stdout and "warning" not in ok.stderr

    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    config = next(copy.glob("triton/*/config.pbtxt"))
    config.write_text(config.read_text() + "\n# edited\n")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["backend"]["version"] = "0.0.1"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    bad = CliRunner().invoke(main, ["inspect", str(copy)])
    assert bad.exit_code == 2
    assert "MODIFIED" in bad.stdout and f"{config.relative_to(copy).as_posix()}" in bad.stderr
    assert "built by" in bad.stderr and "0.0.1" in bad.stderr and report["backend"]["version"] in bad.stderr

    missing = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert missing.exit_code == 2 and "no manifest.json" in missing.stderr
