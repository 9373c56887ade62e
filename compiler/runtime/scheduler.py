"""In-flight batching: iteration-level scheduling of many generation requests over one compiled graph.

Orca (Yu et al., OSDI 2022) re-forms the batch at every step instead of per request: each step admits
waiting requests while the cache has room, runs one graph call for every decoding sequence (a row of
one token) and one for the prompt chunks (the next chunk of each prompt being read), samples each request with its own parameters,
streams the new tokens and retires the finished, so a short request never waits for a long one and
a finished one's slot is reused at once (TensorRT-LLM's in-flight batching, vLLM's continuous batching).

Rows are right-padded to the step's longest, as the runner pads a prefill (compiler/runtime/runner.py):
a row's pad tokens sit at the positions after its own tokens, so they write only slots the sequence
overwrites before any real query reads them (the graph's mask is slot <= position). The step's width
is capped so that every row's padded positions stay inside the cache (TensorScatter writes the row's
width from its first position; the paged table has capacity // block_size entries).

A sequence is its tokens (prompt + generated) and how many of them are in the cache: a prompt chunk,
a decode and the recompute of a preempted sequence are the same operation, "feed the next tokens",
and a token is sampled when the cache has caught up with the tokens. `max_tokens_per_step` bounds the
real tokens of a step (Sarathi, Agrawal et al. 2023: chunked prefill): decodes are scheduled first,
prompts take the rest in chunks, so a long prompt does not stall everyone's decode.

A request may ask for prompt-lookup speculation (`speculate` = k > 0; Saxena 2023, "prompt lookup
decoding"; vLLM's and TensorRT-LLM's n-gram proposer): its decode row then feeds its last token plus up
to k tokens that followed the latest earlier occurrence of its last n-gram, and keeps the longest
prefix the target itself would have produced (compiler/runtime/speculative.py's rules: greedy keeps
plain greedy's tokens, sampling keeps the target's distribution). Rejected proposals leave K/V in slots
past the row's new length, overwritten by its next feed before any query reads them (the same slot
rule as padding), so nothing is rolled back. Rows with proposals go in their own graph call (a one-token
decode padded to k + 1 would waste k positions). A draft model as proposer is not served here: it needs
a second cache per sequence (compiler/runtime/proposers.py's DraftProposer runs under `llmc generate`).

When the paged pool runs out, the youngest running sequence is preempted: its blocks are freed and
it goes back to the front of the queue with the tokens it has (already streamed, never repeated),
to be recomputed by a prefill later (vLLM's recompute preemption). Nothing here knows Triton or the
executor: the cache manager (compiler/runtime/kv_slots.py) owns the graph call.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable

import numpy as np

from compiler.runtime.kv_slots import cache_for
from compiler.runtime.proposers import NgramProposer, Proposal
from compiler.runtime.runner import Sampling, pick
from compiler.runtime.speculative import verify_greedy, verify_sampled

FINISHED = ("stop", "length", "cancelled", "error")


@dataclasses.dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: Sampling = Sampling()
    stop_tokens: tuple[int, ...] = ()
    on_token: Callable[[int], None] | None = None  # called from the scheduler's thread, per new token
    on_finish: Callable[["Handle"], None] | None = None  # called from the scheduler's thread, once, at the end
    # Polled on the scheduler's thread (at most every `cancel_poll_s`): True when the client went away. On that
    # thread because it is the one that calls on_token: Triton 2.51's Python stub corrupts its heap or crashes the
    # server when `is_cancelled()` runs on one thread while another sends (benchmarks/NOTES.md, issue 24).
    client_gone: Callable[[], bool] | None = None
    speculate: int = 0  # prompt-lookup proposals per decode step (0: plain decoding)


class Handle:
    """A submitted request: its tokens as they come (`tokens`, `stream()`), timings, and `cancel()`."""

    _ids = itertools.count()

    def __init__(self, request: Request):
        self.id = next(Handle._ids)
        self.request = request
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: str | None = None  # why, when finish_reason is "error"
        self.submitted = time.perf_counter()
        self.token_times: list[float] = []  # perf_counter when each token was sampled
        self.preemptions = 0
        self.proposed = 0  # speculation: proposal tokens the target scored
        self.accepted = 0  # of them, kept (each verify step also emits one token of the target's own)
        self.verify_steps = 0
        self.prefix_reused = 0  # prompt positions found in the cache at admission, not computed again
        self.peak_rows = 0  # the most sequences a graph call of this request carried (1: it never shared one)
        self.done = threading.Event()
        self._stream: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = False

    def cancel(self) -> None:
        """The client went away: the scheduler frees its slot / blocks at its next step."""
        self._cancel = True

    @property
    def cancelled(self) -> bool:
        return self._cancel

    def stream(self, timeout: float | None = None):
        """Yield each new token as the scheduler samples it, until the request finishes."""
        while True:
            token = self._stream.get(timeout=timeout)
            if token is None:
                return
            yield token

    def result(self, timeout: float | None = None) -> list[int]:
        if not self.done.wait(timeout):
            raise TimeoutError(f"request {self.id} unfinished after {timeout} s")
        return self.tokens

    @property
    def time_to_first_token_s(self) -> float | None:
        return self.token_times[0] - self.submitted if self.token_times else None

    def _emit(self, token: int) -> None:
        self.tokens.append(token)
        self.token_times.append(time.perf_counter())
        self._stream.put(token)
        if self.request.on_token is not None:
            self.request.on_token(token)

    def _finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._stream.put(None)
        self.done.set()
        if self.request.on_finish is not None:
            self.request.on_finish(self)


class _Sequence:
    """A request in the scheduler: tokens = prompt + generated; `cached` of them are in the cache."""

    def __init__(self, handle: Handle, order: int):
        self.handle, self.order = handle, order  # order: admission rank, for "youngest first" preemption
        self.tokens = list(handle.request.prompt) + handle.tokens
        self.cached = 0
        self.proposal: list[int] = []  # this step's speculative tokens, fed after tokens[cached:]
        self.rng = np.random.default_rng(handle.request.sampling.seed)

    def feed(self, n: int) -> list[int]:
        return (self.tokens + self.proposal)[self.cached: self.cached + n]


@dataclasses.dataclass
class StepStats:
    """One graph call (a step makes one for its decode rows and one for its prompt chunks)."""

    rows: int
    width: int
    real_tokens: int
    seconds: float


class Scheduler:
    """Serves requests over one executor (onnxruntime or TensorRT: anything with `io`, `input_dtype`, `run`).

    max_batch: sequences in flight at once (the linear cache's rows). max_tokens_per_step: real tokens one
    graph call may carry (>= max_batch, so every decode fits; prompts share the rest in chunks).
    num_blocks: the paged pool's size (default: max_batch full-length sequences; smaller makes admission
    wait and, when running sequences outgrow it, preempts the youngest).
    static: admit a new batch only when every running sequence has finished (static batching, the
    baseline in-flight batching is measured against: a batch waits for its longest request).
    """

    def __init__(self, executor, max_batch: int = 8, max_tokens_per_step: int = 256, num_blocks: int | None = None,
                 pad_token_id: int | None = 0, cancel_poll_s: float = 0.05, proposer: NgramProposer | None = None,
                 static: bool = False):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 (got {max_batch})")
        if max_tokens_per_step < max_batch:
            raise ValueError(f"max_tokens_per_step ({max_tokens_per_step}) must be >= max_batch ({max_batch}): "
                             f"every running sequence's decode token must fit in one step")
        self.executor, self.io = executor, executor.io
        if self.io.capacity is None:
            raise ValueError("graph has a Concat-grown cache: rebuild with a recipe that runs kv-cache-scatter")
        self.cache = cache_for(executor, max_batch, num_blocks)
        self.max_batch, self.max_tokens_per_step = max_batch, max_tokens_per_step
        self.pad = pad_token_id or 0
        self.waiting: collections.deque[Handle | _Sequence] = collections.deque()
        self.running: list[_Sequence] = []
        self.steps: list[StepStats] = []
        self._arrived: queue.SimpleQueue = queue.SimpleQueue()  # submit() from any thread
        self._wake = threading.Event()
        self._order = itertools.count()
        self.preemptions = 0
        self.cancel_poll_s, self._polled = cancel_poll_s, 0.0
        self.proposer = proposer or NgramProposer()
        self.static = static

    # --- requests ----------------------------------------------------------------------------------
    def submit(self, request: Request) -> Handle:
        """Queue a request (thread-safe); its tokens stream from the step that samples them."""
        if not request.prompt:
            raise ValueError("empty prompt")
        if request.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {request.max_tokens})")
        if not 0 <= request.speculate < self.max_tokens_per_step:
            raise ValueError(f"speculate must be 0 (off) .. {self.max_tokens_per_step - 1} proposal tokens per step "
                             f"(got {request.speculate})")
        # The last new token is returned, never fed back: it needs no cache slot (as the runner counts).
        needed = len(request.prompt) + request.max_tokens - 1
        if not self.cache.fits(needed):
            raise ValueError(f"{needed} positions needed but a sequence can hold at most {self.cache.capacity} "
                             f"(--max-seq) in a cache of this size: shorten the prompt or max_tokens")
        handle = Handle(request)
        self._arrived.put(handle)
        self._wake.set()
        return handle

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting and self._arrived.empty()

    # --- one iteration -------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, run the graph over every scheduled sequence (decodes, then prompt chunks), sample, stream, retire.
        False: nothing to do."""
        while not self._arrived.empty():
            self.waiting.append(self._arrived.get())
        self._drop_cancelled()
        self._admit()
        rows = self._plan()
        if not rows:
            return False
        # Decode rows and prompt chunks go in separate calls: padded together, every one-token decode row
        # would carry the widest chunk's width (16 decodes beside a 32-token chunk: 544 positions, not 48).
        # Speculating rows (last token + proposals) likewise get a call of their own.
        for group in ([r for r in rows if r[1] == 1], [r for r in rows if r[0].proposal],
                      [r for r in rows if r[1] > 1 and not r[0].proposal]):
            if group:
                self._run(group)
        return True

    def _run(self, rows: list[tuple[_Sequence, int]]) -> None:
        """One graph call: each row's next tokens, right-padded to the widest; sample the caught-up rows."""
        start = time.perf_counter()
        seqs = [seq for seq, _ in rows]
        width = max(n for _, n in rows)
        ids = np.full((len(rows), width), self.pad, np.int64)
        positions = np.empty((len(rows), width), np.int64)
        for r, (seq, n) in enumerate(rows):
            ids[r, :n] = seq.feed(n)
            positions[r] = np.arange(seq.cached, seq.cached + width)  # pads: the positions after the row's own
        # A graph after last-position-logits returns the positions asked for: each row's last real one, or
        # every one where a speculating row verifies its proposals.
        every = any(seq.proposal for seq in seqs) or not self.io.logits_positions
        if self.io.logits_positions:
            at = (np.tile(np.arange(width, dtype=np.int64), (len(rows), 1)) if every
                  else np.array([[n - 1] for _, n in rows], np.int64))
            logits = self.cache.run(seqs, ids, positions, logits_at=at)
        else:
            logits = self.cache.run(seqs, ids, positions)
        for r, (seq, n) in enumerate(rows):
            seq.handle.peak_rows = max(seq.handle.peak_rows, len(rows))
            if seq.proposal:
                self._verify(seq, np.asarray(logits[r, :n], np.float32))
                continue
            seq.cached += n
            if seq.cached == len(seq.tokens):  # caught up: this row's last real position predicts the next token
                self._sample(seq, np.asarray(logits[r, n - 1 if every else 0], np.float32))
        self.steps.append(StepStats(len(rows), width, sum(n for _, n in rows), time.perf_counter() - start))

    def _poll_clients(self) -> None:
        now = time.perf_counter()
        if now - self._polled < self.cancel_poll_s:
            return
        self._polled = now
        for item in [*self.running, *self.waiting]:
            handle = item.handle if isinstance(item, _Sequence) else item
            if handle.request.client_gone is not None and not handle.cancelled and handle.request.client_gone():
                handle.cancel()

    def _drop_cancelled(self) -> None:
        self._poll_clients()
        for seq in [s for s in self.running if s.handle.cancelled]:
            self._retire(seq, "cancelled")
        for item in [w for w in self.waiting if (w.handle if isinstance(w, _Sequence) else w).cancelled]:
            self.waiting.remove(item)
            (item.handle if isinstance(item, _Sequence) else item)._finish("cancelled")

    def _admit(self) -> None:
        """First come, first served: a request that does not fit yet blocks the ones behind it (no starvation).
        A preempted sequence keeps its rank, so the younger ones are preempted before it again."""
        if self.static and self.running:
            return  # static batching: the batch in flight finishes first
        while self.waiting and len(self.running) < self.max_batch:
            item = self.waiting[0]
            seq = item if isinstance(item, _Sequence) else _Sequence(item, next(self._order))
            if not self.cache.open(seq, len(seq.tokens), seq.tokens):  # the prompt (or a preempted one's tokens) fits now
                if seq is not item:
                    self.waiting[0] = seq  # keeps its arrival rank while it waits
                return
            self.waiting.popleft()
            seq.cached = self.cache.reused(seq)  # a prefix its row already holds (linear cache: kv_slots.py)
            seq.handle.prefix_reused += seq.cached
            self.running.append(seq)

    def _plan(self) -> list[tuple[_Sequence, int]]:
        """(sequence, tokens to feed) per row: decodes first, then prompt chunks within the token budget."""
        while True:
            decodes = [s for s in self.running if len(s.tokens) - s.cached == 1]
            prefills = [s for s in self.running if len(s.tokens) - s.cached > 1]
            budget = self.max_tokens_per_step - len(decodes)
            rows = []
            for seq in decodes:
                seq.proposal = self._propose(seq, budget)
                budget -= len(seq.proposal)
                rows.append((seq, 1 + len(seq.proposal)))
            for seq in prefills:
                if budget <= 0:
                    break
                n = min(len(seq.tokens) - seq.cached, budget)
                rows.append((seq, n))
                budget -= n
            if not rows:
                return []
            # every row is padded to the width: its positions cached .. cached + width - 1 must exist
            cap = min(self.cache.capacity - seq.cached for seq, _ in rows)
            rows = [(seq, min(n, cap)) for seq, n in rows]
            for seq, n in rows:
                del seq.proposal[max(n - 1, 0):]  # a verify row cut by the cap keeps the proposals it feeds
            victim = next((seq for seq, n in rows if not self.cache.reserve(seq, seq.cached + n)), None)
            if victim is None:
                return rows
            self._preempt(max(self.running, key=lambda s: s.order))  # the youngest makes room; plan again

    def _preempt(self, seq: _Sequence) -> None:
        self.cache.close(seq, seq.tokens[:seq.cached])  # its K/V stay for prefix reuse
        self.running.remove(seq)
        seq.tokens = list(seq.handle.request.prompt) + seq.handle.tokens  # recomputed from the tokens it has
        seq.cached = 0
        seq.proposal = []
        seq.handle.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _propose(self, seq: _Sequence, budget: int) -> list[int]:
        """Up to `speculate` n-gram proposals: never more than the request may still emit after the
        target's own token, nor more than the step's token budget has left."""
        request = seq.handle.request
        count = min(request.speculate, request.max_tokens - len(seq.handle.tokens) - 1, budget)
        return self.proposer.lookup(seq.tokens, count) if count > 0 else []

    def _verify(self, seq: _Sequence, logits: np.ndarray) -> None:
        """Keep the proposals the target agrees with (its rules, compiler/runtime/speculative.py), then its own token."""
        request, proposal = seq.handle.request, seq.proposal
        if request.sampling.temperature > 0:
            accepted, tokens = verify_sampled(Proposal(proposal), logits, request.sampling, seq.rng)
        else:
            accepted, tokens = verify_greedy(proposal, logits)
        seq.proposal = []
        seq.cached += 1 + accepted  # the fed token and the kept proposals; the slots after them are stale
        seq.handle.proposed += len(proposal)
        seq.handle.verify_steps += 1
        for i, token in enumerate(tokens):
            seq.handle.accepted += i < accepted
            if not self._take(seq, token):
                return

    def _sample(self, seq: _Sequence, logits: np.ndarray) -> None:
        self._take(seq, pick(logits, seq.handle.request.sampling, seq.rng))

    def _take(self, seq: _Sequence, token: int) -> bool:
        """Emit one token; False (the sequence retired) on a stop token or at max_tokens."""
        request = seq.handle.request
        seq.tokens.append(token)
        seq.handle._emit(token)
        if token in request.stop_tokens:
            self._retire(seq, "stop")
        elif len(seq.handle.tokens) >= request.max_tokens:
            self._retire(seq, "length")
        else:
            return True
        return False

    def _retire(self, seq: _Sequence, reason: str) -> None:
        self.cache.close(seq, seq.tokens[:seq.cached])  # its K/V stay for prefix reuse
        self.running.remove(seq)
        seq.handle._finish(reason)

    # --- loops ---------------------------------------------------------------------------------------
    def run_until_idle(self) -> None:
        while self.step() or not self.idle:
            pass

    def serve_forever(self, stop: threading.Event, poll_s: float = 0.05) -> None:
        """The serving thread: step while there is work, sleep until a submit (or `stop`) otherwise.

        A step that raises (an executor error, a client callback's bug) ends every request in flight
        with finish_reason "error" and the exception as `error`, and the loop goes on with a clean cache:
        a dead serving thread would leave every client waiting forever."""
        while not stop.is_set():
            try:
                busy = self.step()
            except Exception as exc:  # noqa: BLE001 - reported to each request's client, see above
                self.abort(f"{type(exc).__name__}: {exc}")
                continue
            if not busy:
                self._wake.wait(poll_s)
                self._wake.clear()

    def abort(self, error: str) -> None:
        """End every running and waiting request with finish_reason "error"; their cache is freed."""
        while not self._arrived.empty():
            self.waiting.append(self._arrived.get())
        for seq in list(self.running):
            self.cache.close(seq)
            self.running.remove(seq)
            self._finish_quietly(seq.handle, error)
        while self.waiting:
            item = self.waiting.popleft()
            self._finish_quietly(item.handle if isinstance(item, _Sequence) else item, error)

    @staticmethod
    def _finish_quietly(handle: Handle, error: str) -> None:
        if handle.finish_reason is None:
            try:
                handle._finish("error", error)
            except Exception:  # noqa: BLE001 - its on_finish failed too: the others must still be told
                pass

    def generate(self, requests: list[Request]) -> list[list[int]]:
        """Submit all, run until every one finishes; their tokens, in order."""
        handles = [self.submit(r) for r in requests]
        self.run_until_idle()
        return [h.tokens for h in handles]
