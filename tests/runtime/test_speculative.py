"""Speculative decoding on real llama.cpp with tiny converted models: identity with plain
decoding at temperature 0 where the target's top-1/top-2 margins are wide, the output
distribution when sampling (chi-square, and a wrong acceptance rule that the test catches),
KV rollback after rejections, budget/stops/turns/grammar, vocabulary checks, memory plan, CLI."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from qwq_local import QwQ, constants
from qwq_local.backend import binding as backend
from qwq_local.errors import UsageError
from qwq_local.runtime.speculative import AdaptiveLength, NgramDrafter, TargetSampler

USER = [{"role": "user", "content": "How many r's are in strawberry?"}]
CODE = [{"role": "user", "content": "Rewrite with one change:\ndef add(a, b):\n    return a + b\n"
                                    "def sub(a, b):\n    return a - b\n"}]
# Wider than any float rounding difference between a batched and a one-token decode of an f32
# model (those are ~1e-5 logits; the issue saw a flip at 0.07 on a real Q4 model).
MIN_MARGIN = 0.05


@pytest.fixture(scope="module")
def sharp_gguf(tmp_path_factory):
    """A tiny QwQ-vocabulary model with sharp logits (output matrix x100): wide top-1/top-2
    margins, so identity with plain decoding at temperature 0 is a fair claim on it."""
    from gguf_craft import write_tiny_qwen2

    d = tmp_path_factory.mktemp("sharp")
    return write_tiny_qwen2(d / "sharp.gguf", output_scale=100.0, n_embd=128, n_ff=256, n_layer=2)


@pytest.fixture(scope="module")
def sharp_other_gguf(tmp_path_factory):
    """The same vocabulary with other weights: a draft that is mostly wrong."""
    from gguf_craft import write_tiny_qwen2

    d = tmp_path_factory.mktemp("sharp-other")
    return write_tiny_qwen2(d / "sharp-other.gguf", output_scale=100.0, n_embd=128, n_ff=256, n_layer=2, seed=1)


@pytest.fixture(scope="module")
def other_gguf(tmp_path_factory):
    """Same tokenizer as the tiny model, other random weights: a draft that is often wrong."""
    from qwq_local.convert.pipeline import convert
    from qwq_local.synthetic.factory import make_tiny_checkpoint

    d = tmp_path_factory.mktemp("other")
    return convert(make_tiny_checkpoint(d / "ckpt", seed=11), d / "other-f32.gguf", outtype="f32")


@pytest.fixture(scope="module")
def plain(sharp_gguf):
    m = QwQ.load(sharp_gguf, n_ctx=1024, gpu_layers=0, seed=1, threads=1)
    yield m
    m.close()


@pytest.fixture(scope="module")
def plain_flat(tiny_gguf_f32):
    m = QwQ.load(tiny_gguf_f32, n_ctx=1024, gpu_layers=0, seed=1, threads=1)
    yield m
    m.close()


def load(path, draft, *, fixed: bool = False, draft_max: int = 4, **kw):
    # One thread: on a shared 2-core machine two threads wait on each other (10x slower).
    m = QwQ.load(path, n_ctx=1024, gpu_layers=0, seed=1, threads=1, draft=str(draft), draft_max=draft_max, **kw)
    m.speculator.adaptive.fixed = fixed
    return m


def margins(path, prompt_tokens: list[int], generated: list[int]) -> list[float]:
    """Top-1 minus top-2 logit at each generated position, from one-token decodes."""
    model = backend.Model.load(path)
    ctx = backend.Context(model, n_ctx=1024, n_threads=1)  # same numerics as the threads=1 models
    try:
        ctx.decode(prompt_tokens, start_pos=0)
        out = []
        for tok in generated:
            top = np.sort(ctx.logits(-1))[-2:]
            out.append(float(top[1] - top[0]))
            ctx.decode_one(tok)
        return out
    finally:
        ctx.close()
        model.close()


def greedy(m, messages=USER, **kw) -> object:
    return m.chat(messages, temperature=0.0, **kw)


def assert_wide(path, m, messages, reply) -> None:
    """The precondition of an identity claim: no near-tie at any generated position."""
    found = margins(path, m.tokenize(m.render_prompt(messages)), reply.tokens)
    assert min(found) > MIN_MARGIN, min(found)


# --- exactness at temperature 0 ------------------------------------------------------------

@pytest.fixture(scope="module")
def wide(sharp_gguf, plain) -> int:
    """How many greedy tokens of USER have a top-1/top-2 margin above MIN_MARGIN at every
    position: the stretch on which identity with plain decoding is a fair claim."""
    ref = greedy(plain, max_tokens=200, ignore_eos=True)
    prompt = plain.tokenize(plain.render_prompt(USER))
    found = margins(sharp_gguf, prompt, ref.tokens)
    n = next((i for i, m in enumerate(found) if m <= MIN_MARGIN), len(found))
    assert n >= 100, found[:n + 1]  # long enough to say something
    return n


@pytest.mark.parametrize("draft,fixed", [("ngram", True), ("ngram", False), ("self", True), ("self", False),
                                         ("other", True)])
def test_greedy_output_equals_plain_decoding_where_margins_are_wide(sharp_gguf, sharp_other_gguf, plain, wide,
                                                                      draft, fixed):
    path = {"ngram": "ngram", "self": sharp_gguf, "other": sharp_other_gguf}[draft]
    ref = greedy(plain, max_tokens=wide, ignore_eos=True)
    m = load(sharp_gguf, path, fixed=fixed)
    try:
        got = greedy(m, max_tokens=wide, ignore_eos=True)
    finally:
        m.close()
    assert got.tokens == ref.tokens
    assert (got.thinking, got.content, got.finish_reason) == (ref.thinking, ref.content, ref.finish_reason)
    u = got.usage
    assert u["completion_tokens"] == wide and u["draft_tokens"] > 0
    assert 0 <= u["draft_accepted_tokens"] <= u["draft_tokens"]
    if draft == "self" and fixed:
        # The model as its own draft: every proposal is the target's argmax.
        assert u["draft_accepted_tokens"] == u["draft_tokens"]
    if draft == "other":
        assert u["draft_accepted_tokens"] < u["draft_tokens"]  # rejections happened


def test_kv_rollback_after_rejections_then_next_turn_equals_plain(sharp_gguf, sharp_other_gguf, plain):
    """A wrong draft makes many rejections; whatever the KV cache held of them must be gone:
    the turn, and a follow-up turn that reuses the cache, equal plain decoding."""
    m = load(sharp_gguf, sharp_other_gguf, fixed=True)
    try:
        plain.reset()
        convo, convo_ref = list(CODE), list(CODE)
        for turn in range(2):
            ref = greedy(plain, convo_ref, max_tokens=60, ignore_eos=True)
            assert_wide(sharp_gguf, plain, convo_ref, ref)
            got = greedy(m, convo, max_tokens=60, ignore_eos=True)
            assert got.tokens == ref.tokens, turn
            assert got.usage["draft_accepted_tokens"] < got.usage["draft_tokens"]
            assert got.usage["cached_tokens"] == ref.usage["cached_tokens"]
            if turn:
                assert got.usage["cached_tokens"] > 0
            convo = convo + [got.message(), {"role": "user", "content": "Again, shorter."}]
            convo_ref = convo_ref + [ref.message(), {"role": "user", "content": "Again, shorter."}]
        # The target's KV cache holds what the model object says it holds.
        assert m._ctx.n_past == len(m._cached)
    finally:
        m.close()


@pytest.mark.parametrize("options", [
    {"thinking_budget": 7, "max_tokens": 40, "ignore_eos": True},
    {"thinking_budget": 0, "max_tokens": 20, "ignore_eos": True},
    {"max_tokens": 200},                                     # ends on the model's own end token
    {"max_tokens": 80, "ignore_eos": True, "stop": ["7"]},   # a stop string (if it shows)
])
def test_budget_stops_and_end_tokens_equal_plain(sharp_gguf, plain, options):
    m = load(sharp_gguf, sharp_gguf, fixed=True)
    try:
        ref = greedy(plain, **options)
        got = greedy(m, **options)
        # Whatever ended the turn (also a stop string inside a kept proposal), the KV cache
        # holds what the model object records, for the next turn to reuse.
        assert m._ctx.n_past == len(m._cached) > 0
    finally:
        m.close()
    assert got.tokens == ref.tokens
    assert (got.thinking, got.content, got.finish_reason) == (ref.thinking, ref.content, ref.finish_reason)
    for key in ("thinking_tokens", "injected_tokens", "completion_tokens"):
        assert got.usage[key] == ref.usage[key], key


def test_a_grammar_checks_the_proposals(sharp_gguf, plain):
    """The grammar sits in the chain that verifies: a proposal it forbids is never drawn, so
    it is rejected, and the text is plain decoding's under the grammar."""
    m = load(sharp_gguf, sharp_gguf, fixed=True)
    try:
        grammar = 'root ::= [a-z ]+ "\\n</think>\\n\\n" [0-9]+'
        got = greedy(m, grammar=grammar, max_tokens=40)
        ref = greedy(plain, grammar=grammar, max_tokens=40)
        assert got.tokens == ref.tokens and got.thinking == ref.thinking
        assert re.fullmatch(r"[a-z ]+", ref.thinking)
        assert got.usage["draft_tokens"] > got.usage["draft_accepted_tokens"]  # proposals checked, some refused
        assert greedy(m, max_tokens=30, ignore_eos=True, speculative=False).usage["draft_tokens"] == 0
    finally:
        m.close()


