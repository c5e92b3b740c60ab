"""Chat template: parity with Hugging Face transformers, template choice, sandbox limits."""

from __future__ import annotations

import json
import random
import threading
import time

import pytest
import transformers  # in the `test` extra: parity is checked against the real thing

from qwq_local import constants
from qwq_local.errors import TemplateError, UsageError
from qwq_local.chat.template import ORIGINAL_TEMPLATE_PATH, ChatTemplate, render_prompt, select_template


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    tok = transformers.AutoTokenizer.from_pretrained(tiny_checkpoint)
    # The tiny checkpoint ships QwQ's template in tokenizer_config.json, as the real one does.
    assert tok.chat_template == ORIGINAL_TEMPLATE_PATH.read_text()
    return tok


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather — Wetter ☀ 天气",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name"},
                           "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
BARE_TOOL = {"name": "now", "description": "Time <b>&</b> date", "parameters": {"type": "object", "properties": {}}}


def get_time(zone: str, precise: bool = False) -> str:
    """Current time in a time zone.

    Args:
        zone: IANA zone name, e.g. Europe/Paris
        precise: whether to include seconds
    """
    return ""


USER = {"role": "user", "content": "What is 2+2?"}
THOUGHT_REPLY = {"role": "assistant", "content": "<think>\nSimple: 4.\n</think>\n\nIt is **4**."}

CONVERSATIONS = {
    "single_user": [USER],
    "system": [{"role": "system", "content": "You are terse."}, USER],
    "empty_system": [{"role": "system", "content": ""}, USER],
    "multi_turn_thinking_stripped": [
        {"role": "system", "content": "Be kind."}, USER, THOUGHT_REPLY,
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "Okay.\n</think>\n\n\nSix."},
        {"role": "user", "content": "Thanks"},
    ],
    "assistant_last_keeps_thinking": [USER, THOUGHT_REPLY],
    "later_system_message": [USER, THOUGHT_REPLY, {"role": "system", "content": "New rule."}, USER],
    "tool_calls_dict_and_string_args": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris and Köln?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Köln"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp": 17, "sky": "☁"}'},
        {"role": "assistant", "content": "<think>\nboth fine\n</think>\n\nParis 21°, Köln 17°."},
        {"role": "user", "content": "And Tokyo?"},
    ],
    "tool_call_without_function_wrapper_with_text": [
        USER,
        {"role": "assistant", "content": "Let me check.\n</think>\n\nChecking.",
         "tool_calls": [{"name": "now", "arguments": {}}]},
        {"role": "tool", "content": "12:00"},
    ],
    "tool_call_last_message": [
        USER, {"role": "assistant", "content": "<think>x</think>calling",
               "tool_calls": [{"function": {"name": "now", "arguments": {"a": [1, 2.5, None, True]}}}]},
    ],
    "tool_first_message": [{"role": "tool", "content": "orphan result"}, USER],
    "unicode": [
        {"role": "system", "content": "日本語で答えて 🙂"},
        {"role": "user", "content": "Ünïcödé \u00e9 e\u0301 \U0001F680 中文 한국어 עברית\ttab\r\nCRLF \\n \"q\" {{ x }}"},
    ],
    "special_tokens_in_text": [{"role": "user", "content": "<|im_end|> <think> </think> <tool_call>"}],
    "extra_keys_and_reasoning_fields": [
        {"role": "user", "content": "hi", "name": "bob"},
        {"role": "assistant", "content": "hello", "reasoning_content": "thought", "refusal": None},
        {"role": "user", "content": "bye"},
    ],
}


