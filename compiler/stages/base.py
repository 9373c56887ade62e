"""What every build stage declares, so the driver can run, cache, skip, free and report it generically.

A stage is one object in the build list (compiler/driver/build.py). It names the BuildState fields
it reads and writes; says before any work whether it is skipped and why; for a cached stage, gives
the inputs of its cache key (the driver adds llmc's version and the key of the stage it chains on)
and saves / restores its own files; and returns its own sections of report.json. The driver knows
nothing else about it. (Shape after TensorRT-LLM's CachedStage: the stage owns its key and files.)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from compiler.stages.state import BuildState
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor


class Stage:
    name: str = ""
    reads: tuple[str, ...] = ()  # BuildState fields it reads (the memory plan frees heavy ones after the last)
    writes: tuple[str, ...] = ()
    cached: bool = False  # it has entries in the stage cache
    chains_on: str | None = None  # the cached stage whose key is part of this one's
    unread_reason: str = ""  # set: the stage only feeds others, and is skipped (with this reason) when
    # no stage that runs reads what it writes

    def skip_reason(self, state: BuildState) -> str | None:
        """Why the stage does nothing in this build (None: it runs, or is restored from the cache)."""
        return None

    def key_inputs(self, state: BuildState) -> dict:
        """What this stage's output depends on, besides the chained stage's key and llmc's code."""
        return {}

    def cache_valid(self, state: BuildState, entry: Path) -> bool:
        """Whether a stored entry can stand in for a run in this build (e.g. it recorded what is asked)."""
        return True

    def run(self, state: BuildState) -> None:
        raise NotImplementedError

    def save(self, state: BuildState, scratch: Path) -> tuple[dict[str, Path], dict]:
        """(files to store by name, meta.json's content) after a run, written into `scratch` if they are
        not files already; only for cached stages."""
        return {}, {}

    def restore(self, state: BuildState, entry: Path) -> None:
        """Set the fields `run` would have set, from a cache entry."""
        raise NotImplementedError

    def detail(self, state: BuildState) -> str:
        """The progress line's detail after the stage ran or was restored."""
        return ""

    def report(self, state: BuildState) -> dict:
        """This stage's sections of report.json (read at the end, from the light fields)."""
        return {}

    def warnings(self, state: BuildState) -> list[str]:
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def read_meta(entry: Path) -> dict:
    return json.loads((entry / "meta.json").read_text())


def restore_files(entry: Path, names, dest: Path) -> list[Path]:
    """Copy the named files of a cache entry into the staging directory (those the entry has)."""
    import shutil

    out = []
    for name in names:
        if (entry / name).is_file():
            shutil.copyfile(entry / name, dest / name)
            out.append(dest / name)
    return out


def shared_session(state: BuildState) -> OnnxRuntimeExecutor:
    """The one onnxruntime session validate and quality share, made by whichever needs it first
    (one-shot checks keep no memory arena: compiler/runtime/onnx_executor.py)."""
    if state.session is None:
        state.session = OnnxRuntimeExecutor(state.staging / "model.onnx", arena=False)
    return state.session


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj)
