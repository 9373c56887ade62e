"""The atomic output directory a build is written into.

A build writes into a hidden sibling staging directory and renames it into place only at the end,
so an interrupted or failed build never leaves a half-written artifact at the output path.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from compiler.driver import interrupt


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
