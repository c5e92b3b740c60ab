"""The token loop with speculative decoding: decode.run_loop's contract (same stops, limits,
thinking budget, events and LoopState), with the last drawn token and the drafter's proposals
verified in one llama_decode batch.

A round: the pending token (drawn, not yet in the KV cache) is emitted; the drafter proposes
d1..dk; the batch [pending, d1..dk] is decoded with logits at every position; row i is the
target's distribution after batch token i, so d(i+1) is checked against row i (speculative.
TargetSampler.verify). The first rejection's draw is the next pending token; if all are kept,
the next pending token is drawn from row k. Positions after the last kept token
leave the target's KV cache (llama_memory_seq_rm through Context.truncate); the draft model
trims its own cache on its next proposal.
"""

from __future__ import annotations

import codecs
import time
from typing import Iterator, Sequence

from .decode import Cancel, LoopState, close_thought

_GO, _STOP, _CLOSE = 0, 1, 2


def run_speculative_loop(lib, ctx, speculator, sampler, state: LoopState, splitter, *, history: Sequence[int],
                         stop_ids: frozenset[int], max_tokens: int | None, thinking_budget: int | None,
                         close_tokens: Sequence[int], close_text: str, cancel: Cancel | None, n_ctx: int,
                         accept_injected: bool = True, close_at_end: bool = False) -> Iterator[tuple[str, str]]:
    """Draw, verify, decode and split until a stop; yields (kind, text) pieces as they complete.

    history: every token in ctx's KV cache (prompt and anything injected after it), whose last
    logits must be ready. sampler: a speculative.TargetSampler on this request's chain.
    accept_injected and close_at_end as in decode.run_loop. `cancel` is checked once per round (a round emits
    one or more tokens).
    """
    model = ctx.model
    pieces = model._output_cache  # what a generated token shows (Model.output_bytes)
    token_bytes = model.output_bytes
    is_eog = lib.llama_vocab_is_eog
    vocab = model.vocab
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    feed = splitter.feed
    tokens = state.tokens
    decoded = state.decoded
    limit = max_tokens if max_tokens is not None else 1 << 62
    budget = thinking_budget if thinking_budget is not None else -1
    thinking = 0
    cancelled = cancel.is_set if cancel is not None else None
    drafter = speculator.drafter
    adaptive = speculator.adaptive
    clock = time.perf_counter

    def take(tok: int):
        """Emit one drawn token (decode.run_loop's per-token steps); returns _GO, _STOP, or
        _CLOSE (a stop token inside the thought, with close_at_end: close the thought instead)."""
        nonlocal thinking, close_at_end
        if tok in stop_ids or is_eog(vocab, tok):
            if close_at_end and splitter.in_thinking:
                close_at_end = False  # once
                return _CLOSE
            state.finish_reason = "stop"
            return _STOP
        tokens.append(tok)
        was_thinking = splitter.in_thinking
        piece = pieces.get(tok)
        if piece is None:
            piece = token_bytes(tok)
        text = utf8.decode(piece)
        if text:
            yield from feed(text)
        if was_thinking:
            thinking += 1
        if len(tokens) >= limit:
            state.finish_reason = "length"
            return _STOP
        return _GO

    def budget_spent() -> bool:
        return thinking == budget and splitter.in_thinking

    accept = sampler.accept if accept_injected else None

    def close():
        """decode.close_thought, and the drafter learns the closing tokens."""
        if not (yield from close_thought(ctx, state, utf8, feed, close_tokens, close_text, n_ctx, accept)):
            return False
        drafter.extend(close_tokens)
        return True

    # The KV cache must hold history + what `decoded` gains, also when the caller closes this
    # generator in the middle of a round (a stop string found in a kept proposal).
    kv_base = len(history) - len(decoded)
    started = clock()
    try:
        drafter.start(history)
        adaptive.start()
        pending = sampler.sample(-1)
        while True:
            if cancelled is not None and cancelled():
                state.finish_reason = "interrupted"
                break
            step = yield from take(pending)
            if step == _STOP:
                break
            if step == _CLOSE:  # `pending` ended the turn inside the thought: it is not decoded
                if not (yield from close()):
                    break
                pending = sampler.sample(-1)
                continue
            if ctx.n_past >= n_ctx:
                state.finish_reason = "length"
                break
            drafter.extend((pending,))
            spent = budget_spent()
            k = 0 if spent else adaptive.next_length()
            # No proposal past the context end, max_tokens or the thinking budget: it would be
            # discarded.
            k = min(k, n_ctx - ctx.n_past - 1, limit - len(tokens), ctx.n_batch - 1)
            if budget >= 0 and splitter.in_thinking:
                k = min(k, budget - thinking)
            t0 = clock()
            proposals = drafter.propose(k) if k >= speculator.draft_min else []
            if len(proposals) < speculator.draft_min:
                proposals = []
            t1 = clock()
            if not proposals:
                ctx.decode_one(pending)
                adaptive.record_plain(clock() - t1)
                decoded.append(pending)
                nxt = -1  # the next token comes from the logits just computed
            else:
                base = ctx.n_past
                ctx.decode_verify([pending, *proposals])
                verify_s = clock() - t1
                decoded.append(pending)
                kept = appended = 0
                stop = False
                nxt = -1
                for i, x in enumerate(proposals):
                    tok, ok = sampler.verify(i, x)
                    if not ok:
                        nxt = tok
                        break
                    kept += 1
                    step = yield from take(x)
                    if step == _STOP:
                        stop = True
                        break
                    if step == _CLOSE:  # dropped by the truncation below, then the thought is closed
                        spent = True
                        break
                    decoded.append(x)
                    appended += 1
                    drafter.extend((x,))
                    if budget_spent():
                        spent = True
                        break
                else:
                    nxt = sampler.sample(len(proposals))
                state.draft_tokens += len(proposals)
                state.draft_accepted_tokens += kept
                adaptive.record_round(len(proposals), kept, verify_s=verify_s,
                                      draft_s=(t1 - t0) if drafter.costs_decode else 0.0)
                # The KV cache holds exactly prompt + `decoded`: drop rejected and unused positions
                # (and a kept token that ended the reply, which plain decoding never decodes).
                ctx.truncate(base + 1 + appended)
                if stop:
                    break
            if spent:  # the thinking budget ran out: close the thought for the model, then go on
                budget = -1
                if not (yield from close()):
                    break
                nxt = -1
            pending = sampler.sample(-1) if nxt < 0 else nxt
        tail = utf8.decode(b"", final=True)
        if tail:
            yield from feed(tail)
        yield from splitter.finish()
    finally:
        if ctx.n_past > kv_base + len(decoded):
            ctx.truncate(kv_base + len(decoded))
        state.thinking_tokens = thinking
        state.gen_seconds = clock() - started
