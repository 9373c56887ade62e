"""Stage 6, package: the report, and the atomic output directory everything is written into.

A build writes into a hidden sibling staging directory and renames it into place only at the end,
so an interrupted or failed build never leaves a half-written artifact at the output path.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import platform
import shutil
import signal
from pathlib import Path

from . import interrupt

_TOOLS = ("llmc", "torch", "transformers", "onnx", "onnx-ir", "onnxscript", "onnxruntime",
          "tensorrt", "tensorrt-rtx-cu13", "tensorrt_rtx_cu13", "polygraphy", "tritonclient", "numpy")


def tool_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in _TOOLS:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def _jsonable(obj):
    if dataclasses.is_dataclass(obj):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(obj).items()}
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja")


def copy_tokenizer(model_dir: Path, dest: Path) -> list[str]:
    """The model's own tokenizer files, so `llmc generate` and servers need nothing but the artifact."""
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, dest / name)
            copied.append(name)
    return copied


def write_report(path: Path, report: dict) -> None:
    path.write_text(json.dumps(_jsonable(report), indent=2, sort_keys=False) + "\n")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StagedOutput:
    """`with StagedOutput(out) as staging: ...; staging.commit()` -> out appears whole, or not at all."""

    def __init__(self, final: Path):
        self.final = Path(final).resolve()
        self.staging = self.final.parent / f".{self.final.name}.staging-{os.getpid()}"
        self.committed = False

    def __enter__(self) -> "StagedOutput":
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._remove_orphans()
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        return self

    def _remove_orphans(self) -> None:
        """Staging dirs of builds that were killed (SIGKILL, power loss) are removed by the next build."""
        for leftover in self.final.parent.glob(f".{self.final.name}.staging-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)

    @property
    def path(self) -> Path:
        return self.staging

    def commit(self, final: Path | None = None) -> Path:
        """Move the staging dir to `final` (default: the output path), replacing what was there."""
        final = Path(final).resolve() if final else self.final
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        # Two renames must not be split by Ctrl-C / SIGTERM: held signals arrive after the swap.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            interrupt.checkpoint()  # a signal whose first raise was swallowed stops the build here, not after
            if final.exists():
                os.replace(final, old)
            try:
                os.replace(self.staging, final)
            except OSError:
                if old.exists():
                    os.replace(old, final)  # put the previous build back
                raise
            interrupt.disarm()  # committed: a signal held until the unblock below can no longer undo the build
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return final

    def __exit__(self, *exc) -> None:
        if not self.committed:
            shutil.rmtree(self.staging, ignore_errors=True)
