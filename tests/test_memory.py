"""release_freed_memory: freed heap pages go back to the OS (compiler/memory.py)."""

import subprocess
import sys

import pytest

from compiler.memory import _libc_trim

# Runs in a fresh interpreter so the heap's state is known. A freed 16 MB buffer raises glibc's
# mmap threshold, so the 4 MB buffers after it come from the heap; a small allocation on top
# keeps the automatic top-of-heap trim from returning them. Freed, they stay resident until trimmed.
SCRIPT = """
import numpy as np
from compiler.memory import release_freed_memory

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

big = np.ones(16 << 20, np.uint8); del big
chunks = [np.ones(4 << 20, np.uint8) for _ in range(100)]
pin = np.ones(1024, np.uint8)
del chunks
before = rss_mb()
assert release_freed_memory()
print(before, rss_mb())
"""


@pytest.mark.skipif(_libc_trim() is None or not sys.platform.startswith("linux"), reason="needs glibc's malloc_trim")
def test_freed_heap_pages_are_returned():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    before, after = map(float, out.stdout.split())
    assert before - after > 300, (before, after)  # 400 MB were freed mid-heap
