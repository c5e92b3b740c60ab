"""The generation side of the runtime: the llama.cpp sampler chain, the reply types and the
token loop (the rope/YaRN rule lives in backend/rope.py, below plan, which shows it too).

The loop is written for speed: sampling runs inside llama.cpp (`llama_sampler_sample`), token
bytes come from a dict, text from an incremental UTF-8 decoder, and the per-token Python work is
a handful of local-variable operations, so a token costs microseconds on top of llama_decode.
"""

from __future__ import annotations

import codecs
import functools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

from .. import constants
from ..backend.binding import through_guard
from ..backend.rope import rope_params  # noqa: F401  (the rope rule; re-exported for runtime callers)
from ..errors import UsageError


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sampling:
    """Sampling settings; defaults are QwQ's card (never greedy, no repeat penalty)."""

    temperature: float = constants.DEFAULT_TEMPERATURE
    top_p: float = constants.DEFAULT_TOP_P
    top_k: int = constants.DEFAULT_TOP_K
    min_p: float = constants.DEFAULT_MIN_P
    presence_penalty: float = constants.DEFAULT_PRESENCE_PENALTY
    seed: int | None = None
    # GBNF grammar constraining the whole completion (thought included), and additive
    # logit biases by token id (-inf bans a token).
    grammar: str | None = None
    logit_bias: Mapping[int, float] | None = None
    # A lazy grammar (llama.cpp's llama_sampler_init_grammar_lazy_patterns): it constrains
    # nothing until one of these tokens is sampled, or the generated text matches one of these
    # regexes (std::regex_match over all of it; the first group marks where the grammar starts).
    # The server uses it to constrain the answer after a free thought.
    grammar_trigger_tokens: Sequence[int] = ()
    grammar_trigger_patterns: Sequence[str] = ()

    @property
    def lazy_grammar(self) -> bool:
        return bool(self.grammar and (self.grammar_trigger_tokens or self.grammar_trigger_patterns))

    def check(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, not {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], not {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0 (0 turns it off), not {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise UsageError(f"min_p must be in [0, 1], not {self.min_p}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise UsageError(f"presence_penalty must be in [-2, 2], not {self.presence_penalty}")


def build_sampler(lib, model, sampling: Sampling, *, penalty_window: int):
    """A llama.cpp sampler chain in the card's order:
    [logit bias] [grammar] [presence penalty] top_k -> top_p -> min_p -> temperature -> dist(seed).
    The caller frees it with lib.llama_sampler_free."""
    sampling.check()
    params = lib.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = lib.llama_sampler_chain_init(params)
    add = lib.llama_sampler_chain_add
    if sampling.logit_bias:
        items = list(sampling.logit_bias.items())
        arr = (lib.llama_logit_bias * len(items))()
        for i, (tok, bias) in enumerate(items):
            arr[i].token = int(tok)
            arr[i].bias = float(bias)
        add(chain, lib.llama_sampler_init_logit_bias(model.n_vocab, len(items), arr))
    if sampling.grammar:
        from ..backend import binding as backend

        with backend.capture_log() as log:
            if sampling.lazy_grammar:
                import ctypes

                patterns = [p.encode("utf-8") for p in sampling.grammar_trigger_patterns]
                words = (ctypes.c_char_p * max(1, len(patterns)))(*patterns)
                ids = (lib.llama_token * max(1, len(sampling.grammar_trigger_tokens)))(
                    *map(int, sampling.grammar_trigger_tokens))
                grammar = lib.llama_sampler_init_grammar_lazy_patterns(
                    model.vocab, sampling.grammar.encode("utf-8"), b"root", words, len(patterns), ids,
                    len(sampling.grammar_trigger_tokens))
            else:
                grammar = lib.llama_sampler_init_grammar(model.vocab, sampling.grammar.encode("utf-8"), b"root")
        if not grammar:
            lib.llama_sampler_free(chain)
            why = " ".join("".join(log).split()) or "see llama.cpp's message above"
            raise UsageError(f"the GBNF grammar does not parse ({why}); its start rule must be named root")
        add(chain, grammar)
    if sampling.presence_penalty:
        init = lib.llama_sampler_init_penalties
        args = (int(penalty_window), constants.DEFAULT_REPEAT_PENALTY, 0.0, float(sampling.presence_penalty))
        # This llama.cpp's signature starts with n_vocab; upstream's does not. ctypes would pass
        # surplus arguments silently, so go by the declared argument count.
        if len(getattr(init, "argtypes", None) or ()) == 5:
            args = (int(model.n_vocab), *args)
        add(chain, init(*args))
    add(chain, lib.llama_sampler_init_top_k(int(sampling.top_k)))
    add(chain, lib.llama_sampler_init_top_p(float(sampling.top_p), 1))
    add(chain, lib.llama_sampler_init_min_p(float(sampling.min_p), 1))
    add(chain, lib.llama_sampler_init_temp(float(sampling.temperature)))
    seed = lib.LLAMA_DEFAULT_SEED if sampling.seed is None else int(sampling.seed) & 0xFFFFFFFF
    add(chain, lib.llama_sampler_init_dist(seed))
    return chain


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclass
class Reply:
    """One assistant turn.

    finish_reason: "stop" (an end token or stop string), "length" (max_tokens or the context
    end), "tool_calls" (ended normally after calling tools, as OpenAI reports it), or
    "interrupted" (cancelled by the caller, e.g. Ctrl-C in the chat REPL).

    usage: prompt_tokens; completion_tokens (sampled, the final end token excluded);
    thinking_tokens (sampled before the thought closed, `</think>` included); cached_tokens
    (prompt tokens reused from the KV cache) and prompt_tokens_decoded (the rest);
    injected_tokens (the thought-closing text the runtime fed in); total_tokens;
    draft_tokens and draft_accepted_tokens (speculative decoding: proposals verified, and kept).
    timings: prompt_s, prompt_tps (decoded prompt tokens/s), gen_s, gen_tps, total_s.
    tokens: the sampled token ids.
    """

    thinking: str = ""
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    tokens: list[int] = field(default_factory=list)

    def message(self) -> dict:
        """The assistant message to append to the history (the thought travels along, as QwQ's
        template expects: it strips the thought of earlier turns itself)."""
        text = f"{self.thinking}\n{constants.THINK_CLOSE}\n\n{self.content}" if self.thinking else self.content
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if self.tool_calls:
            # Arguments as objects: the template writes them with tojson (a string would be
            # written as one quoted JSON string, not as the object the model produced).
            msg["tool_calls"] = [
                {**call, "function": {**call["function"], "arguments": _json_or_text(call["function"]["arguments"])}}
                for call in self.tool_calls]
        return msg

    def to_dict(self) -> dict:
        return {"thinking": self.thinking, "content": self.content, "tool_calls": self.tool_calls,
                "finish_reason": self.finish_reason, "usage": self.usage, "timings": self.timings}


def _json_or_text(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


class Event(NamedTuple):
    """A streamed piece: kind "thinking" or "content" with text, or "done" with the reply."""

    kind: str
    text: str = ""
    reply: Reply | None = None


class Cancel:
    """A plain flag (no lock, so safe to set from a signal handler) that stops generation after
    the current token; the reply keeps what was generated, with finish_reason "interrupted".
    Any object with is_set() works as well, threading.Event included."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set


# ---------------------------------------------------------------------------------------------
# The token loop
# ---------------------------------------------------------------------------------------------

@dataclass
class LoopState:
    """What the loop leaves behind for the caller (also after an early close)."""

    tokens: list[int] = field(default_factory=list)      # sampled tokens (no stop token)
    decoded: list[int] = field(default_factory=list)     # tokens fed into the KV cache
    finish_reason: str = "length"
    thinking_tokens: int = 0
    injected_tokens: int = 0
    gen_seconds: float = 0.0
    draft_tokens: int = 0           # tokens a drafter proposed (speculative decoding)
    draft_accepted_tokens: int = 0  # of those, the ones verification kept


def close_thought(ctx, state: LoopState, utf8, feed, close_tokens: Sequence[int], close_text: str, n_ctx: int,
                  accept: Callable[[int], None] | None) -> Iterator[tuple[str, str]]:
    """Close the thought for the model (its thinking budget is spent, or it ended its turn
    inside the thought while an answer grammar waits): decode the closing tokens and feed their
    text. accept(token) tells the sampler chain about each (None for a grammar that would reject
    text it did not produce). Returns (as a generator's value) False, with finish_reason
    "length", when the closing text does not fit the context. An empty thought (nothing
    generated yet) gets no empty line, as thinking_budget 0's inject_close."""
    if not state.tokens:
        close_text = close_text.lstrip("\n")
    if ctx.n_past + len(close_tokens) >= n_ctx:
        state.finish_reason = "length"
        return False
    ctx.decode(list(close_tokens))
    state.decoded.extend(close_tokens)
    state.injected_tokens += len(close_tokens)
    if accept is not None:
        for t in close_tokens:
            accept(t)
    tail = utf8.decode(b"", final=True)
    yield from feed(tail + close_text)
    return True


def run_loop(lib, ctx, chain, state: LoopState, splitter, *, stop_ids: frozenset[int],
             max_tokens: int | None, thinking_budget: int | None, close_tokens: Sequence[int],
             close_text: str, cancel: Cancel | None, n_ctx: int, accept_injected: bool = True,
             close_at_end: bool = False) -> Iterator[tuple[str, str]]:
    """Sample, decode and split until a stop; yields (kind, text) pieces as they complete.

    The prompt's logits must be ready in ctx. Every sampled token except the final stop token
    goes into the KV cache, so a follow-up turn can reuse it. close_at_end: a stop token sampled
    inside the thought closes the thought instead (close_thought), once, so that an answer
    grammar that starts after it (tool_choice required, response_format) still gets its answer.
    """
    model = ctx.model
    pieces = model._output_cache  # what a generated token shows (Model.output_bytes)
    token_bytes = model.output_bytes
    is_eog = lib.llama_vocab_is_eog
    vocab = model.vocab
    # RPC: reading the logits waits for the workers, so it goes through the guard too.
    sample = through_guard(model, lib.llama_sampler_sample)
    decode_one = ctx.decode_one
    ctx_ptr = ctx.ptr
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    feed = splitter.feed
    tokens = state.tokens
    decoded = state.decoded
    limit = max_tokens if max_tokens is not None else 1 << 62
    budget = thinking_budget if thinking_budget is not None else -1
    thinking = 0
    cancelled = cancel.is_set if cancel is not None else None
    accept = functools.partial(lib.llama_sampler_accept, chain) if accept_injected else None
    started = time.perf_counter()
    try:
        while True:
            if cancelled is not None and cancelled():
                state.finish_reason = "interrupted"
                break
            tok = sample(chain, ctx_ptr, ctx.out_index)
            if tok in stop_ids or is_eog(vocab, tok):
                if close_at_end and splitter.in_thinking:
                    close_at_end = False  # once
                    if (yield from close_thought(ctx, state, utf8, feed, close_tokens, close_text, n_ctx, accept)):
                        continue
                    break
                state.finish_reason = "stop"
                break
            tokens.append(tok)
            was_thinking = splitter.in_thinking
            piece = pieces.get(tok)
            if piece is None:
                piece = token_bytes(tok)
            text = utf8.decode(piece)
            if text:
                for part in feed(text):
                    yield part
            if was_thinking:
                thinking += 1
            if len(tokens) >= limit:
                state.finish_reason = "length"
                break
            if ctx.n_past >= n_ctx:
                state.finish_reason = "length"
                break
            decode_one(tok)
            decoded.append(tok)
            if thinking == budget and splitter.in_thinking:
                # Budget spent inside the thought: close it ourselves and let the model answer.
                budget = -1
                if not (yield from close_thought(ctx, state, utf8, feed, close_tokens, close_text, n_ctx, accept)):
                    break
        tail = utf8.decode(b"", final=True)
        if tail:
            for part in feed(tail):
                yield part
        for part in splitter.finish():
            yield part
    finally:
        state.thinking_tokens = thinking
        state.gen_seconds = time.perf_counter() - started



def inject_close(lib, ctx, chain, splitter, close_tokens: Sequence[int], state: LoopState, thinking_parts: list[str],
                 *, accept: bool) -> Iterator[Event]:
    """thinking_budget 0: close the thought before the first sampled token (the model answers
    at once). accept: tell the chain about the closing tokens (not for a non-lazy grammar,
    which would reject text it did not produce; a lazy one waits for this text)."""
    ctx.decode(list(close_tokens))
    state.decoded.extend(close_tokens)
    state.injected_tokens += len(close_tokens)
    if accept:
        for t in close_tokens:
            lib.llama_sampler_accept(chain, t)
    # The prompt's "<think>\n" already ends a line: no empty thought line is reported.
    for kind, text in splitter.feed(constants.THINKING_CLOSE_TEXT.lstrip("\n")):
        if kind == "thinking":
            thinking_parts.append(text)
        yield Event(kind, text)
