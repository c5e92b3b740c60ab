"""Continuous batching: N sequences share one llama.cpp context, and every llama_decode carries
the pending tokens of all of them (llama-server's slots: one sequence id per slot, one batch
per step, prompt chunks of newly admitted requests riding along with generated tokens).

Each sequence is driven through a `SequenceView`, which looks like a `binding.Context` to the
single-sequence code (QwQ.stream_prompt, decode.run_loop, the speculative loop): decode(),
decode_one(), decode_verify(), truncate(), n_past, out_index, output_row(). A view's decode does
not call llama_decode itself: it submits its tokens and waits. When every sequence in use (a
member: it has touched the context and not yet released it) waits with tokens, the context's one
decode thread decodes one batch for all of them, then wakes those whose tokens are all in; each
samples at its own batch row (`out_index` / `output_row(i)`, for llama_sampler_sample) before the
next batch is built, because a decode overwrites the logits. A speculating sequence's
verification batch (logits at every position) always goes into one decode whole. A member that
releases (its request ended, was cancelled or failed) stops holding the others back at once, so a
finished or disconnected slot frees within one decode step.

Two ways to drive a sequence: from a thread of the caller's (the view's decode blocks that
thread until its batch is decoded), or as a job handed to `spawn`, which runs it in a greenlet
on the decode thread itself: the view's decode then switches back to the decode thread's loop,
which decodes once every member waits and resumes each greenlet in turn to sample its token.
The server uses `spawn`, so that a step's per-token Python work of every slot runs in one
thread, between two decodes, with no thread hand-offs and no GIL contention.

Why one decode thread: ggml's CPU backend runs on OpenMP, whose thread team belongs to the OS
thread that calls llama_decode, and an idle team spins for a while before it sleeps. When the
sequences' own threads took turns decoding, the idle teams spun on the cores the busy one
needed: a 4-sequence batch took 16.9 ms instead of 8.8 ms (docs/serve.md, Speed).

KV cells: with kv_unified off (llama.cpp's default) each sequence has its own stream of
n_ctx / n_seq cells, so a sequence's positions run 0..n_ctx/n_seq-1 (llama-context.cpp,
n_ctx_seq). Per-sequence prefix reuse removes only that sequence's tail
(llama_memory_seq_rm(mem, seq, p0, -1)).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import greenlet

from ..errors import ContextOverflowError, RuntimeLoadError, UsageError
from .binding import Context, Model, decode_batch, llama

log = logging.getLogger("qwq_local.backend")

__all__ = ["SharedContext", "SequenceView"]


@dataclass
class _Submission:
    seq: int
    tokens: list[int]
    pos: int                 # position of tokens[0]
    logits: str              # "last" | "all" | "none" (as Context.decode)
    done_n: int = 0          # tokens already in the KV cache
    rows: list[int] = field(default_factory=list)  # batch rows with logits, in the last decode
    error: BaseException | None = None
    owner: object = None     # the greenlet that waits for it (spawned jobs), else None (a thread)

    @property
    def done(self) -> bool:
        return self.error is not None or self.done_n >= len(self.tokens)


class SharedContext:
    """One llama.cpp context with n_seq sequences; `view(i)` is sequence i's Context look-alike.

    n_ctx is the whole KV cache; each sequence holds n_ctx // n_seq positions. on_decode(n_tokens,
    seqs) is called after every llama_decode with the sequence ids in batch order (a hook for
    metrics and tests)."""

    def __init__(self, model: Model, *, n_ctx: int, n_seq: int,
                 on_decode: Callable[[int, tuple[int, ...]], None] | None = None,
                 **params) -> None:
        if n_seq < 1:
            raise UsageError(f"the number of sequences must be >= 1, not {n_seq}")
        self.ctx = Context(model, n_ctx=n_ctx, n_seq=n_seq, **params)
        self.model = model
        self.n_seq = n_seq
        self.n_ctx_seq = self.ctx.n_ctx_seq  # the caller's limit is n_ctx // n_seq
        self.n_batch = self.ctx.n_batch
        self.on_decode = on_decode
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the sequences wait on it for their results
        self._work = threading.Condition(lock)  # the decode thread waits on it for a full batch
        self._members: set[int] = set()
        self._pending: dict[int, _Submission] = {}
        self._decoding = False
        self._closed = False
        self._spawned: list[Callable[[], None]] = []  # jobs to start on the decode thread
        self._ready: list = []  # greenlets whose submissions are decoded, to resume
        self._deferred: list[Callable[[], None]] = []  # see defer()
        self.views = [SequenceView(self, i) for i in range(n_seq)]
        self._thread = threading.Thread(target=self._decode_loop, name="qwq-decode", daemon=True)
        self._thread.start()

    def view(self, seq: int) -> "SequenceView":
        return self.views[seq]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._work.notify()
        self._thread.join()
        self.ctx.close()

    def spawn(self, job: Callable[[], None]) -> None:
        """Run job() in a greenlet on the decode thread; it drives sequences through their views
        like a thread would. It must not raise (what it raises is logged and dropped) and must not
        block the thread for long outside its views' decode calls: the other sequences wait."""
        with self._cond:
            if self._closed:
                raise RuntimeLoadError("the shared context is closed")
            self._spawned.append(job)
            self._work.notify()

    def defer(self, fn: Callable[[], None]) -> None:
        """From a spawned job: call fn() on the decode thread once the next batch is handed to
        llama.cpp (or the thread goes idle). The server wakes its event loop this way, so that
        the loop's work on the streamed tokens overlaps the next decode instead of taking the
        GIL between two decodes, while the slots still sample."""
        self._deferred.append(fn)

    def _run_deferred(self) -> None:
        while self._deferred:
            calls, self._deferred = self._deferred, []
            for fn in calls:
                try:
                    fn()
                except Exception:  # a wake-up must not stop the decode thread
                    log.exception("a deferred call failed")

    # --- called by the views (from the caller's threads or spawned jobs) ---------------------

    def submit(self, seq: int, tokens: Sequence[int], pos: int, logits: str) -> _Submission:
        sub = _Submission(seq, list(tokens), pos, logits)
        on_decoder = threading.get_ident() == self._thread.ident  # a spawned job's greenlet
        with self._cond:
            if self._closed:
                raise RuntimeLoadError("the shared context is closed")
            self._members.add(seq)
            self._pending[seq] = sub
            if not on_decoder:
                if self._all_waiting():
                    self._work.notify()
                while not sub.done:
                    self._cond.wait()
            else:
                sub.owner = greenlet.getcurrent()
        if on_decoder:
            while not sub.done:
                self._hub.switch()  # back to _decode_loop, which resumes us once it is decoded
        if sub.error is not None:
            raise sub.error
        return sub

    def release(self, seq: int) -> None:
        """Sequence `seq` is idle: the others no longer wait for it."""
        with self._cond:
            self._members.discard(seq)
            self._pending.pop(seq, None)
            if self._all_waiting():
                self._work.notify()

    def remove(self, seq: int, p0: int) -> None:
        """Drop sequence `seq`'s cells at positions >= p0 (llama_memory_seq_rm), between decodes."""
        lib = llama()
        with self._cond:
            while self._decoding:
                self._cond.wait()
            lib.llama_memory_seq_rm(lib.llama_get_memory(self.ctx.ptr), seq, max(0, p0), -1)

    # --- the decode thread ------------------------------------------------------------------

    def _all_waiting(self) -> bool:
        return bool(self._pending) and all(s in self._pending and not self._pending[s].done for s in self._members)

    def _decode_loop(self) -> None:
        self._hub = greenlet.getcurrent()
        with self._cond:
            while True:
                if not (self._closed or self._spawned or self._ready or self._all_waiting()):
                    self._cond.release()
                    try:
                        self._run_deferred()
                    finally:
                        self._cond.acquire()
                while not (self._closed or self._spawned or self._ready or self._all_waiting()):
                    self._work.wait()
                if self._closed:
                    self._fail_waiting()
                    return
                starting, self._spawned = self._spawned, []
                ready, self._ready = self._ready, []
                self._cond.release()
                try:  # the jobs run without the lock: they take it in submit, release, remove
                    for job in starting:
                        greenlet.greenlet(_guarded(job)).switch()
                    for waiting in ready:
                        waiting.switch()
                finally:
                    self._cond.acquire()
                if self._all_waiting():
                    self._decode_pending()

    def _fail_waiting(self) -> None:
        """Closing (lock held): every waiting sequence gets an error, and spawned jobs are
        resumed so that they unwind."""
        error = RuntimeLoadError("the shared context is closed")
        while self._pending or self._ready:
            owners = self._ready + [sub.owner for sub in self._pending.values() if sub.owner is not None]
            for sub in self._pending.values():
                sub.error = error
            self._pending.clear()
            self._ready = []
            self._cond.notify_all()
            self._cond.release()
            try:
                for owner in owners:
                    if not owner.dead:
                        owner.switch()
            finally:
                self._cond.acquire()

    def _decode_pending(self) -> None:
        """Decode batches (lock held on entry and exit, released during llama_decode) while every
        member still waits: a long prompt may need several."""
        while self._all_waiting():
            # What goes in: generated tokens first, then prompts as far as n_batch allows.
            takes: dict[int, tuple[_Submission, int]] = {}
            n = 0
            for sub in sorted(self._pending.values(), key=lambda s: len(s.tokens) - s.done_n):
                room = self.n_batch - n
                if room <= 0:
                    break
                take = min(room, len(sub.tokens) - sub.done_n)
                if sub.logits == "all" and take < len(sub.tokens) - sub.done_n and n > 0:
                    continue  # a verification batch stays whole (its rows are read together): next batch
                takes[sub.seq] = (sub, take)
                n += take
            # Laid out by ascending sequence id: with one KV stream per sequence (kv_unified off)
            # llama.cpp cuts a batch into ubatches of consecutive, increasing sequence ids
            # (llama_batch_allocr::split_equal, sequential): a batch ordered 1,0 would take two.
            batch = self.ctx._batch
            n = 0
            placed: list[tuple[_Submission, list[int], int]] = []  # (submission, its rows with logits, count)
            for seq in sorted(takes):
                sub, take = takes[seq]
                rows = []
                for j in range(take):
                    k = sub.done_n + j
                    batch.token[n + j] = sub.tokens[k]
                    batch.pos[n + j] = sub.pos + k
                    batch.seq_id[n + j][0] = sub.seq
                    wanted = sub.logits == "all" or (sub.logits == "last" and k == len(sub.tokens) - 1)
                    batch.logits[n + j] = wanted
                    if wanted:
                        rows.append(n + j)
                placed.append((sub, rows, take))
                n += take
            batch.n_tokens = n
            self._decoding = True
            self._cond.release()
            error = None
            try:
                self._run_deferred()
                decode_batch(self.model, self.ctx.ptr, batch)
            except BaseException as exc:  # refused, a lost RPC worker, ...: every sequence in it fails
                error = exc
            finally:
                self._cond.acquire()
                self._decoding = False
            for sub, rows, count in placed:
                if error is not None:
                    sub.error = error
                    continue
                sub.rows = rows
                sub.done_n += count
            for sub, _, _ in placed:
                if sub.done:
                    self._pending.pop(sub.seq, None)
                    if sub.owner is not None:
                        self._ready.append(sub.owner)
            if self.on_decode is not None and error is None:
                self.on_decode(n, tuple(sub.seq for sub, _, _ in placed))
            self._cond.notify_all()
            if error is not None:
                return


