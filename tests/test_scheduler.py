"""In-flight batching (compiler/runtime/scheduler.py) on the bundled trained model's graphs, onnxruntime.

The reference for every request is its solo run through today's Runner (one prompt, no padding, the
executor started for it alone): under load, with rows of other requests padded around it, chunked,
preempted or sharing a reused cache row, a request must get exactly those tokens. The fp16 recipe's
graph gives bit-identical logits per row whatever the batch here (every check below is exact); the
paged graph is the fp16-paged recipe's, run through its reference body.
"""

import threading

import numpy as np
import onnx_ir as ir
import pytest

from compiler.runtime.kv_slots import BlockCache, SlotCache, bytes_per_token
from compiler.runtime.onnx_executor import OnnxRuntimeExecutor
from compiler.runtime.runner import Runner, Sampling
from compiler.runtime.scheduler import Request, Scheduler

CAPACITY = 256  # the trained_fp16 fixture's --max-seq
PAD = 3  # the bundled model's pad_token_id


@pytest.fixture(scope="module")
def linear(trained_fp16):
    return OnnxRuntimeExecutor(trained_fp16)


@pytest.fixture(scope="module")
def paged(trained, exported, tmp_path_factory):
    from compiler.frontend.default_model import default_model_dir
    from compiler.frontend.run_passes import run_passes
    from compiler.graph_io import ExportedGraph, io_from_model
    from compiler.recipe import load_recipe
    from passes import PassContext

    model = ir.load(exported(default_model_dir(), trained))
    graph, _ = run_passes(ExportedGraph(model, io_from_model(model)), load_recipe("fp16-paged"),
                          PassContext(max_positions=CAPACITY))
    path = tmp_path_factory.mktemp("paged") / "model.onnx"
    ir.save(graph.model, path)
    return OnnxRuntimeExecutor(path)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, 1024, n).tolist() for n in lengths]


def solo(executor, request: Request) -> list[int]:
    return Runner(executor, pad_token_id=PAD).generate([request.prompt], request.max_tokens, request.sampling,
                                                       request.stop_tokens).tokens[0]


def drive(scheduler, requests, arrivals):
    """Submit request i once `arrivals[i]` steps have run (0: before the first); run until all finish."""
    handles = [None] * len(requests)
    steps = 0
    while any(h is None for h in handles) or not scheduler.idle:
        for i, at in enumerate(arrivals):
            if handles[i] is None and at <= steps:
                handles[i] = scheduler.submit(requests[i])
        scheduler.step()
        steps += 1
        assert steps < 3000, "the scheduler stopped making progress"
    return handles