def _answer_sampling(m, eog_boost: float):
    """A lazy answer grammar after the thought (as the server's tool_choice / response_format);
    eog_boost pushes every end token up, so that the model ends its turn inside the thought."""
    from qwq_local.runtime.decode import Sampling
    from qwq_local.serve.grammar import answer_grammar

    g = answer_grammar('digits ::= [0-9]{1,4}\n', "digits", in_thought=True, close_tokens=m.think_close_tokens)
    return Sampling(temperature=0.0, grammar=g.gbnf, grammar_trigger_tokens=g.trigger_tokens,
                    grammar_trigger_patterns=g.trigger_patterns,
                    logit_bias={t: eog_boost for t in m.eog_bias()} if eog_boost else None)


# At once (a boosted end token is the first draw), or after 25 thought tokens where greedy
# decoding of this model ends by itself: there a self-draft of 3 tokens a round proposes that end
# token and verification keeps it (the proposal path of the speculative loop).
ENDS = [pytest.param(USER, 1e4, id="at-once"), pytest.param([{"role": "user", "content": "Write a poem"}], 0.0,
                                                             id="after-25")]


@pytest.mark.parametrize("messages,boost", ENDS)
def test_an_end_inside_the_thought_closes_it_when_an_answer_grammar_waits(sharp_gguf, plain, messages, boost):
    """The model ends its turn inside the thought; with an answer grammar after the thought the
    runtime closes the thought for it (as a spent thinking budget does) and the grammar's
    answer follows, with or without speculation. Without a grammar the turn just ends there."""
    close = len(plain.tokenize(constants.THINKING_CLOSE_TEXT))
    replies = []
    for m in (plain, load(sharp_gguf, sharp_gguf, fixed=True, draft_max=3)):
        try:
            events = list(m.stream_prompt(m.render_prompt(messages), sampling=_answer_sampling(m, boost),
                                          max_tokens=60))
            replies.append(events[-1].reply)
            assert m._ctx.n_past == len(m._cached) > 0
        finally:
            if m is not plain:
                m.close()
    ref, spec = replies
    assert re.fullmatch(r"[0-9]{1,4}", ref.content) and ref.finish_reason == "stop", (ref.thinking, ref.content)
    assert ref.usage["injected_tokens"] == close
    assert not ref.thinking.startswith("\n")  # an empty thought is "", not an empty line
    assert (spec.tokens, spec.thinking, spec.content) == (ref.tokens, ref.thinking, ref.content)
    assert spec.usage["injected_tokens"] == close
    bare = greedy(plain, messages, max_tokens=60, logit_bias={t: boost for t in plain.eog_bias()} if boost else None)
    assert bare.content == "" and bare.finish_reason == "stop" and bare.usage["injected_tokens"] == 0