def decoded_arguments(messages: list[dict]) -> list[dict]:
    """The same conversation with string `arguments` decoded: the input transformers renders
    correctly (it writes a string as an escaped JSON string, not the object QwQ was trained on)."""
    out = []
    for message in messages:
        if message.get("tool_calls"):
            calls = []
            for call in message["tool_calls"]:
                fn = call.get("function", call)
                if isinstance(fn.get("arguments"), str):
                    fn = {**fn, "arguments": json.loads(fn["arguments"], strict=False)}
                calls.append({**call, "function": fn} if "function" in call else fn)
            message = {**message, "tool_calls": calls}
        out.append(message)
    return out


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", ["none", "tools", "empty"])
def test_parity_with_transformers(hf_tokenizer, name, add_generation_prompt, tools):
    messages = CONVERSATIONS[name]
    tool_list = {"none": None, "tools": [WEATHER_TOOL, BARE_TOOL], "empty": []}[tools]
    expected = hf_tokenizer.apply_chat_template(
        decoded_arguments(messages), tools=tool_list, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    got = render_prompt(messages, tools=tool_list, add_generation_prompt=add_generation_prompt)
    assert got == expected


def _random_conversation(rng: random.Random) -> tuple[list[dict], list | None]:
    pieces = ["a", " ", "\n", "</think>", "<think>", "日本", "😀", "{{", "%}", "\\", '"', "\t", "x" * 7, "", "\r\n"]

    def text() -> str:
        return "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 8)))

    messages: list[dict] = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": text()})
    for _ in range(rng.randrange(1, 7)):
        kind = rng.choice(["user", "assistant", "calls", "tool", "tool", "system"])
        if kind == "calls":
            calls = []
            for _ in range(rng.randrange(1, 3)):
                args = {"k": text(), "n": rng.randrange(5)} if rng.random() < 0.5 else '{"s": "%s"}' % rng.choice(pieces[:3])
                call = {"name": rng.choice(["f", "g_h"]), "arguments": args}
                calls.append({"type": "function", "function": call} if rng.random() < 0.7 else call)
            messages.append({"role": "assistant", "content": text(), "tool_calls": calls})
        else:
            messages.append({"role": kind, "content": text()})
    tools = rng.choice([None, [], [WEATHER_TOOL], [BARE_TOOL, WEATHER_TOOL]])
    return messages, tools


def test_parity_random_conversations(hf_tokenizer):
    rng = random.Random(1234)
    for case in range(300):
        messages, tools = _random_conversation(rng)
        generation = rng.random() < 0.5
        expected = hf_tokenizer.apply_chat_template(decoded_arguments(messages), tools=tools, tokenize=False,
                                                    add_generation_prompt=generation)
        assert render_prompt(messages, tools=tools, add_generation_prompt=generation) == expected, case


def test_parity_known_shape():
    # Independent of transformers: the card's generation prompt and the stripped history.
    prompt = render_prompt(CONVERSATIONS["multi_turn_thinking_stripped"])
    assert prompt.endswith("<|im_start|>assistant\n<think>\n")
    assert "Simple: 4." not in prompt and "It is **4**.<|im_end|>" in prompt
    assert "<|im_start|>assistant\nSix.<|im_end|>" in prompt
    assert render_prompt([USER], add_generation_prompt=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    )


def test_python_function_tool_matches_transformers(hf_tokenizer):
    messages = [USER]
    expected = hf_tokenizer.apply_chat_template(messages, tools=[get_time, WEATHER_TOOL], tokenize=False,
                                                add_generation_prompt=True)
    assert render_prompt(messages, tools=[get_time, WEATHER_TOOL]) == expected
    assert '"name": "get_time"' in expected


def test_content_none_with_tool_calls_renders_like_empty(hf_tokenizer):
    calls = [{"type": "function", "function": {"name": "now", "arguments": {}}}]
    with_none = [USER, {"role": "assistant", "content": None, "tool_calls": calls},
                 {"role": "tool", "content": "12:00"}]
    with_empty = [USER, {"role": "assistant", "content": "", "tool_calls": calls},
                  {"role": "tool", "content": "12:00"}]
    expected = hf_tokenizer.apply_chat_template(with_empty, tokenize=False, add_generation_prompt=True)
    assert render_prompt(with_none) == expected
    # transformers itself fails on this input: the template splits a missing content.
    with pytest.raises(Exception):
        hf_tokenizer.apply_chat_template(with_none, tokenize=False, add_generation_prompt=True)


ALTERED = ORIGINAL_TEMPLATE_PATH.read_text().replace(
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n<think>\\n' }}\n",
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n<think>\\n' }}\n"
    "    {%- if enable_thinking is not defined or not enable_thinking %}\n"
    "        {{- '\\n</think>\\n\\n' }}\n    {%- endif %}\n",
)


def test_altered_template_parity_and_detection(hf_tokenizer):
    assert ALTERED != ORIGINAL_TEMPLATE_PATH.read_text()
    altered = ChatTemplate.from_string(ALTERED, source="test")
    expected = hf_tokenizer.apply_chat_template([USER], chat_template=ALTERED, tokenize=False,
                                                add_generation_prompt=True)
    assert altered.render([USER]) == expected
    assert expected.endswith("<think>\n\n</think>\n\n")  # thinking silently switched off

    chosen = select_template("original", gguf_template=ALTERED)
    assert chosen.warning and "differs" in chosen.warning
    assert chosen.template.render([USER]).endswith("<|im_start|>assistant\n<think>\n")

    from_gguf = select_template("gguf", gguf_template=ALTERED)
    assert from_gguf.warning is None
    assert from_gguf.template.render([USER]) == expected


def test_select_template_rules(tmp_path):
    original = ORIGINAL_TEMPLATE_PATH.read_text()
    assert select_template("original", gguf_template=original).warning is None
    assert select_template(None, gguf_template=None).template is ChatTemplate.original()
    # Jinja normalises newlines and drops one trailing newline: these copies render the same.
    assert select_template("original", gguf_template=original.replace("\n", "\r\n")).warning is None
    assert select_template("original", gguf_template=original.rstrip("\n")).warning is None
    with pytest.raises(UsageError, match="no tokenizer.chat_template"):
        select_template("gguf", gguf_template=None)
    path = tmp_path / "mine.jinja"
    path.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    chosen = select_template(str(path), gguf_template=original)
    assert chosen.template.source == str(path)
    assert chosen.template.render([USER]) == "[user]What is 2+2?"
    with pytest.raises(UsageError, match="'original', 'gguf' or a path"):
        select_template(str(tmp_path / "missing.jinja"), gguf_template=None)


def test_original_is_compiled_once():
    assert ChatTemplate.original() is ChatTemplate.original()
    assert ChatTemplate.from_string("{{ 1 }}") is ChatTemplate.from_string("{{ 1 }}")
    assert ChatTemplate.original().source == "the original QwQ-32B template"


@pytest.mark.parametrize("messages, match", [
    ([], "empty"),
    ("hello", "list"),
    ([{"content": "no role"}], "no 'role'"),
    (["just text"], "not a dict"),
    ([{"role": "user"}], "no 'content'"),
    ([{"role": "user", "content": None}], "no 'content'"),
    ([{"role": "user", "content": 42}], "must be text"),
    ([{"role": "user<|im_end|>", "content": "x"}], "role is a word"),
    ([USER, {"role": "assistant", "content": "x", "tool_calls": "now()"}], "must be a list"),
    ([USER, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}], "tool call 0"),
    ([USER, {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": 3}]}], "arguments"),
    ([{"role": "user", "content": "x", "tool_calls": [{"name": "f"}]}], "only assistant"),
])
def test_malformed_messages(messages, match):
    with pytest.raises(UsageError, match=match):
        render_prompt(messages)


def test_bad_tools():
    with pytest.raises(TemplateError, match="JSON-schema dict"):
        render_prompt([USER], tools=["get_weather"])
    with pytest.raises(TemplateError, match="list"):
        render_prompt([USER], tools=WEATHER_TOOL)


# --- Sandbox ------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ raise_exception.__globals__ }}",
    "{{ cycler.__init__.__globals__.os.system('echo pwned') }}",
    "{{ messages.__class__ }}",
    "{% set ns = namespace() %}{% set ns._x = 1 %}",
    "{{ messages.append(1) }}",
    "{{ dict.__call__.__globals__ }}",
])
def test_sandbox_escapes_raise(source):
    with pytest.raises(TemplateError, match="sandbox"):
        ChatTemplate.from_string(source, source="evil").render([USER])


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set x %}{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}{% endset %}",
    "{% for m in messages recursive %}{{ loop([m] * 2) }}{% endfor %}",
])
def test_render_time_is_bounded(source):
    template = ChatTemplate.from_string(source, source="slow")
    start = time.monotonic()
    with pytest.raises(TemplateError, match="time limit|recursed"):
        template.render([USER], timeout_s=0.5)
    assert time.monotonic() - start < 3.0


