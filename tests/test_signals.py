"""SIGINT / SIGTERM at any moment of a build: exit 130 / 143, and the previous artifact untouched.

Each signal is raised by the build's own process at a chosen point (deterministic, unlike a timed
`kill`): at the start and the end of every stage (the progress line), in the middle of the stages
that run (right after the call that does the stage's work), and inside an object finalizer just
after a stage's progress line, where Python discards the handler's exception ("Exception ignored
in ...") as it did for the gc.collect after the export. One fresh interpreter per signal runs
every point's build in turn (`main()` again and again) on the session's stage cache, so each build
takes about a second; the exhaustive variant adds --measure-quality, so that load, reference and
quality run too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.driver.build import STAGES

_DRIVER = r"""
import contextlib, io, json, shutil, signal, sys
from pathlib import Path
import compiler.commands.cli as cli
import importlib

signum, model, work, cache, flags = int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4], json.loads(sys.argv[5])
points = [tuple(p) for p in json.loads(sys.argv[6])]
PREVIOUS = {"report.json": '{"previous": true}\n', "model.onnx": "previous build\n"}
state = {"point": None, "fired": False}


class Bomb:
    def __del__(self):  # an exception raised in a finalizer is printed and discarded by Python
        signal.raise_signal(signum)


def fire(kind, where):
    if state["fired"] or state["point"] != (kind, where):
        return
    state["fired"] = True
    if kind == "finalizer":
        Bomb()
    else:
        signal.raise_signal(signum)  # the handler runs at the next bytecode, as for a signal from outside


class Triggering(cli.RichProgress):
    def stage_start(self, index, name):
        fire("start", name)
        super().stage_start(index, name)

    def stage_end(self, index, name, seconds, detail=""):
        super().stage_end(index, name, seconds, detail)
        fire("end", name)
        fire("finalizer", name)


def wrap(name):
    module_name, function = name.split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, function)

    def wrapped(*args, **kwargs):
        result = real(*args, **kwargs)
        fire("mid", name)
        return result

    setattr(module, function, wrapped)


cli.RichProgress = Triggering
for kind, name in points:
    if kind == "mid":
        wrap(name)
results = []
for point in points:
    out = work / point[0] / point[1] / "artifact"
    out.mkdir(parents=True)
    for name, text in PREVIOUS.items():
        (out / name).write_text(text)
    state.update(point=point, fired=False)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            cli.main(["build", model, "--max-seq", "128", "-o", str(out), "--cache-dir", cache, *flags])
            code = 0
        except SystemExit as exc:
            code = exc.code
    untouched = (sorted(p.name for p in out.iterdir()) == sorted(PREVIOUS)
                 and all((out / name).read_text() == text for name, text in PREVIOUS.items())
                 and [p.name for p in out.parent.iterdir()] == ["artifact"])
    lines = err.getvalue().strip().splitlines()
    results.append({"point": point, "fired": state["fired"], "code": code, "untouched": untouched,
                    "last": lines[-1] if lines else ""})
    shutil.rmtree(work / point[0] / point[1])
Path(sys.argv[7]).write_text(json.dumps(results))
"""

# The functions that do each stage's work on a cached rebuild (restores, re-judging, packaging).
_MID_CACHED = ("compiler.stages.passes:restore_files", "compiler.stages.validate:rejudge",
               "compiler.stages.package:copy_tokenizer", "compiler.stages.package:write_repository",
               "compiler.driver.build:write_report", "compiler.driver.build:write_card",
               "compiler.driver.build:write_manifest")
# With --measure-quality the PyTorch model is loaded and the held-out text scored, uncached.
_MID_QUALITY = ("compiler.stages.load:load_model", "compiler.stages.reference:quality_reference",
                "compiler.stages.quality:score")


def _run_points(signum: int, model: Path, cache: Path, tmp_path: Path, flags: list[str], points) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(int(signum)), str(model), str(tmp_path / "work"),
                           str(cache), json.dumps(flags), json.dumps(points), str(tmp_path / "results.json")],
                          capture_output=True, text=True, errors="replace", timeout=1200, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "results.json").read_text())


def _assert_stopped_everywhere(results: list[dict], signum: int) -> None:
    assert results
    for r in results:
        assert r["fired"], f"point {r['point']} was never reached: {r}"
        assert r["code"] == 128 + signum, r
        assert r["untouched"], r
        assert r["last"].startswith("llmc: error: build ") and "previous build or nothing" in r["last"], r


# The cached rebuild's points: every stage's progress line (the skipped ones print one too), a finalizer
# right after each (the export line is where the swallowed Ctrl-C was), and the middle of the
# stages that do work.
_CACHED_POINTS = ([("end", s) for s in STAGES] + [("finalizer", s) for s in STAGES]
                  + [("start", s) for s in ("passes", "build", "validate", "package")]
                  + [("mid", f) for f in _MID_CACHED])
_QUICK_POINTS = [("finalizer", "export"), ("end", "export"), ("start", "passes"), ("mid", "compiler.stages.passes:restore_files"),
                 ("end", "validate"), ("mid", "compiler.stages.package:write_repository"),
                 ("mid", "compiler.driver.build:write_manifest")]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_stage_boundaries_and_mid_stage(cached_build, model_dirs, tmp_path, signum):
    _, cache, _, _ = cached_build
    _assert_stopped_everywhere(_run_points(signum, model_dirs["llama"], cache, tmp_path, [], _QUICK_POINTS), signum)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_at_every_point_of_every_stage(cached_build, model_dirs, tmp_path, signum):
    _, cache, _, _ = cached_build
    points = (_CACHED_POINTS + [("start", s) for s in ("load", "reference", "quality")]
              + [("mid", f) for f in _MID_QUALITY])
    _assert_stopped_everywhere(
        _run_points(signum, model_dirs["llama"], cache, tmp_path, ["--measure-quality"], points), signum)