def test_sampling_at_a_fixed_seed_equals_plain_decoding(sharp_gguf, plain):
    """Every emitted token is one draw of the request's chain, in plain decoding's order."""
    m = load(sharp_gguf, sharp_gguf, fixed=True)
    try:
        for seed in (1, 2, 3):
            options = dict(max_tokens=60, ignore_eos=True, seed=seed, temperature=1.5, top_k=0, top_p=1.0)
            got, ref = m.chat(USER, **options), plain.chat(USER, **options)
            assert got.tokens == ref.tokens
            assert got.usage["draft_tokens"] > got.usage["draft_accepted_tokens"] > 0
    finally:
        m.close()


# --- the distribution when sampling --------------------------------------------------------

def chi2_sf(x: float, dof: int) -> float:
    """P(X >= x) for a chi-square variable (regularised upper incomplete gamma, series form)."""
    a, z = dof / 2.0, x / 2.0
    if z <= 0:
        return 1.0
    term = total = 1.0 / a
    n = 1
    while term > total * 1e-15 and n < 10000:
        term *= z / (a + n)
        total += term
        n += 1
    lower = math.exp(a * math.log(z) - z - math.lgamma(a)) * total
    return max(0.0, 1.0 - lower)


def homogeneity_p(a: list[int], b: list[int]) -> float:
    """Chi-square test that two samples of tokens come from one distribution (categories with
    fewer than 5 expected counts pooled)."""
    cats = sorted(set(a) | set(b), key=lambda t: -(a.count(t) + b.count(t)))
    rows = [[a.count(t) for t in cats], [b.count(t) for t in cats]]
    n = len(a) + len(b)
    cols: list[list[int]] = []
    for j, t in enumerate(cats):
        col = [rows[0][j], rows[1][j]]
        if cols and sum(cols[-1]) * min(len(a), len(b)) / n < 5:
            cols[-1] = [cols[-1][0] + col[0], cols[-1][1] + col[1]]
        else:
            cols.append(col)
    if len(cols) > 1 and sum(cols[-1]) * min(len(a), len(b)) / n < 5:
        last = cols.pop()
        cols[-1] = [cols[-1][0] + last[0], cols[-1][1] + last[1]]
    if len(cols) < 2:
        return 1.0
    stat = 0.0
    for col in cols:
        for i, size in enumerate((len(a), len(b))):
            expected = size * sum(col) / n
            stat += (col[i] - expected) ** 2 / expected
    return chi2_sf(stat, len(cols) - 1)