@pytest.mark.parametrize("source", [
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 100 }}{% endfor %}{% endfor %}",
    "{{ 'a' * 1000000000 }}",
    "{{ 'a' | center(1000000000) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set ns = namespace(s='a' * 5000) %}{% for i in range(5) %}{% set ns.s = ns.s | replace('a', ns.s) %}{% endfor %}",
    "{{ lipsum(n=100000000) }}",
    "{{ 7 ** 100000000 }}",
])
def test_output_and_intermediate_size_is_bounded(source):
    start = time.monotonic()
    with pytest.raises(TemplateError, match="over [0-9,]+ characters"):
        ChatTemplate.from_string(source, source="big").render([USER])
    assert time.monotonic() - start < constants.TEMPLATE_RENDER_TIMEOUT_S


def test_output_bound_is_configurable():
    template = ChatTemplate.from_string("{% for i in range(50) %}{{ messages[0].content }}{% endfor %}")
    assert len(template.render([USER], max_chars=1000)) == 50 * len(USER["content"])
    with pytest.raises(TemplateError, match="over 100 characters"):
        template.render([USER], max_chars=100)


def test_deadline_works_off_the_main_thread():
    template = ChatTemplate.from_string("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}")
    errors = []

    def worker():
        try:
            template.render([USER], timeout_s=0.3)
        except TemplateError as exc:
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and len(errors) == 1