@pytest.mark.parametrize("graph", ["linear", "paged"])
def test_greedy_outputs_under_load_equal_each_solo_run(graph, request):
    """Mixed prompt lengths (1..60), arrivals while others decode, early stops, different max_tokens."""
    executor = request.getfixturevalue(graph)
    ps = prompts([5, 60, 1, 23, 9, 41, 2, 17])
    requests = [Request(p, m) for p, m in zip(ps, [30, 12, 25, 40, 8, 20, 33, 16])]
    refs = [solo(executor, r) for r in requests]
    for i in (2, 5):  # two requests stop at a token of their own solo run, mid-way
        requests[i].stop_tokens = (refs[i][len(refs[i]) // 2],)
        refs[i] = refs[i][: refs[i].index(requests[i].stop_tokens[0]) + 1]
        assert len(refs[i]) < requests[i].max_tokens
    scheduler = Scheduler(executor, max_batch=4, max_tokens_per_step=32, pad_token_id=PAD)
    handles = drive(scheduler, requests, arrivals=[0, 0, 0, 3, 5, 11, 12, 30])
    assert [h.tokens for h in handles] == refs
    assert [h.finish_reason for h in handles] == ["length", "length", "stop", "length", "length", "stop",
                                                  "length", "length"]
    # the load was real: prefill chunks shared calls with decodes, and four sequences ran together
    assert max(s.rows for s in scheduler.steps) == 4
    assert any(s.rows > 1 and s.width > 1 for s in scheduler.steps)
    assert max(s.real_tokens for s in scheduler.steps) <= 32
    assert not scheduler.cache.row if graph == "linear" else not scheduler.cache.blocks  # everything freed


def test_per_request_sampling_is_its_solo_run(linear):
    """Each request draws from its own seeded generator: its samples do not depend on who shares the step."""
    ps = prompts([7, 3, 12], seed=1)
    requests = [Request(ps[0], 20, Sampling(temperature=1.0, top_k=20, seed=5)),
                Request(ps[1], 20),
                Request(ps[2], 20, Sampling(temperature=0.8, seed=9))]
    refs = [solo(linear, r) for r in requests]
    scheduler = Scheduler(linear, max_batch=3, max_tokens_per_step=32, pad_token_id=PAD)
    assert [h.tokens for h in drive(scheduler, requests, [0, 2, 4])] == refs
    assert refs[0] != solo(linear, Request(ps[0], 20, Sampling(temperature=1.0, top_k=20, seed=6)))


def test_a_freed_row_is_reused_without_zeroing(linear):
    """One slot: the second request gets the row the first filled to slot 98; it reads none of it."""
    first, second = Request(prompts([60])[0], 40), Request(prompts([4], seed=2)[0], 30)
    scheduler = Scheduler(linear, max_batch=1, max_tokens_per_step=64, pad_token_id=PAD)
    handles = [scheduler.submit(first), scheduler.submit(second)]
    while not handles[0].done.is_set():
        scheduler.step()
    stale = scheduler.cache.buffers["past_key_values.0.key"][0, :, 4:99]
    assert np.abs(stale.astype(np.float32)).min() > 0  # every slot the second request will not write is dirty
    scheduler.run_until_idle()
    assert [h.tokens for h in handles] == [solo(linear, first), solo(linear, second)]


def test_no_free_slot_makes_admission_wait(linear):
    requests = [Request(p, 10) for p in prompts([3, 8, 5, 2, 6], seed=3)]
    scheduler = Scheduler(linear, max_batch=2, max_tokens_per_step=16, pad_token_id=PAD)
    handles = drive(scheduler, requests, [0] * 5)
    assert max(s.rows for s in scheduler.steps) == 2
    assert [h.tokens for h in handles] == [solo(linear, r) for r in requests]


class Audited(BlockCache):
    """The paged manager, checked at every graph call: no block owned twice, none the scratch block."""

    def run(self, seqs, input_ids, position_ids, **step):
        owned = [b for s in self.blocks for b in self.blocks[s]]
        assert len(owned) == len(set(owned)) and self.scratch not in owned
        assert sorted(owned + self._free) == list(range(self.num_blocks))
        self.calls = getattr(self, "calls", 0) + 1
        return super().run(seqs, input_ids, position_ids, **step)


def test_a_pool_too_small_for_all_waits_preempts_and_every_request_finishes_right(paged):
    """Six sequences of up to 71 positions (5 blocks of 16) in a pool of 8 blocks: admission waits, running
    sequences outgrow the pool, the youngest is preempted and recomputed; nobody gets another's tokens."""
    ps = prompts([20, 3, 33, 9, 14, 1], seed=4)
    requests = [Request(p, m) for p, m in zip(ps, [40, 60, 30, 50, 45, 64])]
    refs = [solo(paged, r) for r in requests]
    scheduler = Scheduler(paged, max_batch=4, max_tokens_per_step=24, pad_token_id=PAD)
    scheduler.cache = Audited(paged, num_blocks=8)
    handles = drive(scheduler, requests, [0, 0, 0, 2, 6, 9])
    assert scheduler.preemptions > 0 and any(h.preemptions for h in handles)
    assert [h.tokens for h in handles] == refs
    assert [len(h.tokens) for h in handles] == [r.max_tokens for r in requests]  # streamed once, never repeated
    assert not scheduler.cache.blocks and len(scheduler.cache._free) == 8


def test_a_request_that_can_never_fit_is_refused_at_submit(paged, linear):
    with pytest.raises(ValueError, match="^65 positions needed but a sequence can hold at most 256"):
        Scheduler(paged, num_blocks=4).submit(Request([5] * 2, 64))  # 5 blocks > the pool's 4
    Scheduler(paged, num_blocks=4).submit(Request([5] * 2, 63))  # 64 positions: 4 blocks
    with pytest.raises(ValueError, match="^257 positions needed"):
        Scheduler(linear).submit(Request([5] * 200, 58))
    with pytest.raises(ValueError, match="^empty prompt$"):
        Scheduler(linear).submit(Request([], 5))
    with pytest.raises(ValueError, match=r"^max_tokens must be >= 1 \(got 0\)$"):
        Scheduler(linear).submit(Request([1], 0))
    with pytest.raises(ValueError, match=r"max_tokens_per_step \(4\) must be >= max_batch \(8\)"):
        Scheduler(linear, max_batch=8, max_tokens_per_step=4)
    with pytest.raises(ValueError, match="num_blocks applies to paged graphs only"):
        Scheduler(linear, num_blocks=10)


def test_cancelling_frees_the_slot_at_the_next_step(linear):
    long, queued, never = (Request(p, 50) for p in prompts([6, 4, 5], seed=5))
    scheduler = Scheduler(linear, max_batch=1, max_tokens_per_step=16, pad_token_id=PAD)
    a, b, c = (scheduler.submit(r) for r in (long, queued, never))
    while len(a.tokens) < 3:
        scheduler.step()
    a.cancel()
    c.cancel()  # still waiting: leaves the queue without running
    scheduler.step()
    assert a.finish_reason == "cancelled" and a.done.is_set() and len(a.tokens) == 3
    assert c.finish_reason == "cancelled" and c.tokens == []
    assert scheduler.cache.row == {scheduler.running[0]: 0} and scheduler.running[0].handle is b
    scheduler.run_until_idle()
    assert b.tokens == solo(linear, queued)
    assert a.tokens == solo(linear, long)[:3]


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(linear):
    """A 200-token prompt under an 8-token budget: 4 decoding requests keep a token per step throughout."""
    short = [Request(p, 80) for p in prompts([5, 2, 7, 3], seed=6)]
    long = Request(prompts([200], seed=7)[0], 20)
    scheduler = Scheduler(linear, max_batch=5, max_tokens_per_step=8, pad_token_id=PAD)
    handles = [scheduler.submit(r) for r in short]
    for _ in range(6):
        scheduler.step()
    assert all(h.tokens for h in handles)  # all four decoding
    big = scheduler.submit(long)
    counts = []
    while not big.tokens:
        scheduler.step()
        counts.append([len(h.tokens) for h in handles])
    assert len(counts) == 200 // 4  # 8 - 4 = 4 prompt tokens a step
    assert all(b[i] == a[i] + 1 for a, b in zip(counts, counts[1:]) for i in range(4))  # no decode stalled
    assert max(s.real_tokens for s in scheduler.steps) <= 8
    scheduler.run_until_idle()
    assert [h.tokens for h in handles + [big]] == [solo(linear, r) for r in short + [long]]


def test_padding_never_writes_past_the_cache(linear):
    """A sequence decoding at the last slot shares steps with a prompt chunk: the step narrows to fit it."""
    full = Request(prompts([250], seed=8)[0], 7)  # positions 0..255: its last fed token sits at slot 255
    other = Request(prompts([60], seed=9)[0], 5)
    scheduler = Scheduler(linear, max_batch=2, max_tokens_per_step=64, pad_token_id=PAD)
    handles = drive(scheduler, [full, other], [0, 5])
    assert [h.tokens for h in handles] == [solo(linear, full), solo(linear, other)]
    assert any(s.rows == 2 and s.width == 1 for s in scheduler.steps)  # the narrowed steps ran


def test_tokens_stream_to_clients_of_the_serving_thread(linear):
    """submit() from client threads while serve_forever() steps: each stream is that request's solo run."""
    requests = [Request(p, 15) for p in prompts([4, 11, 2, 8], seed=10)]
    seen: list[int] = []
    requests[0].on_token = seen.append
    scheduler = Scheduler(linear, max_batch=4, max_tokens_per_step=32, pad_token_id=PAD)
    stop = threading.Event()
    server = threading.Thread(target=scheduler.serve_forever, args=(stop,))
    server.start()
    try:
        results = [None] * 4

        def client(i):
            results[i] = list(scheduler.submit(requests[i]).stream(timeout=60))

        clients = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
    finally:
        stop.set()
        server.join(10)
    assert results == [solo(linear, r) for r in requests]
    assert seen == results[0]
    assert max(s.rows for s in scheduler.steps) > 1  # the clients shared graph calls


def test_kv_bytes_in_use_per_token(linear, paged):
    """The floor is layers x 2 x kv_heads x head_dim x bytes; a linear row holds a whole capacity, a block 16."""
    floor = bytes_per_token(linear.io, np.float16)
    assert floor == 4 * 2 * 2 * 32 * 2
    slots = SlotCache(linear, 2)
    assert slots.allocated_bytes() == 2 * CAPACITY * floor and slots.in_use_bytes() == 0
    slots.open("a", 10)
    assert slots.in_use_bytes() == CAPACITY * floor
    blocks = BlockCache(paged, 10)
    assert blocks.allocated_bytes() == 11 * 16 * floor  # + the scratch block
    blocks.open("a", 17)
    assert blocks.in_use_bytes() == 2 * 16 * floor
    assert blocks.open("b", 16 * 8)  # the other 8 blocks
    assert not blocks.reserve("b", 16 * 8 + 1) and not blocks.open("c", 1)  # the pool is full
    assert len(blocks.blocks["b"]) == 8 and blocks.in_use_bytes() == 10 * 16 * floor
    blocks.close("a")
    assert blocks.reserve("b", 16 * 8 + 1) and len(blocks.blocks["b"]) == 9


def test_a_client_gone_is_polled_and_its_slot_freed(linear):
    """A frontend's own cancellation check (Triton's is_cancelled) is polled; on_finish says how it ended."""
    gone = threading.Event()
    ended: list[tuple[int, str]] = []
    first, second = (Request(p, 40) for p in prompts([5, 7], seed=11))
    first.client_gone = gone.is_set
    for r in (first, second):
        r.on_finish = lambda h: ended.append((h.id, h.finish_reason))
    scheduler = Scheduler(linear, max_batch=1, max_tokens_per_step=16, pad_token_id=PAD, cancel_poll_s=0.0)
    a, b = scheduler.submit(first), scheduler.submit(second)
    while len(a.tokens) < 4:
        scheduler.step()
    gone.set()
    scheduler.step()
    assert a.finish_reason == "cancelled" and len(a.tokens) == 4
    assert scheduler.running[0].handle is b  # the one row went to the waiting request
    scheduler.run_until_idle()
    assert b.tokens == solo(linear, second) and ended == [(a.id, "cancelled"), (b.id, "length")]
    assert a.peak_rows == b.peak_rows == 1  # one row: they never shared a graph call


class _FailOnce:
    """The bundled graph's executor, raising on its `fail_at`-th call (a device error mid-serving)."""

    def __init__(self, executor, fail_at: int):
        self.inner, self.io, self.calls, self.fail_at = executor, executor.io, 0, fail_at

    def input_dtype(self, name):
        return self.inner.input_dtype(name)

    def run(self, feeds):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("device lost")
        return self.inner.run(feeds)


def test_a_failing_step_ends_every_request_with_its_error_and_serving_goes_on(linear):
    scheduler = Scheduler(_FailOnce(linear, 3), max_batch=4, max_tokens_per_step=32, pad_token_id=PAD)
    stop = threading.Event()
    server = threading.Thread(target=scheduler.serve_forever, args=(stop,))
    server.start()
    try:
        hit = [scheduler.submit(Request(p, 20)) for p in prompts([3, 6], seed=12)]
        for h in hit:
            h.result(timeout=60)
        after = Request(prompts([4], seed=13)[0], 10)
        assert scheduler.submit(after).result(timeout=60) == solo(linear, after)
    finally:
        stop.set()
        server.join(10)
    assert [(h.finish_reason, h.error) for h in hit] == [("error", "RuntimeError: device lost")] * 2
    assert len(hit[0].tokens) == 2  # the two steps before the failure
    assert scheduler.cache.row == {}  # every row free again


@pytest.mark.parametrize("graph", ["linear", "paged"])
def test_ngram_speculation_changes_no_token_and_takes_fewer_steps(graph, request):
    """Greedy requests with prompt-lookup speculation (k 1..6), beside plain ones, arriving while others
    decode, one with a stop token inside its output: every request gets exactly its solo plain-greedy
    tokens, and the proposals the target accepted saved graph calls (the bundled model's greedy output
    repeats itself, which is what prompt lookup finds)."""
    executor = request.getfixturevalue(graph)
    ps = prompts([7, 30, 3, 12, 50, 20])
    ks = [4, 0, 2, 6, 1, 4]
    requests = [Request(p, m, speculate=k) for p, m, k in zip(ps, [60, 30, 48, 64, 20, 40], ks)]
    refs = [solo(executor, r) for r in requests]
    requests[3].stop_tokens = (refs[3][len(refs[3]) * 2 // 3],)
    refs[3] = refs[3][: refs[3].index(requests[3].stop_tokens[0]) + 1]
    scheduler = Scheduler(executor, max_batch=4, max_tokens_per_step=40, pad_token_id=PAD)
    handles = drive(scheduler, requests, [0, 0, 1, 3, 5, 9])
    assert [h.tokens for h in handles] == refs
    assert handles[3].finish_reason == "stop"
    speculating = [h for h, k in zip(handles, ks) if k]
    assert handles[1].proposed == 0 and handles[1].verify_steps == 0
    assert sum(h.proposed for h in speculating) > 0
    accepted = sum(h.accepted for h in speculating)
    assert 0 < accepted <= sum(h.proposed for h in speculating)
    # each verify step emits its accepted proposals plus one token: tokens = prefill's 1 + steps + accepted
    for h in speculating:
        assert h.verify_steps + h.accepted + 1 <= len(h.tokens) <= h.verify_steps + h.accepted + 1 + 64


def test_speculation_with_top_k_1_sampling_is_greedy(linear):
    """temperature > 0 goes through the rejection rule; with top_k 1 the target's p is one-hot, so the
    rule must reproduce plain greedy exactly (a wrong residual or acceptance draws other tokens)."""
    ps = prompts([9, 14], seed=3)
    greedy = [solo(linear, Request(p, 40)) for p in ps]
    scheduler = Scheduler(linear, max_batch=2, pad_token_id=PAD)
    handles = drive(scheduler, [Request(p, 40, Sampling(0.8, 1, seed=i), speculate=5) for i, p in enumerate(ps)],
                    [0, 0])
    assert [h.tokens for h in handles] == greedy
    assert sum(h.accepted for h in handles) > 0


def test_speculation_never_writes_past_the_cache_or_emits_past_max_tokens(linear):
    """A prompt ending near the capacity: proposals are cut to the slots left and to max_tokens."""
    p = prompts([CAPACITY - 12], seed=5)[0]
    ref = solo(linear, Request(p, 13))
    scheduler = Scheduler(linear, max_batch=2, pad_token_id=PAD)
    (handle,) = drive(scheduler, [Request(p, 13, speculate=8)], [0])
    assert handle.tokens == ref and len(handle.tokens) == 13


def test_speculate_out_of_range_is_refused(linear):
    scheduler = Scheduler(linear, max_batch=2, max_tokens_per_step=16, pad_token_id=PAD)
    with pytest.raises(ValueError, match="speculate must be 0"):
        scheduler.submit(Request([5, 6], 4, speculate=16))


def test_static_batching_admits_a_new_batch_only_when_the_last_has_finished(linear):
    """The baseline llmc bench compares against: a request arriving mid-batch waits for the batch's
    longest request (in-flight admits it at once); every output is still its solo run."""
    ps = prompts([6, 9, 4], seed=11)
    requests = [Request(ps[0], 4), Request(ps[1], 30), Request(ps[2], 5)]
    refs = [solo(linear, r) for r in requests]
    for static in (False, True):
        scheduler = Scheduler(linear, max_batch=4, pad_token_id=PAD, static=static)
        handles = drive(scheduler, requests, [0, 0, 2])
        assert [h.tokens for h in handles] == refs
        late, longest = handles[2], handles[1]
        if static:
            assert late.token_times[0] > longest.token_times[-1]
        else:
            assert late.token_times[-1] < longest.token_times[-1]


def test_a_next_turn_reuses_its_history_in_the_freed_row(linear):
    """Prefix reuse on the linear cache: turn 2's prompt is turn 1's prompt + answer + more tokens, so the
    row turn 1 freed holds all but its last token; turn 2 starts feeding after that prefix, its tokens
    are still its solo run's, and its prefill computes only the new tokens. A request with another
    prompt takes a row but reuses nothing it should not (its solo tokens again)."""
    first = prompts([20], seed=21)[0]
    scheduler = Scheduler(linear, max_batch=2, pad_token_id=PAD)
    (turn1,) = drive(scheduler, [Request(first, 12)], [0])
    second = first + turn1.tokens + prompts([7], seed=22)[0]
    other = prompts([25], seed=23)[0]
    refs = [solo(linear, Request(second, 10)), solo(linear, Request(other, 10))]
    computed_before = sum(s.real_tokens for s in scheduler.steps)
    turn2, stranger = drive(scheduler, [Request(second, 10), Request(other, 10)], [0, 0])
    assert [turn2.tokens, stranger.tokens] == refs
    assert turn2.prefix_reused == len(first) + len(turn1.tokens) - 1  # the last answer token was never fed
    assert stranger.prefix_reused == 0
    fed = sum(s.real_tokens for s in scheduler.steps) - computed_before
    assert fed == (len(second) - turn2.prefix_reused) + len(other) + 2 * 9  # prefills + 9 decodes each


def test_a_prompt_equal_to_a_cached_one_still_feeds_its_last_token(linear):
    p = prompts([16], seed=31)[0]
    scheduler = Scheduler(linear, max_batch=1, pad_token_id=PAD)
    (a,) = drive(scheduler, [Request(p, 6)], [0])
    (b,) = drive(scheduler, [Request(p, 6)], [0])
    assert a.tokens == b.tokens == solo(linear, Request(p, 6))
    assert b.prefix_reused == len(p) - 1
