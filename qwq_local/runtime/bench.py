"""QwQ.bench: llama-bench-like pp and tg, with and without speculative decoding."""

from __future__ import annotations

import time

from ..backend import binding as backend
from ..errors import ContextOverflowError, UsageError
from .decode import LoopState, Sampling, build_sampler, run_loop


def bench(qwq, model: backend.Model, ctx: backend.Context, *, prompt_tokens: int, gen_tokens: int,
          repetitions: int) -> dict:
    """pp and tg of `qwq` (a loaded QwQ with its model and context); see QwQ.bench."""
    if prompt_tokens < 1 or gen_tokens < 1:
        raise UsageError("prompt_tokens and gen_tokens must be >= 1")
    if prompt_tokens + gen_tokens + 1 > qwq.n_ctx:
        raise ContextOverflowError(
            f"bench needs {prompt_tokens + gen_tokens + 1} tokens but the context holds {qwq.n_ctx}; "
            "raise --ctx or lower --prompt-tokens/--gen-tokens")
    from ..chat.reasoning import ThinkingSplitter

    lib = backend.llama()
    # Ordinary vocabulary tokens (not control tokens), as llama-bench feeds random ones.
    filler = [t for t in range(min(model.n_vocab, 1000)) if not model.is_eog(t)]
    prompt = [filler[i % len(filler)] for i in range(prompt_tokens)]
    modes = [False, True] if qwq.speculator is not None else [False]

    def one_round(speculative: bool) -> tuple[float, float, int, int]:
        """(pp tokens/s, tg tokens/s, drafted, kept) of one run from an empty KV cache."""
        qwq.reset()
        t = time.perf_counter()
        ctx.decode(prompt, start_pos=0)
        ctx.synchronize()  # GPU and RPC backends compute asynchronously
        pp_tps = prompt_tokens / (time.perf_counter() - t)
        sampling = Sampling(seed=0, logit_bias=qwq.eog_bias())
        state = LoopState()
        loop_options = dict(stop_ids=frozenset(), max_tokens=gen_tokens + 1, thinking_budget=None,
                            close_tokens=(), close_text="", cancel=None, n_ctx=qwq.n_ctx)
        chain = build_sampler(lib, model, sampling, penalty_window=64)
        try:
            if speculative:
                from .speculative_loop import run_speculative_loop

                target = qwq.speculator.sampler_class(lib, chain, ctx)
                for _ in run_speculative_loop(lib, ctx, qwq.speculator, target, state, ThinkingSplitter(),
                                              history=prompt, **loop_options):
                    pass
            else:
                for _ in run_loop(lib, ctx, chain, state, ThinkingSplitter(), **loop_options):
                    pass
        finally:
            lib.llama_sampler_free(chain)
        return (pp_tps, len(state.decoded) / state.gen_seconds, getattr(state, "draft_tokens", 0),
                getattr(state, "draft_accepted_tokens", 0))

    # As llama-bench: a warm-up run of each mode first (caches, page faults, the adaptive draft
    # length's first measurements), not counted; then the modes alternate which goes first, so a
    # machine that slows down or speeds up during the run does not favour one of them.
    for speculative in modes:
        one_round(speculative)
    pp: list[float] = []
    tg: dict[bool, list[float]] = {False: [], True: []}
    drafted = kept = 0
    for rep in range(max(1, repetitions)):
        for speculative in (modes if rep % 2 == 0 else modes[::-1]):
            pp_tps, tg_tps, n_drafted, n_kept = one_round(speculative)
            pp.append(pp_tps)
            tg[speculative].append(tg_tps)
            drafted += n_drafted
            kept += n_kept
    qwq.reset()
    result = {"pp_tps": sum(pp) / len(pp), "tg_tps": sum(tg[False]) / len(tg[False]),
              "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens, "threads": qwq.threads,
              "gpu_layers": qwq.gpu_layers, "n_ctx": qwq.n_ctx, "rope": qwq.rope, "extra_bufts": qwq.extra_bufts,
              "model": str(qwq.path)}
    if qwq.speculator is not None:
        result.update(draft=qwq.speculator.name, tg_draft_tps=sum(tg[True]) / len(tg[True]),
                      draft_tokens=drafted, draft_accepted_tokens=kept)
    return result