def test_template_errors_are_clear():
    with pytest.raises(TemplateError, match="syntax error at line 1"):
        ChatTemplate.from_string("{% for %}", source="broken")
    with pytest.raises(TemplateError, match="refused the input: only user turns"):
        ChatTemplate.from_string("{{ raise_exception('only user turns') }}").render([USER])
    with pytest.raises(TemplateError, match="not found"):
        ChatTemplate.from_file("/nonexistent/template.jinja")
    with pytest.raises(TemplateError, match="limit"):
        ChatTemplate.from_string("x" * (constants.TEMPLATE_MAX_SOURCE_CHARS + 1))


def test_transformers_helpers_available_to_templates():
    source = ("{{ strftime_now('%Y') | length }}|{{ dict(a=1) | tojson }}|{{ {'é': 1, 'b': [1]} | tojson(indent=1) }}"
              "|{{ {'b': 1, 'a': 2} | tojson(sort_keys=True, separators=(',', ':')) }}|{{ eos_token }}{{ pad_token }}"
              "{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}"
              "{% generation %}gen{% endgeneration %}")
    out = ChatTemplate.from_string(source).render([USER])
    assert out == '4|{"a": 1}|{\n "é": 1,\n "b": [\n  1\n ]\n}|{"a":2,"b":1}|<|im_end|><|endoftext|>01gen'


def test_total_work_is_bounded():
    # Each value is small enough, but together they would take gigabytes.
    source = "{% set big = 'x' * 4000000 %}{{ ([big] * 100000) | map('upper') | list | length }}"
    start = time.monotonic()
    with pytest.raises(TemplateError, match="in total"):
        ChatTemplate.from_string(source, source="hungry").render([USER])
    assert time.monotonic() - start < constants.TEMPLATE_RENDER_TIMEOUT_S
