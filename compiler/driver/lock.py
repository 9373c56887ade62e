"""One build per output path at a time.

Two builds into the same output (a CI matrix, two terminals) would each stage a directory and the
later rename would silently win. An exclusive `flock` on a sibling lock file makes the second one
fail at once, naming the pid that holds it. The kernel drops the lock when its holder dies, so a
killed build never blocks the next one.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from compiler.errors import BadInputError


def lock_path(output: Path) -> Path:
    return output.parent / f".{output.name}.lock"


class OutputLock:
    """`with OutputLock(out): ...` holds the lock for the build; the lock file is removed on release."""

    def __init__(self, output: Path):
        self.output = Path(output)
        self.path = lock_path(self.output)
        self.fd: int | None = None

    def __enter__(self) -> "OutputLock":
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise BadInputError(
                    f"another llmc build (pid {holder}) is writing {self.output} (lock {self.path}); "
                    "wait for it to finish or choose another -o"
                ) from None
            # The holder before us may have removed the file between our open and our lock: retry on the new one.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)  # while still locked, so nobody else can be holding this inode
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None
