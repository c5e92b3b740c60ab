"""The generation side of the server: slots that own a model context, a bounded FIFO queue of
jobs, and a dispatcher that gives each job to the free slot whose KV cache shares the longest
prefix with its prompt (llama-server's slot selection by prompt similarity).

With one slot, the slot runs its jobs in its own thread (llama.cpp releases the GIL while it
computes). With `--parallel N` the slots are the N sequences of one shared llama.cpp context
(QwQ.sequences()), and each job runs through `spawn` on that context's decode thread
(backend/batched.py): every step decodes one batch for all slots, then each slot samples its
token and hands out its text, one after the other in that thread, as llama-server's loop does.
The asyncio side only waits on a job's events. A job's `cancel` stops its generation after the
current token, so a client that goes away frees the slot within one decode step.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import constants
from ..runtime.decode import Cancel
from .wakeup import LoopWaker

log = logging.getLogger("qwq_local.serve")

__all__ = ["Engine", "Job", "QueueFull", "Slot", "common_prefix"]


class QueueFull(Exception):
    """The job queue holds its maximum; the caller answers 503 with Retry-After."""


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(eq=False)  # a job is itself: the queue removes it by identity
class Job:
    """One generation: what to run on a slot's model, and where its events go.

    run(model, cancel) is called in the slot's thread and returns an iterator of
    `runtime.Event`s; each is handed to the asyncio side (`take`), then None (the end) or an
    ("error", exception) item."""

    run: Callable[[Any, Cancel], Any]
    tokens: list[int]
    loop: asyncio.AbstractEventLoop
    cancel: Cancel = field(default_factory=Cancel)
    shutdown: bool = False  # cancelled because the server stops (the stream ends with an error)
    slot: int | None = None
    # Set by the engine when its runner runs the job: how a wake-up of the event loop is
    # scheduled (SharedContext.defer); None wakes it at once.
    defer: Callable[[Callable[[], None]], None] | None = None
    # Set by Engine.submit: frees the job's place in the queue if it still waits there (leave()).
    withdraw: Callable[[], None] | None = None
    _items: list = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _waiter: asyncio.Future | None = None
    _waker: LoopWaker | None = None  # set by the first `take`, on the loop's thread

    def leave(self) -> None:
        """The request is over (finished, failed, or its client went away): cancel what still
        runs (the slot is freed within one decode step) and give up a place still held in the
        queue at once, so that a client gone while waiting does not count against --queue."""
        self.cancel.set()
        if self.withdraw is not None:
            self.withdraw()

    def put(self, item: Any) -> None:
        """From the slot's thread. The asyncio loop is woken only when `take` waits: events that
        arrive while the stream is busy sending ride along with the next `take` (one wake-up
        and, after merging, one SSE message for them all instead of one per token)."""
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            if self.defer is not None:
                self.defer(functools.partial(self._wake, waiter))
            else:
                self._wake(waiter)

    def _wake(self, waiter: asyncio.Future) -> None:
        try:
            self._waker.wake(waiter)
        except RuntimeError:  # the event loop already closed (server shutdown)
            pass

    async def take(self) -> list:
        """Every item put since the last call (at least one), oldest first."""
        while True:
            with self._lock:
                if self._items:
                    items, self._items = self._items, []
                    return items
                if self._waker is None:
                    self._waker = LoopWaker.of(self.loop)
                self._waiter = waiter = self.loop.create_future()
            await waiter


def _runs(indices: set[int]) -> int:
    """How many runs of consecutive integers `indices` makes ({0, 1, 3}: 2)."""
    return sum(1 for i in indices if i - 1 not in indices)


class Slot:
    """One sequence of KV cache with the tokens it holds, and the thread that generates."""

    def __init__(self, index: int, model: Any) -> None:
        self.index = index
        self.model = model
        self.job: Job | None = None
        self.cached: list[int] = []  # prompt + generated tokens of the last job (its KV prefix)
        self.last_used = 0  # dispatch count when its last job started (least recently used first)
        self.wake = threading.Event()

    @property
    def busy(self) -> bool:
        return self.job is not None


class Engine:
    """Slots plus a bounded FIFO queue. `submit` raises QueueFull when `queue_size` jobs wait.

    runner: None (each slot runs its jobs in a thread of its own) or what runs them elsewhere, with
    spawn(job) and defer(wake-up): the slots' backend.batched.SharedContext, on its decode thread."""

    def __init__(self, models: list[Any], *, queue_size: int, on_done: Callable[[Any], None] | None = None,
                 runner: Any = None) -> None:
        self.slots = [Slot(i, m) for i, m in enumerate(models)]
        self.queue_size = queue_size
        self._queue: collections.deque[Job] = collections.deque()
        self._lock = threading.Lock()
        self._stopping = False
        self._on_done = on_done
        self._dispatched = 0
        self._runner = runner
        self._threads = [] if runner is not None else [
            threading.Thread(target=self._work, args=(s,), name=f"qwq-slot-{s.index}", daemon=True)
            for s in self.slots]
        for t in self._threads:
            t.start()

    # --- the asyncio side ---------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            free = any(not s.busy for s in self.slots)
            if not free and len(self._queue) >= self.queue_size:
                raise QueueFull(f"all {len(self.slots)} slots are busy and {len(self._queue)} requests wait")
            job.withdraw = functools.partial(self._withdraw, job)
            self._queue.append(job)
            self._dispatch()

    def _withdraw(self, job: Job) -> None:
        with self._lock:
            if job not in self._queue:
                return
            self._queue.remove(job)
        job.put(None)

    def queue_depth(self) -> int:
        return len(self._queue)

    def slots_busy(self) -> int:
        return sum(s.busy for s in self.slots)

    def kv_cells_used(self) -> int:
        return sum(len(s.cached) for s in self.slots)

    def stop_streams(self) -> None:
        """Shutdown: cancel running and queued jobs; their streams end with an error event."""
        with self._lock:
            self._stopping = True
            queued = list(self._queue)
            self._queue.clear()
            for slot in self.slots:
                if slot.job is not None:
                    slot.job.shutdown = True
                    slot.job.cancel.set()
        for job in queued:
            job.shutdown = True
            job.put(None)

    def close(self, timeout: float = 10.0) -> None:
        self.stop_streams()
        for slot in self.slots:
            slot.wake.set()
        for t in self._threads:
            t.join(timeout)

    # --- dispatch -----------------------------------------------------------------------------

    def _dispatch(self) -> None:
        """Give queued jobs (oldest first) to free slots, each to the free slot with the longest
        common prefix. Called with the lock held."""
        while self._queue:
            free = [s for s in self.slots if not s.busy]
            if not free:
                return
            job = self._queue.popleft()
            if job.cancel.is_set():  # the client left while it waited
                job.put(None)
                continue
            slot = self._pick(free, job.tokens)
            self._dispatched += 1
            slot.last_used = self._dispatched
            slot.job = job
            job.slot = slot.index
            if self._runner is not None:
                job.defer = self._runner.defer
                self._runner.spawn(functools.partial(self._run, slot, job))
            else:
                slot.wake.set()

    def _pick(self, free: list[Slot], tokens: list[int]) -> Slot:
        """The free slot sharing the longest prefix with `tokens` when that prefix covers at least
        SERVE_SLOT_SIMILARITY of them (a continued conversation; llama-server's
        slot_prompt_similarity). Otherwise the one that leaves the busy slots in the fewest runs of
        consecutive indices, then the least recently used: each KV stream is one sequence, and
        llama.cpp decodes each such run as a ubatch of its own (llama_batch_allocr::split_equal),
        so busy slots 0,1,3 cost two weight passes per step where 0,1,2 cost one; among equals,
        LRU keeps another conversation's history rather than evicting it over a shared header."""
        best = max(free, key=lambda s: common_prefix(s.cached, tokens))
        if common_prefix(best.cached, tokens) >= constants.SERVE_SLOT_SIMILARITY * len(tokens):
            return best
        busy = {s.index for s in self.slots if s.busy}
        return min(free, key=lambda s: (_runs(busy | {s.index}), s.last_used))

    def _work(self, slot: Slot) -> None:
        while True:
            slot.wake.wait()
            slot.wake.clear()
            if self._stopping and slot.job is None:
                return
            job = slot.job
            if job is not None:
                self._run(slot, job)

    def _run(self, slot: Slot, job: Job) -> None:
        reply, end = None, None
        try:
            for event in job.run(slot.model, job.cancel):
                if event.kind == "done":
                    reply = event.reply
                job.put(event)
        except Exception as exc:  # handed to the request, which maps it to an error object
            end = ("error", exc)
        finally:
            slot.cached = job.tokens + (list(reply.tokens) if reply is not None else [])
            if reply is not None and self._on_done is not None:
                try:
                    self._on_done(reply)
                except Exception:  # pragma: no cover - metrics must never stop a slot
                    log.exception("metrics update failed")
            with self._lock:
                slot.job = None
                self._dispatch()
            # The stream ends only now: a client that sends its next turn at once finds this
            # slot free, with its KV prefix.
            job.put(end)