SAMPLING = dict(temperature=1.0, top_k=6, top_p=0.95, min_p=0.0, presence_penalty=0.5)
N_SEEDS = 300
POSITIONS = (1, 2, 3)  # position 0 is drawn before any proposal exists


def first_tokens(m, seeds, usage: dict | None = None) -> list[list[int]]:
    out = []
    for s in seeds:
        r = m.chat(USER, max_tokens=max(POSITIONS) + 1, ignore_eos=True, seed=s, **SAMPLING)
        out.append(r.tokens)
        if usage is not None:
            for key in ("draft_tokens", "draft_accepted_tokens"):
                usage[key] = usage.get(key, 0) + r.usage[key]
    return out


class KeepEveryProposal(TargetSampler):
    """A deliberately wrong rule: proposals are kept whatever the target thinks of them."""

    def verify(self, logits, proposed):
        return proposed, True


@pytest.fixture(scope="module")
def plain_samples(plain_flat):
    return first_tokens(plain_flat, range(N_SEEDS))


@pytest.mark.parametrize("draft", ["self", "other"])
def test_sampling_distribution_is_unchanged(tiny_gguf_f32, other_gguf, plain_samples, draft):
    m = load(tiny_gguf_f32, tiny_gguf_f32 if draft == "self" else other_gguf, fixed=True, draft_max=3)
    try:
        drafted: dict = {}
        spec = first_tokens(m, range(10_000, 10_000 + N_SEEDS), drafted)
    finally:
        m.close()
    kept, rejected = drafted["draft_accepted_tokens"], drafted["draft_tokens"] - drafted["draft_accepted_tokens"]
    if draft == "self":  # its greedy proposals: kept with probability p(x), often both ways
        assert kept > 50 and rejected > 50, drafted
    else:                # another model's proposals: nearly always the residual draw
        assert rejected > 500, drafted
    for pos in POSITIONS:
        p = homogeneity_p([t[pos] for t in plain_samples], [t[pos] for t in spec])
        assert p > 1e-3, (pos, p)


def test_the_distribution_test_catches_a_wrong_acceptance_rule(tiny_gguf_f32, plain_samples):
    m = load(tiny_gguf_f32, tiny_gguf_f32, fixed=True, draft_max=3)
    m.speculator.sampler_class = KeepEveryProposal
    try:
        wrong = first_tokens(m, range(20_000, 20_000 + N_SEEDS))
    finally:
        m.close()
    ps = [homogeneity_p([t[pos] for t in plain_samples], [t[pos] for t in wrong]) for pos in POSITIONS]
    assert min(ps) < 1e-6, ps


def test_chi2_sf_matches_known_quantiles():
    # Table values: chi-square 0.999 quantiles for 1, 4 and 10 degrees of freedom.
    for x, dof in ((10.828, 1), (18.467, 4), (29.588, 10)):
        assert chi2_sf(x, dof) == pytest.approx(1e-3, rel=1e-2)
    assert chi2_sf(0.0, 3) == 1.0