def _guarded(job: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        try:
            job()
        except BaseException:  # a job must not take the decode thread down with it
            log.exception("a job on the shared context failed")
    return run


class SequenceView:
    """Sequence `seq` of a SharedContext, with the parts of binding.Context's interface that the
    single-sequence generation code uses. n_ctx is this sequence's share of the KV cache."""

    def __init__(self, shared: SharedContext, seq: int) -> None:
        self.shared = shared
        self.seq = seq
        self.model = shared.model
        self.ptr = shared.ctx.ptr
        self.params = shared.ctx.params
        self.n_ctx = shared.n_ctx_seq
        self.n_batch = shared.n_batch
        self.logits_all = False
        self.n_past = 0
        self.out_index = -1
        self.rows: list[int] = []  # the shared batch's rows with this sequence's logits, last decode

    def decode(self, tokens: Sequence[int], *, start_pos: int | None = None, logits: str = "last") -> None:
        pos = self.n_past if start_pos is None else start_pos
        if pos + len(tokens) > self.n_ctx:
            raise ContextOverflowError(f"{pos + len(tokens)} tokens do not fit this slot's context of {self.n_ctx}; "
                                       "raise n_ctx or shorten the input")
        if not tokens:
            return
        sub = self.shared.submit(self.seq, tokens, pos, logits)
        if sub.rows:
            self.rows = sub.rows
            self.out_index = sub.rows[-1]
        self.n_past = pos + len(tokens)

    def decode_verify(self, tokens: Sequence[int]) -> None:
        """binding.Context.decode_verify for this sequence: tokens after what is cached, logits at
        every position, in one batch (with the other sequences' tokens); rows via output_row."""
        if not 0 < len(tokens) <= self.n_batch:
            raise UsageError(f"a verification batch of {len(tokens)} tokens does not fit n_batch {self.n_batch}")
        self.decode(tokens, logits="all")

    def output_row(self, i: int) -> int:
        """The shared batch's row holding the logits of this sequence's i-th output of its last
        decode (-1: the last)."""
        return self.rows[i]

    def decode_one(self, token: int) -> None:
        self.decode([token], start_pos=self.n_past, logits="last")

    def truncate(self, n_keep: int) -> None:
        self.shared.remove(self.seq, n_keep)
        self.n_past = max(0, min(self.n_past, n_keep))

    def release(self) -> None:
        """This sequence is idle until its next decode (called when a generation ends)."""
        self.shared.release(self.seq)

    def synchronize(self) -> None:
        pass  # llama_decode's results are read through llama.cpp calls that wait for them

    def close(self) -> None:
        self.release()
