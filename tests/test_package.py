"""The output directory appears whole or not at all."""

import pytest

from compiler.driver.staged_output import StagedOutput
from compiler.report.report_json import tool_versions


def test_failure_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with StagedOutput(out) as staged:
            (staged.path / "model.onnx").write_text("half")
            raise RuntimeError("interrupted")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_commit_replaces_previous_build(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with StagedOutput(out) as staged:
        (staged.path / "report.json").write_text("{}")
        staged.commit()
    assert sorted(p.name for p in out.iterdir()) == ["report.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_versions_name_the_tools():
    versions = tool_versions()
    for tool in ("python", "torch", "onnx", "onnxruntime", "transformers"):
        assert tool in versions


def test_orphaned_staging_of_a_dead_build_is_removed(tmp_path):
    orphan = tmp_path / ".out.staging-999999999"
    orphan.mkdir()
    (orphan / "model.onnx").write_text("half")
    with StagedOutput(tmp_path / "out") as staged:
        staged.commit()
    assert not orphan.exists() and (tmp_path / "out").is_dir()


def test_output_path_guard_protects_foreign_directories(tmp_path, monkeypatch):
    from compiler.driver.preflight import check_output_path
    from compiler.errors import BadInputError

    model = tmp_path / "model"
    model.mkdir()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("precious")
    monkeypatch.chdir(tmp_path)
    for bad, why in [(tmp_path, "current directory"), (model, "overlaps"), (model / "out", "overlaps"),
                     (foreign, "not an llmc artifact")]:
        with pytest.raises(BadInputError, match=why):
            check_output_path(bad, model)
    assert (foreign / "keep.txt").read_text() == "precious"
    previous = tmp_path / "previous-build"
    previous.mkdir()
    (previous / "report.json").write_text("{}")
    check_output_path(previous, model)  # an earlier llmc build may be replaced
    check_output_path(tmp_path / "new", model)
