"""SpilledArray: the held-out reference on disk, read back a batch at a time (compiler/host/scratch.py)."""

import numpy as np
import pytest

from compiler.host.scratch import SCRATCH_ENV
from compiler.host.scratch import SpilledArray, spilled_or_in_memory


def test_blocks_written_are_the_rows_read_back(tmp_path, monkeypatch):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path))
    data = np.random.default_rng(0).normal(size=(7, 5, 11)).astype(np.float32)
    spilled = SpilledArray(7, (5, 11))
    for i in range(0, 7, 3):  # a short last block
        spilled.append(data[i:i + 3])
    assert spilled.shape == data.shape and len(spilled) == 7
    for rows in (slice(0, 3), slice(3, 6), slice(6, 9), slice(2, 5), slice(0, None)):
        np.testing.assert_array_equal(spilled[rows], data[rows])
    assert spilled[2:5].flags.writeable  # torch.from_numpy takes it without a copy or a warning
    with pytest.raises(ValueError, match="does not fit"):
        spilled.append(data[:1])  # the file is full
    with pytest.raises(IndexError):
        spilled[::2]


def test_nothing_is_left_in_the_scratch_folder(tmp_path, monkeypatch):
    """The file has no name from the start, so a killed build leaves nothing behind either."""
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path))
    spilled = SpilledArray(4, (1024,))
    spilled.append(np.ones((4, 1024), np.float32))
    assert list(tmp_path.iterdir()) == []
    assert spilled[0:4].sum() == 4 * 1024
    spilled.close()


def test_unusable_scratch_folder_keeps_it_in_memory_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv(SCRATCH_ENV, str(tmp_path / "missing"))
    with pytest.warns(UserWarning, match=SCRATCH_ENV):
        store = spilled_or_in_memory(2, (3,))
    store.append(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(store[0:2], np.arange(6).reshape(2, 3))
