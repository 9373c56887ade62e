"""SIGINT / SIGTERM during a build: recorded by the handler, raised, and raised again at safe points.

Why not only raise from the handler: Python runs a handler at the next bytecode of the main thread,
which can be inside a finalizer or a weakref callback (the gc.collect that frees the torch model
after the export runs transformers' `WeakIdKeyDictionary` callbacks). An exception raised there is
printed as "Exception ignored in ..." and discarded, and the build would carry on and replace the
previous artifact. So the handler records the signal before it raises, and `checkpoint()` raises
it again wherever the build can stop cleanly: every progress callback (stage boundaries, between
passes, the calibration and sensitivity loops) and, with signals blocked, just before the output is
renamed into place (package.StagedOutput.commit). Once the output is committed the build is
complete; a signal after that is recorded but no longer undoes anything (`disarm`).
"""

from __future__ import annotations

import contextlib
import signal
import threading

from compiler.errors import BuildInterrupted
from compiler.stages.request import Progress

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_pending: int | None = None  # the first signal received while armed
_armed = False


def _handler(signum, frame):
    global _pending
    first = _pending is None
    if first:
        _pending = signum
    if first and _armed:  # later signals only re-record: they must not cut the unwinding of the first short
        raise BuildInterrupted(signum)


def pending() -> int | None:
    """The signal received during the build, if any (also after `disarm`)."""
    return _pending


def checkpoint() -> None:
    """Raise BuildInterrupted if a signal arrived (even one whose first raise was swallowed)."""
    if _armed and _pending is not None:
        raise BuildInterrupted(_pending)


def disarm() -> None:
    """The artifact is committed: from now on a signal is recorded, not raised."""
    global _armed
    _armed = False


@contextlib.contextmanager
def interruptible():
    """Install the recording handler for SIGINT and SIGTERM for the block; restore the previous ones after.

    SIGINT gets it even where the parent left it ignored (a background job of a script, a CI step):
    a build must stop on either signal with 130 / 143, as the exit-code table says.
    """
    global _pending, _armed
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    _pending, _armed = None, True
    for s in SIGNALS:
        signal.signal(s, _handler)
    try:
        yield
    finally:
        _armed = False
        for s, handler in previous.items():
            signal.signal(s, handler)


class CheckedProgress(Progress):
    """Every progress callback is a safe point to stop at (the checkpoint above): stage
    boundaries, between passes, the calibration and sensitivity loops."""

    def __init__(self, inner: Progress):
        self.inner = inner

    def _call(self, method, *args):
        checkpoint()
        method(*args)
        checkpoint()

    def stage_start(self, index, name):
        self._call(self.inner.stage_start, index, name)

    def stage_end(self, index, name, seconds, detail=""):
        self._call(self.inner.stage_end, index, name, seconds, detail)

    def pass_done(self, record):
        self._call(self.inner.pass_done, record)

    def step(self, what, done, total):
        self._call(self.inner.step, what, done, total)

    def note(self, text):
        self._call(self.inner.note, text)
