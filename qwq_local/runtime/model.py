"""The model object: load a QwQ GGUF, render prompts with the chosen template, generate with
the thought split from the answer, reuse the KV cache across turns, benchmark.

    model = QwQ.load("qwq:q4_k_m", n_ctx=16384)
    reply = model.chat([{"role": "user", "content": "How many r's in strawberry?"}])
    for event in model.stream(messages):  # Event("thinking"|"content", text) ... Event("done", reply=...)
        ...
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from ..backend import binding as backend
from .. import constants
from .decode import Cancel, Event, LoopState, Reply, Sampling, build_sampler, inject_close, rope_params, run_loop
from .prompt import PromptEncoder, normalizer_of
from ..errors import ContextOverflowError, UsageError
from ..gguf.safe_load import load_model
from .loading import check_parallel, draft_choice, gpu_layers_choice, resolve_path

__all__ = ["QwQ", "Reply", "Event", "Cancel", "rope_params"]

# GGUF files whose altered template was already reported in this process (warn once).
_WARNED_TEMPLATES: set[tuple[str, int, int]] = set()


class QwQ:
    """A loaded QwQ model with one context. Not thread-safe: one generation at a time."""

    def __init__(self, model: backend.Model, ctx: backend.Context, *, template, rope: dict,
                 seed: int | None, kv_type: str, n_ctx: int, normalizer: str = constants.QWEN2_NORMALIZER) -> None:
        self._model = model
        self._ctx = ctx
        self.template = template
        self.rope = rope
        self.seed = seed
        self.kv_type = kv_type
        self.path = model.path
        # llama.cpp rounds its context up (to 256); the limit is what the caller asked for.
        self.n_ctx = min(int(n_ctx), ctx.n_ctx)
        self.gpu_layers = model.n_gpu_layers
        self._cached: list[int] = []  # the tokens the KV cache holds, position by position
        self._eog_ids: list[int] | None = None
        self._busy = False
        self.placement = f"{model.n_gpu_layers} GPU layers"
        # speculative.Speculator when loaded with draft=..., else None (plain decoding); with
        # parallel > 1 one per sequence (_speculators, the owner's first, closed last).
        self.speculator = None
        self._speculators: list = []
        lib = backend.llama()
        self._encoder = PromptEncoder(model, normalizer=normalizer)
        self.normalizer = normalizer
        self._stop_ids = frozenset(t for s in constants.TURN_BOUNDARY_TOKENS for t in self._single_token(s))
        self._close_tokens = self.tokenize(constants.THINKING_CLOSE_TEXT)
        self._lib = lib
        self._shared = None  # backend.batched.SharedContext when loaded with parallel > 1
        self._views: list[QwQ] = []

    # --- loading ------------------------------------------------------------------------------

    @classmethod
    def load(cls, model: str | Path, *, n_ctx: int = constants.DEFAULT_N_CTX,
             gpu_layers: int | str = "auto", kv_type: str = "f16", flash_attn: bool | None = None,
             threads: int | None = None, seed: int | None = None,
             template: str | Path = constants.DEFAULT_TEMPLATE_CHOICE,
             n_batch: int = constants.DEFAULT_N_BATCH,
             rope_scaling: str = constants.DEFAULT_ROPE_SCALING,
             rpc: str | Sequence[str] | None = None, draft: str | Path | None = constants.DEFAULT_DRAFT,
             draft_max: int = constants.DEFAULT_DRAFT_MAX, draft_min: int = constants.DEFAULT_DRAFT_MIN,
             draft_gpu_layers: int | None = None, parallel: int = 1) -> "QwQ":
        """Load a GGUF (a path, or a cached name such as `qwq:q4_k_m`) with one context.

        rope_scaling "auto" applies the card's rule (static YaRN x4, orig ctx 32768, when n_ctx >
        8192; see `rope_params`), "none"/"yarn" force it off/on; `model.rope` says what is in
        effect (after a context shortened to fit memory, too). kv_type q8_0/q4_0 quantize
        the KV cache (needs flash attention, turned on by llama.cpp's auto setting);
        template is "original" (QwQ's released template, the default), "gguf" (the file's own)
        or a path to a .jinja file; rpc: llama.cpp RPC workers ("HOST:PORT", a list or a
        comma-separated string) to offload layers to, placed by plan.devices (docs/rpc.md).

        draft turns on speculative decoding (docs/speculative.md): "ngram" (self-speculation
        from the context) or a path to a small GGUF with QwQ's vocabulary (e.g. a Qwen2.5-0.5B
        quant), loaded with its own context and draft_gpu_layers (None: all layers where this
        llama.cpp offloads to a GPU, else 0), and counted by the memory plan. Each round
        verifies between draft_min and draft_max proposals, as the adaptive length chooses.

        parallel > 1 makes one context with that many sequences (continuous batching, see
        backend/batched.py and `sequences()`): n_ctx is the whole KV cache and each sequence
        holds n_ctx // parallel tokens, as llama-server's slots; `n_ctx` reports the per-sequence
        length. With a draft, each sequence speculates on its own (its verification batch rides
        in the shared batch; a draft model gets a sequence of one draft context per slot).
        """
        from ..chat.template import select_template

        kv_type = kv_type.lower()  # Q8_0 and q8_0 alike, as quant type names
        if kv_type not in constants.KV_TYPES:
            raise UsageError(f"kv_type must be one of {', '.join(constants.KV_TYPES)}, not {kv_type!r}")
        if kv_type != "f16" and flash_attn is False:
            raise UsageError(f"a {kv_type} KV cache needs flash attention; drop flash_attn=False or use kv_type='f16'")
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be >= 1, not {threads}")
        rope_params(n_ctx, rope_scaling)  # range and choice check before any work
        check_parallel(parallel, n_ctx=int(n_ctx))
        path = resolve_path(model)
        draft_path, draft_gpu_layers = draft_choice(draft, draft_gpu_layers, draft_min=draft_min,
                                                     draft_max=draft_max)
        workers: dict[str, Any] = {}
        if rpc:
            from ..plan.devices import load_options_for_workers

            layers, placement, workers = load_options_for_workers(path, rpc, n_ctx=int(n_ctx), kv_type=kv_type,
                                                                  flash_attn=flash_attn, gpu_layers=gpu_layers)
            fitted_ctx = n_ctx
        else:
            layers, fitted_ctx, placement = gpu_layers_choice(
                gpu_layers, path, n_ctx=int(n_ctx), kv_type=kv_type, flash_attn=flash_attn, n_batch=n_batch,
                draft=draft_path, draft_gpu_layers=draft_gpu_layers, n_seq=parallel)
        if fitted_ctx < n_ctx:
            warnings.warn(f"context reduced from {n_ctx} to {fitted_ctx} tokens to fit memory: {placement}",
                          UserWarning, stacklevel=2)
            n_ctx = fitted_ctx
        rope = rope_params(n_ctx, rope_scaling)
        llm = load_model(path, n_gpu_layers=layers, **workers)
        try:
            selection = select_template(template, gguf_template=llm.meta("tokenizer.chat_template"))
            normalizer = normalizer_of(llm.meta(constants.GGUF_NORMALIZER_KEY),
                                       tokenizer_pre=llm.meta("tokenizer.ggml.pre"), source=path.name)
            if selection.warning:
                st = path.stat()
                key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
                if key not in _WARNED_TEMPLATES:
                    _WARNED_TEMPLATES.add(key)
                    warnings.warn(f"{path.name}: {selection.warning}", UserWarning, stacklevel=2)
            ctx_params = dict(n_ctx=int(n_ctx), n_batch=n_batch, n_threads=threads, type_k=kv_type,
                              type_v=kv_type, flash_attn=flash_attn, rope=rope)
            if parallel > 1:
                from ..backend.batched import SharedContext

                shared = SharedContext(llm, n_seq=parallel, **ctx_params)
                ctx = shared.view(0)
            else:
                shared = None
                ctx = backend.Context(llm, **ctx_params)
        except BaseException:
            llm.close()
            raise
        qwq = cls(llm, ctx, template=selection.template, rope=rope, seed=seed, kv_type=kv_type,
                  n_ctx=int(n_ctx) // parallel, normalizer=normalizer)
        qwq._shared = shared
        qwq.placement = placement
        if draft is not None:
            from .speculative import load_speculators

            try:
                qwq._speculators = load_speculators(
                    draft_path or draft, target=llm, n_ctx=int(n_ctx), n_batch=n_batch, threads=threads,
                    kv_type=kv_type, flash_attn=flash_attn, rope=rope, gpu_layers=draft_gpu_layers,
                    draft_min=draft_min, draft_max=draft_max, n_seq=parallel)
                qwq.speculator = qwq._speculators[0]
            except BaseException:
                qwq.close()
                raise
        return qwq

    def sequences(self) -> list["QwQ"]:
        """One QwQ per sequence of the shared context (this object is sequence 0), for the
        server's slots: each has its own KV prefix (and drafter) and generates in a thread of the
        caller's or a job given to `shared.spawn`; their llama_decode calls are merged into one
        batch per step (backend/batched.py). With parallel 1 it is [self]. Closing this object
        closes them all."""
        if self._shared is None:
            return [self]
        if not self._views:
            import copy

            self._views = [self]
            for view in self._shared.views[1:]:
                twin = copy.copy(self)
                twin._ctx, twin._cached, twin._busy, twin._views, twin._shared = view, [], False, [], None
                twin.speculator, twin._speculators = self._speculators[view.seq] if self._speculators else None, []
                twin._owner = self
                self._views.append(twin)
        return list(self._views)

    @property
    def shared(self):
        """The backend.batched.SharedContext of parallel > 1 (its `spawn` runs the server's jobs
        on the decode thread; its `on_decode` hook feeds metrics), else None."""
        return self._shared

    def close(self) -> None:
        """Free the context and the model (also done when the object is collected)."""
        if getattr(self, "_owner", None) is not None:  # a sequence of another QwQ: it owns the context
            self._ctx = None
            return
        if self._shared is not None:
            self._shared.close()
            self._shared = None
            self._ctx = None
        for spec in reversed(self._speculators):
            spec.close()
        self.speculator, self._speculators = None, []
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None

    def __enter__(self) -> "QwQ":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def threads(self) -> int:
        return int(self._ctx.params.n_threads)

    @property
    def extra_bufts(self) -> bool:
        """Whether llama.cpp's extra buffer types (AMX/repack) are in use (see backend)."""
        return self._model.extra_bufts

    # --- text <-> tokens ----------------------------------------------------------------------

    def render_prompt(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Any] | None = None,
                      add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` with this model's template."""
        from ..chat.template import render_prompt

        return render_prompt(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                             template=self.template)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of raw text, normalized as the checkpoint's tokenizer does (NFC for QwQ);
        special tokens written out (`<|im_start|>`, `</think>`) become their ids."""
        self._check_open()
        return self._encoder.encode(text)

    def _check_open(self) -> None:
        if self._ctx is None:
            raise UsageError("this model was closed; load it again")

    def encode_prompt(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Any] | None = None,
                      add_generation_prompt: bool = True, special_in_content: bool = False) -> tuple[str, list[int]]:
        """(prompt text, token ids) for `messages` with this model's template.

        By default control and tag tokens (`<|im_start|>`, `</think>`, `<tool_call>`, ...) come only
        from the template's own text: the same texts inside message contents, tool results,
        tool-call arguments and tool schemas are read as plain text (their ids never appear; the
        ids decode back to the text), so a message cannot forge turns or close the thought.
        For text without such strings the ids equal tokenizing the whole prompt.
        special_in_content=True tokenizes the whole prompt with every special text as a token
        (llama.cpp's raw behaviour). Text is normalized first (see runtime/prompt.py).
        Raises UsageError for malformed messages, TemplateError for template failures.
        """
        from ..chat.template import render_prompt_spans

        self._check_open()
        if special_in_content:
            text = self.render_prompt(messages, tools=tools, add_generation_prompt=add_generation_prompt)
            return text, self._encoder.encode(text)
        text, spans = render_prompt_spans(messages, specials=tuple(self._encoder.specials), tools=tools,
                                          add_generation_prompt=add_generation_prompt, template=self.template)
        return text, self._encoder.encode(text, protected=spans)

    def detokenize(self, tokens: Sequence[int], *, special: bool = True) -> str:
        """The text of `tokens`. special=False gives what generation shows: llama.cpp CONTROL
        tokens other than QwQ's tags show nothing (backend.binding.Model.output_bytes)."""
        return self._model.detokenize(tokens, special=special)

    @property
    def n_vocab(self) -> int:
        """Token ids run 0..n_vocab-1 (logit_bias keys must be in range)."""
        return int(self._model.n_vocab)

    @property
    def think_close_tokens(self) -> list[int]:
        """The ids of `</think>` (one id for QwQ, whose tokenizer has it as an added token)."""
        return self._model.tokenize(constants.THINK_CLOSE, parse_special=True)

    def eog_bias(self) -> dict[int, float]:
        """A logit bias that bans every end-of-generation token."""
        if self._eog_ids is None:
            model = self._model
            self._eog_ids = sorted(self._stop_ids | {t for t in range(model.n_vocab) if model.is_eog(t)})
        return {t: float("-inf") for t in self._eog_ids}

    def _single_token(self, text: str) -> list[int]:
        toks = self._model.tokenize(text, parse_special=True)
        return toks if len(toks) == 1 else []

    # --- generation ---------------------------------------------------------------------------

    def chat(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Any] | None = None,
             max_tokens: int | None = None, thinking_budget: int | None = None, special_in_content: bool = False,
             **sampling: Any) -> Reply:
        """Generate the assistant's next turn; see `stream` for the options."""
        reply = None
        for event in self.stream(messages, tools=tools, max_tokens=max_tokens, thinking_budget=thinking_budget,
                                 special_in_content=special_in_content, **sampling):
            if event.kind == "done":
                reply = event.reply
        assert reply is not None
        return reply

    def stream(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Any] | None = None,
               max_tokens: int | None = None, thinking_budget: int | None = None,
               temperature: float = constants.DEFAULT_TEMPERATURE, top_p: float = constants.DEFAULT_TOP_P,
               top_k: int = constants.DEFAULT_TOP_K, min_p: float = constants.DEFAULT_MIN_P,
               presence_penalty: float = constants.DEFAULT_PRESENCE_PENALTY, seed: int | None = None,
               stop: Sequence[str] | str | None = None, grammar: str | None = None,
               logit_bias: Mapping[int, float] | None = None, ignore_eos: bool = False,
               cancel: Cancel | None = None, special_in_content: bool = False,
               speculative: bool = True) -> Iterator[Event]:
        """Yield Event("thinking", text) and Event("content", text) as tokens arrive, then
        Event("done", reply=Reply).

        Generation starts in the thought only when the rendered prompt ends inside an open
        `<think>` (QwQ's template); otherwise it starts in the answer and enters a thought only if
        the model opens `<think>` itself (chat.reasoning.starts_in_thought).
        max_tokens caps generated tokens (thought included; None: until the context is full);
        thinking_budget caps thinking tokens, counted only while in a thought, after which the
        thought is closed for the model (`\\n</think>\\n\\n` is appended) and it answers.
        Every control token that opens or closes a turn (constants.TURN_BOUNDARY_TOKENS and
        llama.cpp's end-of-generation set) ends generation; none of it reaches the text. stop strings end the answer (they are
        not looked for inside the thought). grammar (GBNF) and logit_bias constrain sampling.
        ignore_eos bans the end tokens (as llama.cpp's --ignore-eos: generation runs to
        max_tokens or the context end). cancel: a `Cancel` (or threading.Event) whose set() stops
        after the current token, or the current batch while the prompt is read (finish_reason
        "interrupted"; the KV cache keeps what was read). special_in_content: see `encode_prompt`.
        Tool calls (chat.reasoning) come back in the reply with finish_reason "tool_calls"
        (except "interrupted"). speculative=False decodes plainly even when the model was loaded
        with a draft.
        """
        prompt, tokens = self.encode_prompt(messages, tools=tools, special_in_content=special_in_content)
        if ignore_eos:
            logit_bias = {**self.eog_bias(), **(logit_bias or {})}
        yield from self.stream_prompt(
            prompt, tokens=tokens, max_tokens=max_tokens, thinking_budget=thinking_budget, stop=stop, cancel=cancel,
            speculative=speculative, sampling=Sampling(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
                              presence_penalty=presence_penalty, seed=self.seed if seed is None else seed,
                              grammar=grammar, logit_bias=logit_bias))

    def stream_prompt(self, prompt: str, *, tokens: Sequence[int] | None = None, sampling: Sampling = Sampling(),
                      max_tokens: int | None = None, thinking_budget: int | None = None,
                      stop: Sequence[str] | str | None = None, cancel: Cancel | None = None,
                      speculative: bool = True) -> Iterator[Event]:
        """`stream` for an already rendered prompt. `tokens`: its ids from `encode_prompt`; None
        tokenizes `prompt` whole, every special text as a token (`tokenize`)."""
        from ..chat.reasoning import ThinkingSplitter, starts_in_thought, turn_tool_calls

        self._check_open()
        if max_tokens is not None and max_tokens < 1:
            raise UsageError(f"max_tokens must be >= 1, not {max_tokens}")
        if thinking_budget is not None and thinking_budget < 0:
            raise UsageError(f"thinking_budget must be >= 0, not {thinking_budget}")
        stops = [stop] if isinstance(stop, str) else [s for s in (stop or ()) if s]
        lib = self._lib
        ctx = self._ctx
        tokens = self.tokenize(prompt) if tokens is None else [int(t) for t in tokens]
        if len(tokens) >= self.n_ctx:
            raise ContextOverflowError(
                f"prompt has {len(tokens)} tokens but the context holds {self.n_ctx}; "
                f"load with a larger n_ctx (up to {constants.MAX_CONTEXT}) or shorten the conversation")
        if self._busy:
            raise UsageError("this model is still generating another reply: finish or close() that stream "
                             "first (one generation at a time per model)")
        chain = build_sampler(lib, self._model, sampling, penalty_window=self.n_ctx)
        spec = self.speculator if speculative else None
        self._busy = True
        state = LoopState()
        splitter = ThinkingSplitter(in_thought=starts_in_thought(prompt))
        thinking_parts: list[str] = []
        content_parts: list[str] = []
        t0 = time.perf_counter()
        try:
            cached, complete = self._prefill(tokens, cancel)
            prompt_s = time.perf_counter() - t0
            # A prefill stopped by `cancel` leaves it set: the loop below ends before sampling.
            no_room = False
            budget = thinking_budget
            if thinking_budget == 0 and complete and splitter.in_thinking:
                budget = None
                # No thought at all: close it before the first sampled token, if it fits.
                no_room = ctx.n_past + len(self._close_tokens) >= self.n_ctx
                if no_room:
                    state.finish_reason = "length"
                else:
                    yield from inject_close(lib, ctx, chain, splitter, self._close_tokens, state, thinking_parts,
                                            accept=not sampling.grammar or sampling.lazy_grammar)
            accept_injected = not sampling.grammar or sampling.lazy_grammar
            # A grammar that starts after the thought asks for an answer: a turn the model ends
            # inside its thought gets the thought closed for it, as a spent thinking budget does.
            close_at_end = sampling.lazy_grammar
            if spec is not None and not no_room:
                from .speculative_loop import run_speculative_loop

                loop = run_speculative_loop(
                    lib, ctx, spec, spec.sampler_class(lib, chain, ctx), state, splitter,
                    history=tokens + state.decoded, stop_ids=self._stop_ids, max_tokens=max_tokens,
                    thinking_budget=budget, close_tokens=self._close_tokens,
                    close_text=constants.THINKING_CLOSE_TEXT, cancel=cancel, n_ctx=self.n_ctx,
                    accept_injected=accept_injected, close_at_end=close_at_end)
            else:
                loop = ((kind, text) for kind, text in ()) if no_room else (
                        run_loop(lib, ctx, chain, state, splitter, stop_ids=self._stop_ids, max_tokens=max_tokens,
                                 thinking_budget=budget, close_tokens=self._close_tokens,
                                 close_text=constants.THINKING_CLOSE_TEXT, cancel=cancel, n_ctx=self.n_ctx,
                                 accept_injected=accept_injected, close_at_end=close_at_end))
            hold = max((len(s) for s in stops), default=1) - 1
            pending = ""  # answer text held back while it could be the start of a stop string
            stopped = False
            for kind, text in loop:
                if kind == "thinking":
                    thinking_parts.append(text)
                    yield Event("thinking", text)
                    continue
                if not stops:
                    content_parts.append(text)
                    yield Event("content", text)
                    continue
                pending += text
                cut = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
                if cut >= 0:
                    pending = pending[:cut]
                    stopped = True
                    break
                if len(pending) > hold:
                    out, pending = pending[:len(pending) - hold], pending[len(pending) - hold:]
                    content_parts.append(out)
                    yield Event("content", out)
            loop.close()
            if pending:
                content_parts.append(pending)
                yield Event("content", pending)
            if stopped:
                state.finish_reason = "stop"
        finally:
            self._busy = False
            lib.llama_sampler_free(chain)
            release = getattr(ctx, "release", None)
            if release is not None:  # a sequence of a shared context: the others stop waiting for it
                release()
            # What the KV cache now holds, for the next request's prefix reuse; after a failure
            # half-way through a decode that is unknown, so the cache starts over.
            if ctx.n_past == len(tokens) + len(state.decoded):
                self._cached = tokens + state.decoded
            elif not state.decoded and self._cached and ctx.n_past == len(self._cached):
                pass  # a prefill cancelled between batches: keep the part it read
            else:
                self._cached = []
                ctx.truncate(0)
        thinking, content, calls = turn_tool_calls("".join(thinking_parts), "".join(content_parts),
                                                   thought_closed=not splitter.in_thinking)
        finish = state.finish_reason
        if calls and finish != "interrupted":
            finish = "tool_calls"
        n_gen = len(state.tokens)
        gen_s = state.gen_seconds
        reply = Reply(
            thinking=thinking, content=content, tool_calls=calls, finish_reason=finish, tokens=list(state.tokens),
            usage={"prompt_tokens": len(tokens), "completion_tokens": n_gen, "thinking_tokens": state.thinking_tokens,
                   "cached_tokens": cached, "prompt_tokens_decoded": len(tokens) - cached,
                   "injected_tokens": state.injected_tokens, "total_tokens": len(tokens) + n_gen,
                   "draft_tokens": state.draft_tokens, "draft_accepted_tokens": state.draft_accepted_tokens},
            timings={"prompt_s": prompt_s, "prompt_tps": (len(tokens) - cached) / prompt_s if prompt_s > 0 else 0.0,
                     "gen_s": gen_s, "gen_tps": n_gen / gen_s if gen_s > 0 else 0.0,
                     "total_s": time.perf_counter() - t0})
        yield Event("done", reply=reply)

    def _prefill(self, tokens: list[int], cancel: Cancel | None = None) -> tuple[int, bool]:
        """Bring the KV cache to `tokens`, reusing the longest cached prefix; returns (prompt
        tokens reused, whether the whole prompt is in). The last prompt token is always decoded
        (its logits start the generation). `cancel` is checked between batches: reading a long
        prompt on a CPU takes minutes, and Ctrl-C must not wait for it."""
        ctx = self._ctx
        cached = self._cached
        n = 0
        limit = min(len(cached), len(tokens) - 1)
        while n < limit and cached[n] == tokens[n]:
            n += 1
        ctx.truncate(n)
        self._cached = tokens[:n]
        pos, step = n, max(1, ctx.n_batch)
        while pos < len(tokens):
            if cancel is not None and cancel.is_set():
                return n, False
            end = min(pos + step, len(tokens))
            self._cached = []  # unknown until this batch is in
            ctx.decode(tokens[pos:end], start_pos=pos)
            self._cached = tokens[:end]
            pos = end
        return n, True

    def reset(self) -> None:
        """Forget the KV cache (the next turn reads its whole prompt)."""
        if self._ctx is not None:
            self._ctx.truncate(0)
        self._cached = []

    # --- benchmark ----------------------------------------------------------------------------

    def bench(self, *, prompt_tokens: int = 512, gen_tokens: int = 128, repetitions: int = 1) -> dict:
        """llama-bench-like speeds: pp (prompt tokens/s, batched) and tg (generated tokens/s,
        one token at a time through the same loop as chat), on an empty KV cache. With a draft
        loaded, tg is also measured with speculation (tg_draft_tps, interleaved with tg) and
        draft_tokens/draft_accepted_tokens count its proposals. See runtime/bench.py."""
        from .bench import bench

        if self._ctx is None or self._busy:
            raise UsageError("bench needs an open model that is not generating")
        return bench(self, self._model, self._ctx, prompt_tokens=prompt_tokens, gen_tokens=gen_tokens,
                     repetitions=repetitions)
