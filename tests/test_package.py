"""The output directory appears whole or not at all."""

import pytest

from compiler.package import StagedOutput, tool_versions


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
