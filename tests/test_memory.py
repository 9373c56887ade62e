"""release_freed_memory: freed heap pages go back to the OS (compiler/host/memory.py)."""

import subprocess
import sys

import pytest

from compiler.host.memory import _libc_trim

# Runs in a fresh interpreter so the heap's state is known. A freed 16 MB buffer raises glibc's
# mmap threshold, so the 4 MB buffers after it come from the heap; an allocation on top (1 MB: no free
# hole lower in the heap fits it) keeps the automatic top-of-heap trim from returning them. Freed,
# they stay resident until trimmed.
SCRIPT = """
import numpy as np
from compiler.host.memory import release_freed_memory

def rss_mb():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]) / 1024

big = np.ones(16 << 20, np.uint8); del big
chunks = [np.ones(4 << 20, np.uint8) for _ in range(100)]
pin = np.ones(1 << 20, np.uint8)  # 1 MB: too big for a hole lower in the heap, so it sits on top
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


# Loads a BF16 checkpoint in a fresh interpreter and prints the growth of the peak RSS during the load
# and the FP32 bytes of the model. DROP=0 turns the page dropping off (what the test compares with).
LOAD_SCRIPT = """
import os, sys
import compiler.frontend.load, compiler.host.memory
if os.environ["DROP"] == "0":
    compiler.host.memory.drop_mapped_pages = lambda *a: 0  # (read by name at each upcast)
compiler.frontend.load.load_model(sys.argv[2])  # a tiny model first: imports and caches are not the measure

def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current RSS
base = hwm()
model = compiler.frontend.load.load_model(sys.argv[1], half_storage=False).model
print(hwm() - base, sum(p.numel() * 4 for p in model.parameters()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self (Linux)")
def test_a_half_checkpoint_loads_without_its_mapped_shard_beside_the_fp32_model(tmp_path):
    """Peak growth while loading a ~100M-parameter BF16 checkpoint: the FP32 model plus little, where
    the shard's mapped pages (half the FP32 size) stayed resident until the end without the drop."""
    import os

    import torch
    import transformers

    from compiler.frontend.default_model import make_tiny_model

    src = make_tiny_model(tmp_path / "tok", num_layers=1)
    config = transformers.AutoConfig.from_pretrained(src)
    config.update(dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=8,
                       num_key_value_heads=8, vocab_size=512))
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16", safe_serialization=True)
    del model
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (tmp_path / "bf16" / f.name).write_bytes(f.read_bytes())
    growth = {}
    for drop in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "bf16"), str(src)], capture_output=True,
                             text=True, check=True, env={**os.environ, "DROP": drop})
        growth[drop], fp32 = map(int, out.stdout.split())
    assert growth["1"] < fp32 * 1.2, (growth, fp32)  # the FP32 model and one tensor in flight
    assert growth["0"] > growth["1"] + fp32 * 0.25, (growth, fp32)  # the mapped half pages, without the drop
