"""Paths around the model directory and the output, resolved without surprises.

pathlib answers "no" to is_file() / is_dir() for a symbolic link loop, a dangling link and a named
pipe alike, and raises RuntimeError from resolve() on a loop (Python 3.11); opening a FIFO blocks
until a writer appears, so a `model.safetensors` that is a pipe would hang the build forever. These
helpers stat first and name the oddity (loop, dangling link, pipe, socket, device, directory,
unreadable) in one line, before anything is opened.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from compiler.errors import BadInputError

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISREG, "a regular file"))


def kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def _stat(path: Path, what: str, fix: str) -> os.stat_result | None:
    """stat following links; None when nothing is there. Loops and dangling links are errors."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise BadInputError(f"{what} {path} is a dangling symbolic link (to {os.readlink(path)}); {fix}") from None
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadInputError(f"{what} {path} is a symbolic link loop; {fix}") from None
        if exc.errno == errno.ENOTDIR:
            return None
        raise BadInputError(f"cannot reach {what} {path} ({exc.strerror}); {fix}") from None


def resolve(path: Path, what: str, fix: str) -> Path:
    """`path` made absolute with links followed; a loop anywhere on it is a one-line error, not RuntimeError."""
    path = Path(path).expanduser()
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # 3.11 raises RuntimeError("Symlink loop ..."); later versions OSError(ELOOP)
        raise BadInputError(f"{what} {path} is, or passes through, a symbolic link loop; {fix}") from None


MODEL_FIX = "pass a local Hugging Face model directory"


def model_directory(path: Path) -> Path:
    """The model directory, resolved; it must exist, be a directory and be readable."""
    given = Path(path).expanduser()
    info = _stat(given, "model directory", MODEL_FIX)
    if info is None:
        raise BadInputError(f"model directory not found: {given} ({MODEL_FIX})")
    if not stat.S_ISDIR(info.st_mode):
        raise BadInputError(f"not a directory: {given} is {kind(info.st_mode)} ({MODEL_FIX})")
    if not os.access(given, os.R_OK | os.X_OK):
        raise BadInputError(f"cannot read the model directory {given} (permission denied); fix its permissions")
    return resolve(given, "model directory", MODEL_FIX)


def regular_file(file: Path, fix: str) -> Path:
    """`file` must be (a link to) a readable regular file: never open a pipe, a device or a directory."""
    info = _stat(file, "file", fix)
    if info is None:
        raise BadInputError(f"{file} does not exist; {fix}")
    if not stat.S_ISREG(info.st_mode):
        raise BadInputError(f"{file} is {kind(info.st_mode)}, not a regular file; {fix}")
    if not os.access(file, os.R_OK):
        raise BadInputError(f"cannot read {file} (permission denied); fix its permissions or {fix}")
    return file


def read_bytes(file: Path, fix: str = "check the file") -> bytes:
    regular_file(file, fix)
    try:
        return file.read_bytes()
    except OSError as exc:
        raise BadInputError(f"cannot read {file} ({exc.strerror}); {fix}") from None


OUTPUT_FIX = "choose another -o"


def output_path(path: Path) -> Path:
    """The output path, resolved. A dangling link at it is refused: the build would land at its target."""
    given = Path(path).expanduser()
    if os.path.islink(given) and not os.path.exists(given):
        _stat(given, "output path", f"remove the link or {OUTPUT_FIX}")
    return resolve(given, "output path", OUTPUT_FIX)
