"""Speculative decoding: drafters that propose tokens, the target-side rule that keeps or
rejects them, and the adaptive draft length. The token loop that drives them is
speculative_loop.py.

The rule is speculative sampling (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"; Chen et al. 2023): a proposed token x drawn from the drafter's q is kept
with probability min(1, p(x) / q(x)), where p is the target's distribution at that position;
on rejection the token is drawn from norm(max(p - q, 0)). Both drafters here propose
deterministically (n-gram lookup; a draft model's argmax), so q is a point mass at x and the
rule becomes: keep x with probability p(x), otherwise draw from p with x removed, renormalised.
Drawing y from p and keeping x exactly when y == x does both at once: P(keep) = p(x), and a
y != x is distributed as p without x. So verification draws with the request's own llama.cpp
sampler chain (runtime/decode.build_sampler: logit bias, grammar, presence penalty, the card's
top_k -> top_p -> min_p -> temperature, seeded draw) at each batch row and compares. Every
emitted token is one draw of that chain on logits of the same context, in the same order as
plain decoding: at a fixed seed the output is plain decoding's, token for token, except where
batched logits differ in the last bits at a near-tie. A grammar in the chain checks the
proposals too: a proposal the grammar forbids is never drawn, so it is rejected.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

from .. import constants
from ..errors import UsageError


# ---------------------------------------------------------------------------------------------
# Drafters: start(history) once per request, extend(tokens) as tokens are kept, propose(n)
# ---------------------------------------------------------------------------------------------

class NgramDrafter:
    """Self-speculation from the context (prompt + generated so far): the longest suffix of
    n_max down to n_min tokens that occurred earlier proposes the tokens that followed its most
    recent earlier occurrence. No model; a dict lookup per length and token."""

    kind = constants.DRAFT_NGRAM
    costs_decode = False

    def __init__(self, *, n_min: int = constants.NGRAM_MIN, n_max: int = constants.NGRAM_MAX) -> None:
        if not 1 <= n_min <= n_max:
            raise UsageError(f"n-gram sizes must satisfy 1 <= n_min <= n_max, not {n_min}..{n_max}")
        self.n_min, self.n_max = n_min, n_max
        self._hist: list[int] = []
        # n-gram (a tuple) -> the index of the token that followed its latest occurrence.
        self._index: dict[tuple[int, ...], int] = {}

    def start(self, history: Sequence[int]) -> None:
        self._hist = []
        self._index = {}
        self.extend(history)

    def extend(self, tokens: Sequence[int]) -> None:
        hist, index = self._hist, self._index
        lengths = range(self.n_min, self.n_max + 1)
        for tok in tokens:
            j = len(hist)
            for n in lengths:
                if j >= n:
                    index[tuple(hist[j - n:j])] = j
            hist.append(tok)

    def propose(self, n: int) -> list[int]:
        hist = self._hist
        for size in range(self.n_max, self.n_min - 1, -1):
            if len(hist) < size:
                continue
            at = self._index.get(tuple(hist[-size:]))
            if at is not None:
                return hist[at:at + n]
        return []

    def close(self) -> None:
        pass


class ModelDrafter:
    """A small GGUF sharing the target's vocabulary proposes its greedy continuation. It has
    its own context (KV cache) that follows the kept tokens: a common prefix is kept, the rest
    removed with llama_memory_seq_rm (Context.truncate), what is missing decoded."""

    kind = "model"
    costs_decode = True

    def __init__(self, model, ctx, *, n_vocab: int, lock=None, owner=None) -> None:
        self.model = model
        self.ctx = ctx
        # Several slots' drafters share one draft context (ctx: a sequence handle of it each):
        # their proposals must not interleave (lock), and one of them frees that context and the
        # model (owner: the context, given to that one drafter).
        self.lock = lock or contextlib.nullcontext()
        self.owner = owner
        # Only ids the target knows: a draft may have more (padding) rows than the target.
        self.n_vocab = min(n_vocab, model.n_vocab)
        self.path = model.path
        self._hist: list[int] = []
        self._cached: list[int] = []  # what the draft's KV cache holds, position by position

    def start(self, history: Sequence[int]) -> None:
        self._hist = list(history)

    def extend(self, tokens: Sequence[int]) -> None:
        self._hist.extend(tokens)

    def propose(self, n: int) -> list[int]:
        import numpy as np

        with self.lock:
            return self._propose(np, n)

    def _propose(self, np, n: int) -> list[int]:
        ctx, hist, cached = self.ctx, self._hist, self._cached
        n = min(n, ctx.n_ctx - len(hist))
        if n <= 0 or not hist:
            return []
        # Keep the common prefix, but always decode the last history token (its logits start
        # the draft).
        keep = 0
        limit = min(len(cached), len(hist) - 1)
        while keep < limit and cached[keep] == hist[keep]:
            keep += 1
        ctx.truncate(keep)
        ctx.decode(hist[keep:], start_pos=keep)
        out: list[int] = []
        for i in range(n):
            tok = int(np.argmax(ctx.logits(-1)[:self.n_vocab]))
            out.append(tok)
            if i + 1 < n:
                ctx.decode_one(tok)
        self._cached = hist + out[:-1]
        return out

    def close(self) -> None:
        if self.owner is not None:
            self.owner.close()
            if self.model is not None:
                self.model.close()
        self.ctx = self.model = self.owner = None


def check_vocab_compatible(target, draft) -> None:
    """Refuse a draft whose vocabulary is not the target's: same tokenizer type, sizes within
    SPEC_VOCAB_MAX_SIZE_DIFFERENCE (padding rows), the same text and control flag for every
    shared id, and no control token outside the shared range (as llama.cpp's
    common_speculative_are_compatible, which also compares token texts).

    target, draft: backend.Model. Raises UsageError naming the first mismatch."""
    from ..backend import binding as backend

    lib = backend.llama()
    name = draft.path.name
    tv, dv = target.vocab, draft.vocab
    if lib.llama_vocab_type(tv) != lib.llama_vocab_type(dv):
        raise UsageError(f"draft model {name} uses another tokenizer type than the target; "
                         "use a draft from the same family (e.g. a Qwen2.5 GGUF for QwQ)")
    nt, nd = target.n_vocab, draft.n_vocab
    if abs(nt - nd) > constants.SPEC_VOCAB_MAX_SIZE_DIFFERENCE:
        raise UsageError(f"draft model {name} has {nd} tokens and the target {nt}: more than "
                         f"{constants.SPEC_VOCAB_MAX_SIZE_DIFFERENCE} apart, so not the same vocabulary")
    control = lib.LLAMA_TOKEN_ATTR_CONTROL
    text, attr = lib.llama_vocab_get_text, lib.llama_vocab_get_attr
    for i in range(min(nt, nd)):
        a, b = text(tv, i), text(dv, i)
        ca, cb = bool(attr(tv, i) & control), bool(attr(dv, i) & control)
        if a != b or ca != cb:
            def show(t: bytes, c: bool) -> str:
                return repr(t.decode("utf-8", errors="replace")) + (" (control)" if c else "")

            raise UsageError(f"draft model {name} does not share the target's vocabulary: token {i} is "
                             f"{show(a, ca)} in the target but {show(b, cb)} in the draft")
    for model, other in ((target, "target"), (draft, "draft")):
        for i in range(min(nt, nd), model.n_vocab):
            if attr(model.vocab, i) & control:
                raise UsageError(f"draft model {name} does not share the target's vocabulary: control token "
                                 f"{i} ({text(model.vocab, i).decode('utf-8', errors='replace')!r}) exists only "
                                 f"in the {other}")


# ---------------------------------------------------------------------------------------------
# The target side: p after the card's chain, the accept/reject rule, residual draws
# ---------------------------------------------------------------------------------------------

class TargetSampler:
    """The target side of verification for one request: draws with the request's sampler chain
    (build_sampler's, seeded; owned and freed by the caller) from a row of ctx's last batch.

    llama_sampler_sample runs the chain on the row's logits, draws, and accepts the drawn token
    into the chain (the presence penalty and a grammar follow it), exactly as plain decoding."""

    def __init__(self, lib, chain, ctx) -> None:
        from ..backend.binding import through_guard

        self._sample = through_guard(ctx.model, lib.llama_sampler_sample)  # RPC: logits reads wait for workers
        self._accept = lib.llama_sampler_accept
        self._chain = chain
        self._ctx = ctx.ptr
        self._row = ctx.output_row  # a slot's rows sit elsewhere in a shared batch

    def sample(self, row: int = -1) -> int:
        """A token drawn from the target's distribution after the row-th token of the last
        batch (-1: the last)."""
        return self._sample(self._chain, self._ctx, self._row(row))

    def verify(self, row: int, proposed: int) -> tuple[int, bool]:
        """(token, kept): `proposed` is kept with probability p(proposed); otherwise the token
        is a draw from p without it (the residual of a point-mass proposal)."""
        tok = self._sample(self._chain, self._ctx, self._row(row))
        return tok, tok == proposed

    def accept(self, token: int) -> None:
        """Tell the chain about a token it did not draw (the thought-closing text)."""
        self._accept(self._chain, token)


# ---------------------------------------------------------------------------------------------
# Adaptive draft length
# ---------------------------------------------------------------------------------------------

class AdaptiveLength:
    """Chooses how many tokens to draft next from measured costs and the recent acceptance rate.

    With a per-token acceptance rate a, a round of k proposals yields (1 - a^(k+1)) / (1 - a)
    tokens on average (kept proposals + the one the target draws itself) for a cost of
    1 + beta*k (+ draft*k with a draft model) one-token decodes, where beta is the measured extra
    cost of a verification position and draft the measured cost of a draft token. The k in
    [draft_min, draft_max] with the best tokens per cost wins if it beats plain decoding (1 token
    per 1); otherwise plain decoding runs for a pause that doubles (up to SPEC_MAX_PAUSE tokens)
    and then one probe round measures again: when proposals stop paying off, speculation backs off.

    fixed=True always asks for draft_max (benchmarks of the verification cost, tests).
    """

    def __init__(self, *, draft_min: int, draft_max: int, fixed: bool = False) -> None:
        if draft_max < 1 or not 1 <= draft_min <= draft_max:
            raise UsageError(f"need 1 <= draft_min <= draft_max, not draft_min={draft_min}, draft_max={draft_max}")
        self.draft_min, self.draft_max = draft_min, draft_max
        self.fixed = fixed
        self.kept = constants.SPEC_PRIOR_ACCEPT * 2.0  # decayed counts behind the rate
        self.trials = 2.0
        self.t_one: float | None = None  # seconds of a one-token decode
        self.beta = constants.SPEC_PRIOR_BATCH_COST
        self.draft_cost = 0.0
        self.rounds = 0
        self._pause = 0
        self._backoff = 0
        self._probe = False

    def start(self) -> None:
        """A new request: acceptance starts from the prior again (another text), the pause ends;
        the measured costs stay (same model, same machine)."""
        self.kept = constants.SPEC_PRIOR_ACCEPT * 2.0
        self.trials = 2.0
        self._pause = self._backoff = 0
        self._probe = False

    @property
    def rate(self) -> float:
        return self.kept / self.trials if self.trials > 0 else 0.0

    def gain(self, k: int) -> float:
        """Expected tokens per unit of cost for k proposals (k=0: plain decoding, 1.0)."""
        if k <= 0:
            return 1.0
        a = min(self.rate, 0.999)
        return (1.0 - a ** (k + 1)) / (1.0 - a) / (1.0 + (self.beta + self.draft_cost) * k)

    def next_length(self) -> int:
        """Proposals to ask for now; 0 means one plain decode."""
        if self.fixed:
            return self.draft_max
        if self.t_one is None or self.rounds % constants.SPEC_RETIME_ROUNDS == constants.SPEC_RETIME_ROUNDS - 1:
            self.rounds += 1
            return 0  # time a plain decode: the unit of every cost
        self.rounds += 1
        if self._pause > 0:
            self._pause -= 1
            return 0
        best = max(range(self.draft_min, self.draft_max + 1), key=self.gain)
        if self.gain(best) > 1.0:
            self._backoff = 0
            self._probe = False
            return best
        if self._probe:
            self._probe = False
            return max(self.draft_min, min(constants.SPEC_PROBE_LENGTH, self.draft_max))
        self._backoff = min(max(2 * self._backoff, 4), constants.SPEC_MAX_PAUSE)
        self._pause = self._backoff
        self._probe = True
        return 0

    def record_plain(self, seconds: float) -> None:
        d = constants.SPEC_DECAY
        self.t_one = seconds if self.t_one is None else d * self.t_one + (1 - d) * seconds

    def record_round(self, proposed: int, kept: int, *, verify_s: float, draft_s: float = 0.0) -> None:
        """One verification round: `proposed` tokens of which the first `kept` were kept."""
        d = constants.SPEC_DECAY
        self.kept = d * self.kept + kept
        self.trials = d * self.trials + kept + (1 if kept < proposed else 0)
        if self.t_one and proposed:
            beta = max(0.0, (verify_s / self.t_one - 1.0) / proposed)
            self.beta = d * self.beta + (1 - d) * beta
            if draft_s:
                self.draft_cost = d * self.draft_cost + (1 - d) * draft_s / self.t_one / proposed


class Speculator:
    """A drafter with its adaptive length; QwQ holds one when loaded with `draft=`.

    sampler_class is the target-side rule (TargetSampler); tests swap in a wrong one to show
    the distribution test detects it."""

    def __init__(self, drafter, *, draft_min: int = constants.DEFAULT_DRAFT_MIN,
                 draft_max: int = constants.DEFAULT_DRAFT_MAX) -> None:
        self.drafter = drafter
        self.draft_min, self.draft_max = draft_min, draft_max
        self.adaptive = AdaptiveLength(draft_min=draft_min, draft_max=draft_max)
        self.sampler_class = TargetSampler

    @property
    def name(self) -> str:
        """"ngram" or the draft GGUF's path."""
        return self.drafter.kind if self.drafter.kind == constants.DRAFT_NGRAM else str(self.drafter.path)

    def close(self) -> None:
        self.drafter.close()


def load_speculators(draft: str | Path, *, target, n_ctx: int, n_batch: int, threads: int | None,
                     kv_type: str, flash_attn: bool | None, rope: dict | None, gpu_layers: int,
                     draft_min: int, draft_max: int, n_seq: int = 1) -> list[Speculator]:
    """One Speculator per sequence of the target (n_seq: QwQ.load's parallel) for `draft`:
    "ngram", or a GGUF path whose vocabulary matches the target's (validated with qwq_local.gguf
    like every load, then check_vocab_compatible). The draft model gets one context of n_ctx
    tokens with the target's KV type and rope choice and n_seq sequences, one per slot, each
    drafted on its own (as llama-server gives every slot its own draft context).
    The first Speculator owns the draft model and context: close it last.

    Raises UsageError (bad sizes, other vocabulary), ModelNotFoundError, BadModelFileError,
    RuntimeLoadError."""
    AdaptiveLength(draft_min=draft_min, draft_max=draft_max)  # range check before any load
    if str(draft).strip().lower() == constants.DRAFT_NGRAM:
        return [Speculator(NgramDrafter(), draft_min=draft_min, draft_max=draft_max) for _ in range(n_seq)]
    import threading

    from ..backend import binding as backend
    from ..gguf.safe_load import load_model

    path = Path(draft).expanduser()
    model = load_model(path, n_gpu_layers=gpu_layers)
    try:
        check_vocab_compatible(target, model)
        ctx = backend.Context(model, n_ctx=n_ctx, n_batch=n_batch, n_threads=threads, type_k=kv_type,
                              type_v=kv_type, flash_attn=flash_attn, rope=rope, n_seq=n_seq)
    except BaseException:
        model.close()
        raise
    lock = threading.Lock()
    drafters = [ModelDrafter(model, ctx.sequence(i), n_vocab=target.n_vocab, lock=lock, owner=ctx if i == 0 else None)
                for i in range(n_seq)]
    return [Speculator(d, draft_min=draft_min, draft_max=draft_max) for d in drafters]