# --- pieces --------------------------------------------------------------------------------

def test_ngram_drafter_proposes_what_followed_the_longest_earlier_match():
    d = NgramDrafter(n_min=2, n_max=3)
    d.start([1, 2, 3, 4, 5, 9, 2, 3, 7, 8])
    assert d.propose(4) == []            # suffix (7, 8) / (3, 7, 8) never seen before
    d.extend([1, 2, 3])                  # suffix (1, 2, 3): seen at the start, then 4, 5, 9, 2
    assert d.propose(4) == [4, 5, 9, 2]
    d.extend([4, 9, 2, 3])               # (9, 2, 3) beats (2, 3): what followed it was 7, 8
    assert d.propose(2) == [7, 8]
    d.start([5, 5, 5])                   # a run proposes itself
    assert d.propose(3) == [5]


def test_adaptive_length_backs_off_and_comes_back():
    a = AdaptiveLength(draft_min=1, draft_max=8)
    assert a.next_length() == 0          # first: time a plain decode
    a.record_plain(0.010)

    def run(steps: int, kept_share: float, cost: float) -> list[int]:
        """Drive it as the loop does: rounds of k proposals or plain decodes of 10 ms."""
        lengths = []
        for _ in range(steps):
            k = a.next_length()
            lengths.append(k)
            if k:
                a.record_round(k, int(k * kept_share), verify_s=0.010 * (1 + cost * k))
            else:
                a.record_plain(0.010)
        return lengths

    bad = run(400, 0.0, 0.4)             # proposals never kept, a batch position costs 40%
    assert bad[-300:].count(0) > 290     # backed off to plain decoding...
    assert any(k > 0 for k in bad[-300:])  # ... with probes now and then
    good = run(600, 1.0, 0.02)           # then everything is kept and batches are cheap
    assert good[-300:].count(8) > 290    # a probe found it out: back to full length
    with pytest.raises(UsageError):
        AdaptiveLength(draft_min=3, draft_max=2)


def test_draft_with_another_vocabulary_is_refused_naming_the_first_mismatch(tiny_gguf_f32, tmp_path):
    from gguf_craft import tiny_vocab, write_tiny_qwen2

    tokens = list(tiny_vocab()[0])
    tokens[300] = "zz-not-the-same"
    path = write_tiny_qwen2(tmp_path / "other-vocab.gguf", tokens=tokens)
    with pytest.raises(UsageError, match=r"does not share the target's vocabulary: token 300 is .* in the target "
                                         r"but 'zz-not-the-same' in the draft"):
        QwQ.load(tiny_gguf_f32, n_ctx=256, gpu_layers=0, draft=path)


def test_bad_draft_options_are_usage_errors(tiny_gguf_f32):
    with pytest.raises(UsageError, match="draft_min"):
        QwQ.load(tiny_gguf_f32, n_ctx=256, gpu_layers=0, draft="ngram", draft_max=0)
    with pytest.raises(UsageError, match="draft_gpu_layers"):
        QwQ.load(tiny_gguf_f32, n_ctx=256, gpu_layers=0, draft=tiny_gguf_f32, draft_gpu_layers=-2)


def test_memory_plan_counts_the_draft(tiny_gguf_f32, other_gguf):
    from qwq_local.plan.memory import plan

    alone = plan(tiny_gguf_f32, n_ctx=2048, vram=0, ram=1 << 40, repack=False)
    draft = plan(other_gguf, n_ctx=2048, vram=0, ram=1 << 40, repack=False)
    both = plan(tiny_gguf_f32, n_ctx=2048, vram=0, ram=1 << 40, repack=False, draft=other_gguf)
    assert both.total("cpu") == alone.total("cpu") + draft.total("cpu")
    assert both.to_dict()["draft"]["kv_bytes"] == draft.to_dict()["kv_bytes"]
    tight = alone.total("cpu") + constants.PLAN_RAM_MARGIN_BYTES + draft.total("cpu") // 2
    assert plan(tiny_gguf_f32, n_ctx=2048, vram=0, ram=tight, repack=False).fits
    assert not plan(tiny_gguf_f32, n_ctx=2048, vram=0, ram=tight, repack=False, draft=other_gguf).fits


# --- command line --------------------------------------------------------------------------

