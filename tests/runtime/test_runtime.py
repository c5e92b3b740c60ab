"""The runtime on real llama.cpp with tiny converted models: thinking split (also across
tokens), budget, stop tokens, YaRN, context limits, KV reuse, templates, quantized models."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from qwq_local import QwQ, constants
from qwq_local.backend import binding as backend
from qwq_local.runtime.decode import Cancel, rope_params
from qwq_local.errors import ContextOverflowError, UsageError
from qwq_local.chat.template import render_prompt

USER = [{"role": "user", "content": "How many r's are in strawberry?"}]
NEG = float("-inf")


@pytest.fixture(scope="module")
def model(tiny_gguf):
    m = QwQ.load(tiny_gguf, n_ctx=512, gpu_layers=0, seed=7)
    yield m
    m.close()


def tok1(model, text: str) -> int:
    toks = model.tokenize(text)
    assert len(toks) == 1, (text, toks)
    return toks[0]


def stop_bias(model) -> dict[int, float]:
    """Bans every way to end or leave the thought, so the tiny model must keep thinking."""
    return {tok1(model, s): NEG for s in (constants.IM_END, constants.ENDOFTEXT, constants.THINK_CLOSE)}


def pieces(model, tokens):
    return [model.detokenize([t]) for t in tokens]


# --- context and rope ----------------------------------------------------------------------

@pytest.mark.parametrize("n_ctx,scaling", [
    (1, "none"), (4096, "none"), (8192, "none"), (8193, "yarn"), (16384, "yarn"), (32768, "yarn"),
    (32769, "yarn"), (65536, "yarn"), (131072, "yarn")])
def test_rope_rule_follows_the_model_card(n_ctx, scaling):
    """The card: no scaling up to 8192 tokens; above, static YaRN with factor 4 over 32768,
    the same factor whatever the context (static, not dynamic)."""
    rope = rope_params(n_ctx)
    assert rope["scaling"] == scaling and rope["choice"] == "auto"
    if scaling == "none":
        assert (rope["factor"], rope["freq_scale"], rope["orig_ctx"]) == (1.0, 1.0, None)
    else:
        assert (rope["factor"], rope["freq_scale"], rope["orig_ctx"]) == (4.0, 0.25, 32768)


@pytest.mark.parametrize("choice,n_ctx,scaling", [
    ("none", 65536, "none"), ("NONE", 131072, "none"), ("yarn", 512, "yarn"), ("yarn", 8192, "yarn"),
    ("auto", 8192, "none"), ("Auto", 8193, "yarn")])
def test_rope_choice_overrides_the_rule(choice, n_ctx, scaling):
    rope = rope_params(n_ctx, choice)
    assert rope["scaling"] == scaling and rope["choice"] == choice.lower()
    assert rope["freq_scale"] == (0.25 if scaling == "yarn" else 1.0)


@pytest.mark.parametrize("n_ctx,choice", [(0, "auto"), (constants.MAX_CONTEXT + 1, "auto"), (8192, "dynamic"),
                                          (8192, "")])
def test_rope_rule_rejects_bad_input(n_ctx, choice):
    with pytest.raises(UsageError):
        rope_params(n_ctx, choice)


def rope_log(text: str) -> tuple[list[str], list[str]]:
    """What llama.cpp says it applied: `llama_context: freq_scale = ...` and, for YaRN with a
    custom scale, `n_ctx_train adjusted to N` where N = yarn_orig_ctx / freq_scale
    (llama-context.cpp), so 131072 witnesses both the 0.25 scale and the 32768 original."""
    return (re.findall(r"llama_context: freq_scale\s+=\s+(\S+)", text),
            re.findall(r"n_ctx_train adjusted to (\d+)", text))


@pytest.mark.parametrize("n_ctx,choice,freq_scale,yarn", [
    (8192, "auto", "1", False), (8448, "auto", "0.25", True), (16384, "auto", "0.25", True),
    (65536, "auto", "0.25", True), (131072, "auto", "0.25", True),
    (16384, "none", "1", False), (2048, "yarn", "0.25", True)])
def test_llama_cpp_applies_the_chosen_rope(tiny_gguf, n_ctx, choice, freq_scale, yarn):
    with backend.capture_log() as log:
        m = QwQ.load(tiny_gguf, n_ctx=n_ctx, gpu_layers=0, kv_type="q8_0", rope_scaling=choice)
    try:
        assert m.n_ctx == n_ctx
        assert m.rope == rope_params(n_ctx, choice)
        params = m._ctx.params  # the llama_context_params the context was created with
        if yarn:
            assert (params.rope_scaling_type, params.rope_freq_scale, params.yarn_orig_ctx) == (2, 0.25, 32768)
        else:
            assert params.rope_scaling_type == 0
        assert rope_log("".join(log)) == ([freq_scale], ["131072"] if yarn else [])
    finally:
        m.close()


def test_prompt_longer_than_context_is_a_clear_error(model):
    long = [{"role": "user", "content": "strawberry " * 600}]
    n = len(model.tokenize(model.render_prompt(long)))
    with pytest.raises(ContextOverflowError, match=f"prompt has {n} tokens but the context holds 512"):
        model.chat(long, max_tokens=4)
    # The model still works afterwards.
    assert model.chat(USER, max_tokens=3).usage["completion_tokens"] >= 0


def test_reaching_the_context_end_finishes_with_length(tiny_gguf):
    m = QwQ.load(tiny_gguf, n_ctx=64, gpu_layers=0, seed=1)
    try:
        reply = m.chat(USER, logit_bias=stop_bias(m))
        assert reply.finish_reason == "length"
        # Every position is used; the last sampled token had no room to be decoded.
        assert reply.usage["prompt_tokens"] + reply.usage["completion_tokens"] == 64 + 1
    finally:
        m.close()


# --- template ------------------------------------------------------------------------------

def test_render_prompt_of_the_model_is_the_module_function(model):
    tools = [{"type": "function", "function": {"name": "count", "description": "count letters",
                                               "parameters": {"type": "object", "properties": {"word": {"type": "string"}}}}}]
    convo = [{"role": "system", "content": "Be brief."}, *USER,
             {"role": "assistant", "content": "hmm\n</think>\n\nThree."}, {"role": "user", "content": "Sure? ünï"}]
    assert model.render_prompt(convo) == render_prompt(convo)
    assert model.render_prompt(convo, tools=tools) == render_prompt(convo, tools=tools)
    assert model.render_prompt(convo, add_generation_prompt=False) == render_prompt(convo, add_generation_prompt=False)
    assert model.render_prompt(USER).endswith("<|im_start|>assistant\n<think>\n")


def test_altered_gguf_template_warns_once_and_original_is_used(tmp_path):
    from gguf_craft import write_tiny_qwen2

    altered = "{% for m in messages %}<<{{ m.content }}>>{% endfor %}"
    path = write_tiny_qwen2(tmp_path / "altered.gguf", template=altered)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = QwQ.load(path, n_ctx=256, gpu_layers=0)
        second = QwQ.load(path, n_ctx=256, gpu_layers=0)
    ours = [w for w in caught if "differs from QwQ-32B's original" in str(w.message)]
    assert len(ours) == 1
    assert first.render_prompt(USER) == render_prompt(USER)
    gguf_choice = QwQ.load(path, n_ctx=256, gpu_layers=0, template="gguf")
    assert gguf_choice.render_prompt(USER) == "<<How many r's are in strawberry?>>"
    custom = tmp_path / "custom.jinja"
    custom.write_text("[{{ messages[0].content }}]")
    assert QwQ.load(path, n_ctx=256, gpu_layers=0, template=custom).render_prompt(USER) == \
        "[How many r's are in strawberry?]"
    for m in (first, second, gguf_choice):
        m.close()


def test_same_template_in_gguf_does_not_warn(tiny_gguf):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        QwQ.load(tiny_gguf, n_ctx=256, gpu_layers=0).close()
    assert not [w for w in caught if "chat template" in str(w.message)]


# --- thinking ------------------------------------------------------------------------------

def test_think_close_split_across_tokens(model):
    close_id = tok1(model, constants.THINK_CLOSE)
    events = list(model.stream(USER, grammar='root ::= "abc</think>answer"', logit_bias={close_id: NEG}))
    reply = events[-1].reply
    assert events[-1].kind == "done"
    text = pieces(model, reply.tokens)
    assert "".join(text) == "abc</think>answer"
    assert close_id not in reply.tokens and constants.THINK_CLOSE not in text  # really split
    assert reply.thinking == "abc" and reply.content == "answer"
    assert "".join(e.text for e in events if e.kind == "thinking") == "abc"
    assert "".join(e.text for e in events if e.kind == "content") == "answer"
    assert reply.finish_reason == "stop"
    kinds = [e.kind for e in events[:-1]]
    assert kinds == sorted(kinds, key=["thinking", "content"].index)  # thought first, then answer


def test_think_close_as_one_token_and_leading_whitespace_stripped(model):
    close_id = tok1(model, constants.THINK_CLOSE)
    reply = model.chat(USER, grammar='root ::= "x" "</think>" "\\n\\n  hi"', logit_bias={close_id: 30.0})
    assert close_id in reply.tokens
    assert reply.thinking == "x" and reply.content == "hi"


def test_control_tokens_show_no_text(model):
    """A generated CONTROL token (`<|image_pad|>`, marked special among QwQ's added tokens) shows
    no text, as in llama-server (token_to_piece, special=false) and vLLM (skip_special_tokens);
    the tokens themselves stay in the reply and the KV cache."""
    pad = tok1(model, "<|image_pad|>")
    reply = model.chat(USER, max_tokens=3, logit_bias={pad: 100.0})
    assert reply.tokens == [pad] * 3 and reply.thinking == "" and reply.content == ""
    assert model.detokenize(reply.tokens) == "<|image_pad|>" * 3
    assert model.detokenize(reply.tokens, special=False) == ""


def test_qwq_tags_show_even_where_a_gguf_marks_them_control(tmp_path):
    from gguf_craft import write_tiny_qwen2
    from qwq_local import QwQ

    tags = [constants.THINK_OPEN, constants.THINK_CLOSE, constants.TOOL_CALL_OPEN, constants.TOOL_CALL_CLOSE]
    path = write_tiny_qwen2(tmp_path / "control-tags.gguf", token_types={t: 3 for t in tags})
    with QwQ.load(path, n_ctx=256, threads=1) as m:
        ids = [tok1(m, t) for t in tags]
        assert m.detokenize(ids, special=False) == "".join(tags)
        assert m.detokenize([tok1(m, "<|im_start|>")], special=False) == ""


def test_multibyte_characters_split_across_tokens(model):
    reply = model.chat(USER, grammar='root ::= "é中🙂</think>ü"')
    assert any(len(model._model.token_bytes(t)) == 1 and model._model.token_bytes(t)[0] >= 0x80 for t in reply.tokens)
    assert reply.thinking == "é中🙂" and reply.content == "ü"


def test_thinking_budget_closes_the_thought_then_answers(model):
    prompt_tokens = model.tokenize(model.render_prompt(USER))
    bias = stop_bias(model)
    reply = model.chat(USER, thinking_budget=4, max_tokens=12, logit_bias=bias)
    close = model.tokenize(constants.THINKING_CLOSE_TEXT)
    assert reply.usage["thinking_tokens"] == 4
    assert reply.usage["injected_tokens"] == len(close)
    assert reply.usage["completion_tokens"] == 12
    assert reply.finish_reason == "length"
    assert reply.thinking == model.detokenize(reply.tokens[:4]) + "\n"
    assert reply.content and reply.content == model.detokenize(reply.tokens[4:]).lstrip()
    # The close text sits in the KV cache right after the 4 thinking tokens.
    assert model._cached[len(prompt_tokens) + 4:len(prompt_tokens) + 4 + len(close)] == close


def test_thinking_budget_zero_answers_at_once(model):
    reply = model.chat(USER, thinking_budget=0, max_tokens=5, logit_bias=stop_bias(model))
    assert reply.thinking == "" and reply.usage["thinking_tokens"] == 0
    assert reply.content


def test_thinking_budget_zero_without_room_to_close_finishes_with_length(model, tiny_gguf):
    """The closing text does not fit after the prompt: the reply ends with "length" instead of
    overrunning the context (or raising from llama.cpp)."""
    n_prompt = len(model.tokenize(model.render_prompt(USER)))
    m = QwQ.load(tiny_gguf, n_ctx=n_prompt + 2, gpu_layers=0, seed=1)
    try:
        reply = m.chat(USER, thinking_budget=0, logit_bias=stop_bias(m))
        assert reply.finish_reason == "length"
        assert reply.usage["completion_tokens"] == 0 and reply.thinking == "" and reply.content == ""
        assert m.chat(USER, thinking_budget=0, max_tokens=1).finish_reason == "length"  # still usable
    finally:
        m.close()


def test_without_budget_everything_is_thought(model):
    reply = model.chat(USER, max_tokens=10, logit_bias=stop_bias(model))
    assert reply.usage["thinking_tokens"] == 10 and reply.content == ""
    assert reply.thinking == model.detokenize(reply.tokens)


# --- stopping ------------------------------------------------------------------------------

@pytest.mark.parametrize("stop_text", [constants.IM_END, constants.ENDOFTEXT])
def test_stop_tokens_end_generation(model, stop_text):
    stop_id = tok1(model, stop_text)
    reply = model.chat(USER, max_tokens=50, logit_bias={stop_id: 100.0})
    assert reply.finish_reason == "stop"
    assert reply.usage["completion_tokens"] == 0 and reply.tokens == []


def test_stop_after_grammar_completes(model):
    reply = model.chat(USER, grammar='root ::= "t</think>done"', max_tokens=200)
    assert reply.finish_reason == "stop" and reply.content == "done"
    assert model.detokenize(reply.tokens) == "t</think>done"  # the end token is not part of the text


def test_stop_strings_cut_the_answer(model):
    events = list(model.stream(USER, grammar='root ::= "t</think>hello STOP more"', stop=["STOP"]))
    reply = events[-1].reply
    assert reply.content == "hello " and reply.finish_reason == "stop"
    assert "STOP" not in "".join(e.text for e in events if e.kind == "content")


def test_max_tokens_finishes_with_length(model):
    reply = model.chat(USER, max_tokens=7, logit_bias=stop_bias(model))
    assert reply.finish_reason == "length" and reply.usage["completion_tokens"] == 7


def test_tool_calls_are_parsed(model):
    call = '<tool_call>\\n{\\"name\\": \\"count\\", \\"arguments\\": {\\"word\\": \\"strawberry\\"}}\\n</tool_call>'
    tools = [{"type": "function", "function": {"name": "count", "parameters": {"type": "object"}}}]
    reply = model.chat(USER, tools=tools, grammar=f'root ::= "ok</think>\\n\\n{call}"')
    assert reply.finish_reason == "tool_calls"
    assert [c["function"]["name"] for c in reply.tool_calls] == ["count"]
    assert json.loads(reply.tool_calls[0]["function"]["arguments"]) == {"word": "strawberry"}
    assert reply.content == ""
    msg = reply.message()
    assert msg["tool_calls"][0]["function"]["arguments"] == {"word": "strawberry"}


def test_cancel_keeps_the_partial_answer(model):
    cancel = Cancel()
    seen = []
    for event in model.stream(USER, max_tokens=10_000, logit_bias=stop_bias(model), cancel=cancel):
        if event.kind == "done":
            reply = event.reply
        else:
            seen.append(event.text)
            if len(seen) == 5:
                cancel.set()
    assert reply.finish_reason == "interrupted"
    assert 5 <= reply.usage["completion_tokens"] < 20
    assert reply.thinking == "".join(seen)


# --- sampling ------------------------------------------------------------------------------

def test_same_seed_same_tokens_and_different_seed_differs(model):
    a = model.chat(USER, max_tokens=20, seed=3, logit_bias=stop_bias(model), temperature=1.5, top_k=0, top_p=1.0)
    b = model.chat(USER, max_tokens=20, seed=3, logit_bias=stop_bias(model), temperature=1.5, top_k=0, top_p=1.0)
    c = model.chat(USER, max_tokens=20, seed=4, logit_bias=stop_bias(model), temperature=1.5, top_k=0, top_p=1.0)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_top_k_one_is_greedy(model):
    ctx = model._ctx
    model.reset()
    prompt = model.tokenize(model.render_prompt(USER))
    ctx.decode(prompt, start_pos=0)
    argmax = int(ctx.logits(-1).argmax())
    model.reset()
    reply = model.chat(USER, max_tokens=1, top_k=1, temperature=1.0, seed=0)
    assert reply.tokens == [argmax]


def test_sampler_chain_follows_the_cards_order(model):
    from qwq_local.runtime.decode import Sampling, build_sampler

    lib = backend.llama()
    chain = build_sampler(lib, model._model, Sampling(presence_penalty=0.5, logit_bias={1: -1.0},
                                                      grammar='root ::= "a"'), penalty_window=64)
    try:
        names = [lib.llama_sampler_name(lib.llama_sampler_chain_get(chain, i)).decode()
                 for i in range(lib.llama_sampler_chain_n(chain))]
    finally:
        lib.llama_sampler_free(chain)
    assert [n.lstrip("?") for n in names] == ["logit-bias", "grammar", "penalties", "top-k", "top-p", "min-p",
                                              "temp", "dist"]


def test_presence_penalty_discourages_repeats(model):
    plain = model.chat(USER, max_tokens=30, top_k=1, ignore_eos=True)
    penalised = model.chat(USER, max_tokens=30, top_k=1, ignore_eos=True, presence_penalty=2.0)
    assert len(set(penalised.tokens)) > len(set(plain.tokens))


def test_bad_sampling_values_are_usage_errors(model):
    with pytest.raises(UsageError, match="top_p"):
        model.chat(USER, top_p=0.0, max_tokens=1)
    with pytest.raises(UsageError, match="temperature"):
        model.chat(USER, temperature=-1, max_tokens=1)


# --- KV cache reuse ------------------------------------------------------------------------

def test_follow_up_turn_decodes_only_the_new_suffix(model):
    model.reset()
    first = model.chat(USER, max_tokens=8, logit_bias=stop_bias(model), seed=1)
    assert first.usage["cached_tokens"] == 0
    history = USER + [first.message(), {"role": "user", "content": "And in raspberry?"}]
    follow = model.chat(history, max_tokens=8, top_k=1, seed=1)
    full = len(model.tokenize(model.render_prompt(history)))
    assert follow.usage["prompt_tokens"] == full
    assert follow.usage["cached_tokens"] >= first.usage["prompt_tokens"] - 4
    assert follow.usage["prompt_tokens_decoded"] == full - follow.usage["cached_tokens"] < full
    # Reusing the cache changes nothing: a cold run of the same prompt samples the same tokens.
    model.reset()
    cold = model.chat(history, max_tokens=8, top_k=1, seed=1)
    assert cold.usage["cached_tokens"] == 0
    assert cold.tokens == follow.tokens


def test_same_prompt_again_reuses_all_but_the_last_token(model):
    model.chat(USER, max_tokens=2)
    again = model.chat(USER, max_tokens=2)
    assert again.usage["cached_tokens"] == again.usage["prompt_tokens"] - 1


def test_edited_history_reuses_only_the_common_prefix(model, tiny_gguf):
    """A client that edits an earlier message: the cache is cut back to the tokens the old and
    new prompts share, never reused past them. The reply (sampled, not greedy) matches a fresh
    context fed the same prefix and rest, token for token."""
    model.reset()
    first = model.chat(USER, max_tokens=6, logit_bias=stop_bias(model), seed=1)
    history = USER + [first.message(), {"role": "user", "content": "And in raspberry?"}]
    model.chat(history, max_tokens=6, logit_bias=stop_bias(model), seed=1)
    edited = [{"role": "user", "content": "How many r's are in cranberry?"}] + history[1:]
    old = model._cached
    new = model.tokenize(model.render_prompt(edited))
    common = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    assert 0 < common < len(new) - 10
    options = dict(max_tokens=12, logit_bias=stop_bias(model), seed=5, temperature=1.0, top_k=0)
    warm = model.chat(edited, **options)
    assert warm.usage["cached_tokens"] == common
    fresh = QwQ.load(tiny_gguf, n_ctx=512, gpu_layers=0, seed=7)
    try:
        fresh._ctx.decode(new[:common], start_pos=0)
        fresh._cached = new[:common]
        cold = fresh.chat(edited, **options)
        assert cold.usage["cached_tokens"] == common
        assert cold.tokens == warm.tokens
    finally:
        fresh.close()


# --- other model files ---------------------------------------------------------------------

def test_q4_k_m_model_runs(tiny_gguf_q4km):
    m = QwQ.load(tiny_gguf_q4km, n_ctx=512, gpu_layers="auto", seed=0)
    try:
        if not backend.llama().llama_supports_gpu_offload():
            assert m.gpu_layers == 0 and "no GPU offload" in m.placement
        assert m.extra_bufts == backend.extra_bufts_allowed()
        long = [{"role": "user", "content": "strawberry " * 40}]  # a multi-token prompt batch
        reply = m.chat(long, max_tokens=16, logit_bias=stop_bias(m))
        assert reply.usage["completion_tokens"] == 16 and reply.finish_reason == "length"
        assert reply.usage["prompt_tokens"] > 100
        bench = m.bench(prompt_tokens=64, gen_tokens=8)
        assert bench["pp_tps"] > 0 and bench["tg_tps"] > 0
    finally:
        m.close()


def test_closed_model_refuses_politely(tiny_gguf):
    m = QwQ.load(tiny_gguf, n_ctx=128, gpu_layers=0)
    m.close()
    with pytest.raises(UsageError, match="closed"):
        m.chat(USER)


def test_bad_load_options(tiny_gguf):
    with pytest.raises(UsageError, match="kv_type"):
        QwQ.load(tiny_gguf, kv_type="q5_1", gpu_layers=0)
    with pytest.raises(UsageError, match="flash attention"):
        QwQ.load(tiny_gguf, kv_type="q8_0", flash_attn=False, gpu_layers=0)
    with pytest.raises(UsageError, match="gpu_layers"):
        QwQ.load(tiny_gguf, gpu_layers="most")


def test_ignore_eos_runs_to_max_tokens(model):
    stop_id = tok1(model, constants.IM_END)
    assert stop_id in model.eog_bias()
    reply = model.chat(USER, max_tokens=30, ignore_eos=True, temperature=1.5, top_k=0, top_p=1.0, seed=11)
    assert reply.finish_reason == "length" and reply.usage["completion_tokens"] == 30
    assert not set(reply.tokens) & set(model.eog_bias())


def test_bad_grammar_is_a_usage_error_and_the_model_goes_on(model):
    with pytest.raises(UsageError, match="grammar does not parse"):
        model.chat(USER, grammar="root ::= (", max_tokens=3)
    assert model.chat(USER, max_tokens=2, logit_bias=stop_bias(model)).usage["completion_tokens"] == 2


def test_abandoned_stream_leaves_a_consistent_cache(model):
    for event in model.stream(USER, max_tokens=50, logit_bias=stop_bias(model)):
        if event.kind == "thinking":
            break
    again = model.chat(USER, max_tokens=3, top_k=1)
    assert again.usage["cached_tokens"] == again.usage["prompt_tokens"] - 1
    model.reset()
    assert model.chat(USER, max_tokens=3, top_k=1).tokens == again.tokens


def test_cancel_while_reading_a_long_prompt_stops_between_batches(tiny_gguf):
    m = QwQ.load(tiny_gguf, n_ctx=512, gpu_layers=0, seed=1, n_batch=64)
    try:
        long = [{"role": "user", "content": "strawberry " * 40}]
        tokens = m.tokenize(m.render_prompt(long))
        assert len(tokens) > 3 * 64

        class AfterTwoBatches:  # Ctrl-C arriving while the third batch of the prompt is read
            calls = 0

            def is_set(self):
                self.calls += 1
                return self.calls > 2

        reply = m.chat(long, max_tokens=5, cancel=AfterTwoBatches())
        assert reply.finish_reason == "interrupted" and reply.tokens == []
        assert m._cached == tokens[:128] and m._ctx.n_past == 128  # what was read is kept
        again = m.chat(long, max_tokens=3, top_k=1)
        assert again.usage["cached_tokens"] == 128
        m.reset()
        assert m.chat(long, max_tokens=3, top_k=1).tokens == again.tokens
    finally:
        m.close()


def test_a_threading_event_cancels_too(model):
    import threading

    stop_now = threading.Event()
    stop_now.set()
    reply = model.chat(USER, max_tokens=100, logit_bias=stop_bias(model), cancel=stop_now)
    assert reply.finish_reason == "interrupted" and reply.usage["completion_tokens"] == 0


def test_one_generation_at_a_time(model):
    first = model.stream(USER, max_tokens=20, logit_bias=stop_bias(model))
    next(first)
    with pytest.raises(UsageError, match="still generating"):
        model.chat(USER, max_tokens=2)
    first.close()
    assert model.chat(USER, max_tokens=2, logit_bias=stop_bias(model)).usage["completion_tokens"] == 2


def test_decode_loop_overhead_over_bare_llama_cpp_is_small(tiny_gguf_q4km):
    """qwq-local's loop vs decode+sample alone, same model, context and sampler chain. CPU time
    (one thread computes in this process) so other processes on the machine matter less."""
    import time

    from qwq_local.runtime.decode import Sampling, build_sampler

    n = 200
    with QwQ.load(tiny_gguf_q4km, n_ctx=512, gpu_layers=0, threads=1, seed=0) as m:
        lib = backend.llama()
        prompt_text = m.render_prompt(USER)
        prompt = m.tokenize(prompt_text)
        bias = m.eog_bias()
        bare_ctx = backend.Context(m._model, n_ctx=512, n_threads=1)

        def bare() -> float:
            bare_ctx.truncate(0)
            bare_ctx.decode(prompt, start_pos=0)
            chain = build_sampler(lib, m._model, Sampling(seed=0, logit_bias=bias), penalty_window=64)
            tok = lib.llama_sampler_sample(chain, bare_ctx.ptr, -1)
            start = time.process_time()
            for _ in range(n):
                bare_ctx.decode_one(tok)
                tok = lib.llama_sampler_sample(chain, bare_ctx.ptr, -1)
            spent = time.process_time() - start
            lib.llama_sampler_free(chain)
            return spent / n

        def ours() -> float:
            m.reset()
            start = None
            for event in m.stream_prompt(prompt_text, sampling=Sampling(seed=0, logit_bias=bias), max_tokens=n + 1):
                if start is None:
                    start = time.process_time()
            return (time.process_time() - start) / n

        rounds = [(bare(), ours()) for _ in range(3)]
        bare_ctx.close()
    best_bare = min(r[0] for r in rounds)
    best_ours = min(r[1] for r in rounds)
    assert best_ours - best_bare < 0.3e-3, rounds


def test_rope_scaling_in_the_gguf_is_ignored_up_to_8192(tmp_path):
    """Some GGUFs carry static YaRN in their metadata; QwQ's card says not to use it at or
    below 8192 tokens, and the runtime overrides it (llama.cpp's own log is the witness)."""
    import gguf
    from gguf_craft import write_tiny_qwen2

    T = gguf.GGUFValueType
    path = write_tiny_qwen2(tmp_path / "yarn-meta.gguf", extra={
        "qwen2.rope.scaling.type": ("yarn", T.STRING), "qwen2.rope.scaling.factor": (4.0, T.FLOAT32),
        "qwen2.rope.scaling.original_context_length": (32768, T.UINT32)})

    def freq_scale(load) -> list[str]:
        with backend.capture_log() as log:
            obj = load()
        obj.close()
        return re.findall(r"llama_context: freq_scale\s+=\s+(\S+)", "".join(log))

    model = backend.Model.load(path)
    try:  # what llama.cpp would do on its own: the file's factor 4
        assert freq_scale(lambda: backend.Context(model, n_ctx=8192)) == ["0.25"]
    finally:
        model.close()
    assert freq_scale(lambda: QwQ.load(path, n_ctx=8192, gpu_layers=0)) == ["1"]
    assert freq_scale(lambda: QwQ.load(path, n_ctx=16384, gpu_layers=0, rope_scaling="none")) == ["1"]
    assert freq_scale(lambda: QwQ.load(path, n_ctx=65536, gpu_layers=0)) == ["0.25"]


def test_parallel_sequences_split_the_context(tiny_gguf):
    from qwq_local import QwQ

    with QwQ.load(tiny_gguf, n_ctx=1024, threads=1, parallel=4) as m:
        seqs = m.sequences()
        assert len(seqs) == 4 and seqs[0] is m
        assert all(s.n_ctx == 256 for s in seqs)
        user = [{"role": "user", "content": "hi"}]
        assert seqs[3].chat(user, max_tokens=3, temperature=0).tokens == seqs[0].chat(user, max_tokens=3,
                                                                                      temperature=0).tokens


def test_jobs_spawned_on_the_decode_thread_share_its_batches(tiny_gguf):
    """shared.spawn runs each sequence's generation as a greenlet on the decode thread: one
    llama_decode per step carries every sequence's token, and each reply equals the same
    request run alone (temperature 0)."""
    import threading

    from qwq_local import QwQ

    prompts = [[{"role": "user", "content": f"count to {i}"}] for i in range(3)]
    with QwQ.load(tiny_gguf, n_ctx=1536, threads=1, parallel=3) as m:
        seqs, bias = m.sequences(), m.eog_bias()
        alone = [seqs[0].chat(p, max_tokens=12, temperature=0, logit_bias=bias).tokens for p in prompts]
        steps: list[tuple[int, int]] = []
        m.shared.on_decode = lambda n_tokens, seqs: steps.append((n_tokens, len(seqs)))
        threads: set[str] = set()
        replies: dict[int, list[int]] = {}
        done = threading.Semaphore(0)

        def job(i: int) -> None:
            try:
                threads.add(threading.current_thread().name)
                replies[i] = seqs[i].chat(prompts[i], max_tokens=12, temperature=0, logit_bias=bias).tokens
            finally:
                done.release()

        for i in range(3):
            m.shared.spawn(lambda i=i: job(i))
        for _ in range(3):
            assert done.acquire(timeout=60)
        assert threads == {"qwq-decode"}
        assert [replies[i] for i in range(3)] == alone
        # Once all three generate, every decode carries one token of each (the prompts ride
        # along in the first steps).
        assert sum(1 for n_tokens, n_seqs in steps if n_tokens == 3 and n_seqs == 3) >= 10


def test_a_batch_lists_its_sequences_in_ascending_order(tiny_gguf):
    """With one KV stream per sequence llama.cpp cuts a batch into ubatches of consecutive,
    increasing sequence ids (llama_batch_allocr::split_equal): sequences 2,1,0 in that order
    would cost three decodes. Jobs started in reverse order still share ascending batches."""
    import threading

    from qwq_local import QwQ

    with QwQ.load(tiny_gguf, n_ctx=1536, threads=1, parallel=3) as m:
        seqs, bias = m.sequences(), m.eog_bias()
        batches: list[tuple[int, ...]] = []
        m.shared.on_decode = lambda n_tokens, order: batches.append(order)
        done = threading.Semaphore(0)

        def job(i: int) -> None:
            try:
                seqs[i].chat([{"role": "user", "content": "hello"}], max_tokens=6, temperature=0, logit_bias=bias)
            finally:
                done.release()

        for i in (2, 1, 0):
            m.shared.spawn(lambda i=i: job(i))
        for _ in range(3):
            assert done.acquire(timeout=60)
        assert (0, 1, 2) in batches
        assert all(list(order) == sorted(order) for order in batches), batches


def test_closing_the_shared_context_unwinds_spawned_jobs(tiny_gguf):
    import threading

    from qwq_local import QwQ

    m = QwQ.load(tiny_gguf, n_ctx=65536, threads=1, parallel=2)  # 32K per slot: still generating at close
    seqs, bias = m.sequences(), m.eog_bias()
    started, ended = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def endless() -> None:
        try:
            for event in seqs[1].stream([{"role": "user", "content": "go"}], max_tokens=100000, logit_bias=bias):
                started.set()
        except BaseException as exc:  # the close below ends the stream with an error
            errors.append(exc)
        finally:
            ended.set()

    m.shared.spawn(endless)
    assert started.wait(60)
    m.close()
    assert ended.wait(10) and errors and "closed" in str(errors[0])
