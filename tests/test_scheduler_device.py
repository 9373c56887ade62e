"""The scheduler over a cache that stays where the executor keeps it (compiler/runtime/device_cache.py).

The executor here is a STAND-IN for TensorRTExecutor (no TensorRT engine runs on this machine): it
honours the same in-place contract, `run_in_place(feeds, cache)` with each present output written
into the very memory of its past tensor, by running onnxruntime on the bound torch (CPU) tensors'
memory and copying the present outputs back into it. It has no `run`, so the cache cannot travel
through the host path. The graphs are test_scheduler.py's (the bundled model's fp16 and fp16-paged);
every request must get exactly the tokens the host managers give it, and its solo run's.
"""

import numpy as np
import pytest
import torch

from compiler.runtime.device_cache import DeviceBlockCache, DeviceSlotCache
from compiler.runtime.kv_slots import BlockCache, SlotCache
from compiler.runtime.scheduler import Request, Scheduler
from tests.test_scheduler import PAD, drive, linear, paged, prompts, solo  # noqa: F401 - fixtures


class InPlaceStandIn:
    """TensorRTExecutor's device-cache interface over onnxruntime; records the address each call bound."""

    cache_on_device = True

    def __init__(self, executor):
        self.inner, self.io, self.name = executor, executor.io, f"in-place stand-in over {executor.name}"
        self.bound: list[tuple[int, int]] = []  # (data_ptr, rows) of the first past tensor, per call

    def input_dtype(self, name):
        return self.inner.input_dtype(name)

    def cache_buffers(self, shape):
        return {n: torch.zeros(shape, dtype=torch.from_numpy(np.zeros(0, self.input_dtype(n))).dtype)
                for n in self.io.past_names}

    def run_in_place(self, feeds, cache):
        for tensor in cache.values():
            assert tensor.is_contiguous()  # what TensorRT's set_tensor_address needs
        first = cache[self.io.past_names[0]]
        self.bound.append((first.data_ptr(), first.shape[0]))
        out = self.inner.run({**feeds, **{n: t.numpy() for n, t in cache.items()}})
        for past, present in zip(self.io.past_names, self.io.present_names):
            cache[past].copy_(torch.from_numpy(out[present]))  # the engine's KVCacheUpdate, in place
        return out["logits"].astype(np.float32)