def test_cli_run_and_bench_with_draft(tiny_gguf_f32):
    from typer.testing import CliRunner

    from qwq_local.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)

    result = invoke("run", "-m", tiny_gguf_f32, "hello", "--ctx", 512, "--gpu-layers", 0, "--temperature", 0,
                    "--max-tokens", 40, "--ignore-eos", "--draft", tiny_gguf_f32, "--draft-max", 3,
                    "--draft-gpu-layers", 0, "--json")
    assert result.exit_code == 0, result.output
    usage = json.loads(result.stdout)["usage"]
    assert usage["draft_tokens"] >= 0 and "draft_accepted_tokens" in usage
    result = invoke("bench", "-m", tiny_gguf_f32, "--prompt-tokens", 32, "--gen-tokens", 16, "--gpu-layers", 0,
                    "--draft", "ngram")
    assert result.exit_code == 0, result.output
    assert re.search(r"tg16\s+[\d.]+ tokens/s\n", result.stdout)
    assert re.search(r"tg16\s+[\d.]+ tokens/s with --draft ngram \([\d.]+x; ", result.stdout)


# --- several slots (QwQ.load(parallel=N)): each speculates inside the shared batch ---------

PARALLEL_PROMPTS = [USER, CODE, [{"role": "user", "content": "List ten colours, one per line."}]]


@pytest.fixture(scope="module")
def parallel_refs(sharp_gguf, plain):
    """Each prompt's greedy reply from plain decoding, cut where its margins stop being wide."""
    refs = []
    for messages in PARALLEL_PROMPTS:
        ref = greedy(plain, messages, max_tokens=60, ignore_eos=True)
        found = margins(sharp_gguf, plain.tokenize(plain.render_prompt(messages)), ref.tokens)
        n = next((i for i, m in enumerate(found) if m <= MIN_MARGIN), len(found))
        assert n >= 30, found[:n + 1]
        refs.append(ref.tokens[:n])
    return refs


@pytest.mark.parametrize("draft,mode", [("ngram", "spawn"), ("ngram", "threads"), ("self", "spawn"),
                                        ("other", "spawn")])
def test_each_slot_speculates_in_the_shared_batch_and_equals_plain(sharp_gguf, sharp_other_gguf, parallel_refs,
                                                                   draft, mode):
    """Three slots generate different replies at once, each verifying its proposals in the
    batch it shares with the others (rows mapped per slot, rejected positions removed from that
    slot's sequence only): every reply equals plain decoding where margins are wide."""
    import threading

    path = {"ngram": "ngram", "self": sharp_gguf, "other": sharp_other_gguf}[draft]
    m = QwQ.load(sharp_gguf, n_ctx=3072, gpu_layers=0, seed=1, threads=1, draft=str(path), draft_max=4,
                 parallel=3)
    try:
        seqs = m.sequences()
        assert len({id(s.speculator) for s in seqs}) == 3  # a drafter and its statistics per slot
        steps: list[tuple[int, int]] = []
        m.shared.on_decode = lambda n_tokens, seqs: steps.append((n_tokens, len(seqs)))
        replies: dict[int, object] = {}
        done = threading.Semaphore(0)

        def job(i: int) -> None:
            try:
                replies[i] = greedy(seqs[i], PARALLEL_PROMPTS[i], max_tokens=len(parallel_refs[i]), ignore_eos=True)
            finally:
                done.release()

        for i in range(3):
            if mode == "spawn":
                m.shared.spawn(lambda i=i: job(i))
            else:
                threading.Thread(target=job, args=(i,)).start()
        for _ in range(3):
            assert done.acquire(timeout=120)
        for i in range(3):
            assert replies[i].tokens == parallel_refs[i], i
            assert replies[i].usage["draft_tokens"] > 0
        # Verification batches of several slots went into one llama_decode.
        assert any(n_seqs >= 2 and n_tokens > n_seqs for n_tokens, n_seqs in steps)
        if draft == "self":
            assert all(r.usage["draft_accepted_tokens"] == r.usage["draft_tokens"] for r in replies.values())
        if draft == "other":
            assert any(r.usage["draft_accepted_tokens"] < r.usage["draft_tokens"] for r in replies.values())
        # The next turn of a slot reuses its KV prefix: nothing rejected was left behind.
        again = greedy(seqs[1], PARALLEL_PROMPTS[1], max_tokens=len(parallel_refs[1]), ignore_eos=True)
        assert again.tokens == parallel_refs[1] and again.usage["cached_tokens"] > 0
    finally:
        m.close()
