"""Scratch space on disk: unnamed files, one fallback rule, and a float32 array read a block at a time.

Why the array: the quality stage's reference is the held-out log-probabilities of every position over the
whole vocabulary, computed before the export and read back one batch of windows at a time in the
quality stage, minutes later. At 1B that is 16 x 127 x 128256 float32 = 1.04 GB held through the
export, the passes, the engine build and the onnxruntime session, which is the build's peak. On
disk it costs a batch (260 MB at 1B) while it is read.

The file is unnamed (`tempfile.TemporaryFile`: unlinked at creation on Linux) in $LLMC_SCRATCH_DIR
or the system temp dir, so it disappears when the array is closed or the process ends, crashes or
is killed; nothing is left behind.
"""

from __future__ import annotations

import math
import os
import tempfile
import warnings

import numpy as np

SCRATCH_ENV = "LLMC_SCRATCH_DIR"  # where spilled samples, references and widened weights go (else the system temp dir)


def scratch_file(prefix: str):
    """An unnamed temporary file in $LLMC_SCRATCH_DIR or the system temp dir (OSError if there is none)."""
    return tempfile.TemporaryFile(prefix=prefix, dir=os.environ.get(SCRATCH_ENV) or None)


def scratch_directory(prefix: str) -> tempfile.TemporaryDirectory:
    """A temporary directory in $LLMC_SCRATCH_DIR or the system temp dir (OSError if there is none)."""
    return tempfile.TemporaryDirectory(prefix=prefix, dir=os.environ.get(SCRATCH_ENV) or None)


def on_disk_or_none(make, what: str, cost: str = "it stays in memory"):
    """`make()`, or None with a warning naming what stays in memory when no scratch folder is usable.

    The one rule for everything llmc spills: a missing or full scratch disk costs memory, never the build."""
    try:
        return make()
    except OSError as exc:
        warnings.warn(f"no scratch folder for {what} ({exc}); {cost} (set {SCRATCH_ENV} to a writable disk folder)")
        return None


def write_at(file, offset: int, block: np.ndarray) -> None:
    """Write a C-contiguous array's bytes at `offset`."""
    file.seek(offset)
    file.write(memoryview(block).cast("B"))


def read_at(file, offset: int, out: np.ndarray) -> np.ndarray:
    """Fill `out` with the bytes at `offset`; a short read is an OSError."""
    file.seek(offset)
    if file.readinto(memoryview(out).cast("B")) != out.nbytes:
        raise OSError(f"short read from the scratch file {file.name}")
    return out


class SpilledArray:
    """[rows, *row_shape] float32, appended in row blocks, read back by row slices (`a[i:j]`)."""

    dtype = np.dtype(np.float32)

    def __init__(self, rows: int, row_shape: tuple[int, ...]):
        self.shape = (rows, *row_shape)
        self._row_bytes = math.prod(row_shape) * self.dtype.itemsize
        self._file = scratch_file("llmc-spill-")
        self._written = 0

    def append(self, block: np.ndarray) -> None:
        block = np.ascontiguousarray(block, dtype=self.dtype)
        if block.shape[1:] != self.shape[1:] or self._written + len(block) > self.shape[0]:
            raise ValueError(f"block {block.shape} does not fit {self.shape} after {self._written} rows")
        write_at(self._file, self._written * self._row_bytes, block)
        self._written += len(block)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self._written)
        if step != 1:
            raise IndexError("a SpilledArray reads contiguous row slices only")
        return read_at(self._file, start * self._row_bytes,
                       np.empty((max(0, stop - start), *self.shape[1:]), self.dtype))

    def close(self) -> None:
        self._file.close()


def spilled_or_in_memory(rows: int, row_shape: tuple[int, ...]):
    """A SpilledArray, or (no usable scratch folder) an in-memory array with a warning that says so."""
    spilled = on_disk_or_none(lambda: SpilledArray(rows, row_shape), "the held-out reference")
    return spilled if spilled is not None else _InMemory(np.empty((rows, *row_shape), np.float32))


class _InMemory:
    """The same append / slice interface over an ndarray."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self._written = array, array.shape, 0

    def append(self, block: np.ndarray) -> None:
        self.array[self._written:self._written + len(block)] = block
        self._written += len(block)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.array[rows]

    def close(self) -> None:
        pass