def _load(executor):
    ps = prompts([5, 60, 1, 23, 9, 41, 2, 17])
    requests = [Request(p, m) for p, m in zip(ps, [30, 12, 25, 40, 8, 20, 33, 16])]
    refs = [solo(executor, r) for r in requests]
    for i in (2, 5):  # two stop early, at a token of their own solo run
        requests[i].stop_tokens = (refs[i][len(refs[i]) // 2],)
        refs[i] = refs[i][: refs[i].index(requests[i].stop_tokens[0]) + 1]
    return requests, refs


def test_device_slots_give_every_request_the_host_slots_tokens(linear):
    """Eight requests, four rows, arrivals mid-generation, early stops: the same tokens as the host SlotCache
    (and each request's solo run); contiguous rows are bound at their offset in the one buffer."""
    requests, refs = _load(linear)
    host = Scheduler(linear, max_batch=4, max_tokens_per_step=32, pad_token_id=PAD)
    assert type(host.cache) is SlotCache
    host_tokens = [h.tokens for h in drive(host, requests, [0, 0, 0, 3, 5, 11, 12, 30])]
    stand_in = InPlaceStandIn(linear)
    device = Scheduler(stand_in, max_batch=4, max_tokens_per_step=32, pad_token_id=PAD)
    assert type(device.cache) is DeviceSlotCache
    handles = drive(device, requests, [0, 0, 0, 3, 5, 11, 12, 30])
    assert [h.tokens for h in handles] == host_tokens == refs
    buf = device.cache.buffers[linear.io.past_names[0]]
    row_bytes = buf[0].numel() * buf.element_size()
    offsets = [(ptr - buf.data_ptr()) for ptr, _ in stand_in.bound]
    in_place = [(off, n) for off, (_, n) in zip(offsets, stand_in.bound) if 0 <= off < buf.numel() * buf.element_size()]
    assert len(in_place) + device.cache.gathered_steps == len(stand_in.bound) == len(device.steps)
    assert all(off % row_bytes == 0 and off // row_bytes + n <= 4 for off, n in in_place)
    assert any(off > 0 for off, _ in in_place)  # a run that does not start at row 0, bound at its offset
    assert len(in_place) > len(stand_in.bound) // 2  # the lowest-free-row allocator keeps rows packed
    assert not device.cache.row


def test_rows_that_are_not_one_run_are_gathered_and_scattered_back(linear):
    """Three rows; the middle sequence is cancelled: rows 0 and 2 step together through a staging copy."""
    reqs = [Request(p, 30) for p in prompts([6, 4, 9], seed=21)]
    refs = [solo(linear, r) for r in reqs]
    scheduler = Scheduler(InPlaceStandIn(linear), max_batch=3, max_tokens_per_step=32, pad_token_id=PAD)
    a, b, c = (scheduler.submit(r) for r in reqs)
    while len(b.tokens) < 5:
        scheduler.step()
    assert scheduler.cache.gathered_steps == 0 and scheduler.cache.moved_bytes == 0
    b.cancel()
    scheduler.run_until_idle()
    assert a.tokens == refs[0] and c.tokens == refs[2] and b.tokens == refs[1][:5]
    gathered = scheduler.cache.gathered_steps
    assert gathered > 0
    buf = scheduler.cache.buffers[linear.io.past_names[0]]
    two_rows = 2 * len(scheduler.cache.buffers) * buf[0].numel() * buf.element_size()
    assert scheduler.cache.moved_bytes >= 2 * two_rows  # staged in and scattered back: 2 x rows x row bytes
    assert scheduler.cache.moved_bytes % (2 * len(scheduler.cache.buffers) * buf[0].numel() * buf.element_size()) == 0


class AuditedDevice(DeviceBlockCache):
    """The device pool manager, checked at every graph call: no block owned twice, none the scratch block."""

    def run(self, seqs, input_ids, position_ids, **step):
        owned = [b for s in self.blocks for b in self.blocks[s]]
        assert len(owned) == len(set(owned)) and self.scratch not in owned
        return super().run(seqs, input_ids, position_ids, **step)


def test_device_pool_too_small_preempts_and_gives_the_host_pools_tokens(paged):
    """test_scheduler's preemption load on the paged graph, the pool bound whole in place every step."""
    ps = prompts([20, 3, 33, 9, 14, 1], seed=4)
    requests = [Request(p, m) for p, m in zip(ps, [40, 60, 30, 50, 45, 64])]
    host = Scheduler(paged, max_batch=4, max_tokens_per_step=24, pad_token_id=PAD)
    host.cache = BlockCache(paged, num_blocks=8)
    host_tokens = [h.tokens for h in drive(host, requests, [0, 0, 0, 2, 6, 9])]
    stand_in = InPlaceStandIn(paged)
    device = Scheduler(stand_in, max_batch=4, max_tokens_per_step=24, pad_token_id=PAD, num_blocks=8)
    assert type(device.cache) is DeviceBlockCache
    device.cache = AuditedDevice(stand_in, num_blocks=8)
    handles = drive(device, requests, [0, 0, 0, 2, 6, 9])
    assert device.preemptions > 0 and any(h.preemptions for h in handles)
    assert [h.tokens for h in handles] == host_tokens == [solo(paged, r) for r in requests]
    pool = device.cache.buffers[paged.io.past_names[0]]
    assert {ptr for ptr, _ in stand_in.bound} == {pool.data_ptr()}  # the one pool, every call
    assert not device.cache.blocks and len(device.cache._free) == 8


def test_a_cache_bound_in_place_must_be_contiguous(linear):
    stand_in = InPlaceStandIn(linear)
    cache = DeviceSlotCache(stand_in, 4)
    assert cache.allocated_bytes() == SlotCache(linear, 4).allocated_bytes()
    strided = {n: b[::2] for n, b in cache.buffers.items()}
    with pytest.raises(AssertionError):
        stand_in.run_in_place({"input_ids": np.zeros((2, 1), np.int64), "position_ids": np.zeros((2, 1), np.int64)},
                              strided)


class _Recorder:
    """A stand-in executor that only records what it was bound to (no graph runs): for the alignment rule."""

    cache_on_device = True

    def __init__(self, capacity):
        from compiler.graph_io import GraphIO

        self.io, self.name, self.bound = GraphIO(1, 1, 1, 4, capacity), "recorder", []

    def input_dtype(self, name):
        return np.dtype(np.float16)

    def cache_buffers(self, shape):
        return {n: torch.zeros(shape, dtype=torch.float16) for n in self.io.past_names}

    def run_in_place(self, feeds, cache):
        self.bound.append({n: t.data_ptr() for n, t in cache.items()})
        return np.zeros((len(feeds["input_ids"]), 1, 4), np.float32)


@pytest.mark.parametrize("capacity,in_place", [(128, True), (3, False)])
def test_a_row_offset_is_bound_only_when_256_byte_aligned(capacity, in_place):
    """Rows of 128 x 2 bytes sit on 256-byte boundaries: bound at their offset. Rows of 6 bytes do not: gathered
    (TensorRT's setTensorAddress: "The pointer must have at least 256-byte alignment")."""
    cache = DeviceSlotCache(_Recorder(capacity), 4)
    base = cache.buffers["past_key_values.0.key"]
    for seq in "abc":
        cache.open(seq, 1)
    ids = np.zeros((2, 1), np.int64)
    cache.run(["b", "c"], ids, ids)  # rows 1 and 2: one run starting at row 1
    bound = cache.executor.bound[-1]["past_key_values.0.key"]
    assert (bound == base.data_ptr() + capacity * 2) is in_place
    assert cache.gathered_steps == (0 if in_place else 1)


def test_a_next_turn_reuses_its_history_left_in_the_device_rows(linear):
    """test_scheduler's prefix reuse over the device manager: the freed row's K/V stay in the executor's
    buffers, so turn 2 feeds only its new tokens and still gets its solo run's tokens."""
    first = prompts([20], seed=21)[0]
    scheduler = Scheduler(InPlaceStandIn(linear), max_batch=2, pad_token_id=PAD)
    assert type(scheduler.cache) is DeviceSlotCache
    (turn1,) = drive(scheduler, [Request(first, 12)], [0])
    second = first + turn1.tokens + prompts([7], seed=22)[0]
    other = prompts([25], seed=23)[0]
    turn2, stranger = drive(scheduler, [Request(second, 10), Request(other, 10)], [0, 0])
    assert [turn2.tokens, stranger.tokens] == [solo(linear, Request(second, 10)), solo(linear, Request(other, 10))]
    assert turn2.prefix_reused == len(first) + len(turn1.tokens) - 1 and stranger.prefix_reused == 0
