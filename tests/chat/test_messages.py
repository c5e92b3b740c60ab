"""Messages in OpenAI's shapes (issue 9, item 2): string arguments, content parts, content null
with tool_calls, tool_call_id/name and extra keys; errors name the message index."""

from __future__ import annotations

import pytest

from qwq_local.chat.messages import normalize_messages
from qwq_local.chat.template import render_prompt
from qwq_local.errors import UsageError

USER = {"role": "user", "content": "Weather in Paris?"}


def test_string_arguments_render_as_the_object():
    as_string = [USER, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp": 21}'}]
    as_object = [USER, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 21}'}]
    prompt = render_prompt(as_string)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert '\\"city\\"' not in prompt
    assert prompt == render_prompt(as_object)


@pytest.mark.parametrize("arguments, match", [
    ("city=Paris", r"message 1, tool call 0: 'arguments' is a string but not JSON"),
    ("[1, 2]", r"message 1, tool call 0: 'arguments' must hold a JSON object"),
    (3, r"message 1, tool call 0: 'arguments' must be a JSON object"),
])
def test_bad_arguments_are_usage_errors_naming_the_message(arguments, match):
    messages = [USER, {"role": "assistant", "content": None,
                       "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": arguments}}]}]
    with pytest.raises(UsageError, match=match):
        render_prompt(messages)


def test_empty_argument_string_is_no_arguments():
    out = normalize_messages([USER, {"role": "assistant", "tool_calls": [{"function": {"name": "now", "arguments": ""}}]}])
    assert out[1] == {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "now", "arguments": {}}}]}


def test_content_parts_are_joined():
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]}]
    assert render_prompt(parts) == render_prompt([{"role": "user", "content": "Hello there"}])
    system_parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, *parts]
    assert "<|im_start|>system\nBe brief.<|im_end|>" in render_prompt(system_parts)


@pytest.mark.parametrize("part, match", [
    ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "message 1 \\(user\\), content part 1 is of type 'image_url'"),
    ({"type": "input_audio", "input_audio": {}}, "type 'input_audio'; QwQ-32B reads text only"),
    ({"type": "text", "text": 5}, "'text' must be a string"),
    (7, "expected"),
])
def test_non_text_parts_are_usage_errors(part, match):
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    with pytest.raises(UsageError, match=match):
        render_prompt(messages)


def test_extra_keys_clients_send_are_accepted():
    messages = [{"role": "user", "content": "hi", "name": "bob", "metadata": {"a": 1}},
                {"role": "assistant", "content": None, "refusal": None, "audio": None, "tool_calls": [
                    {"id": "c1", "type": "function", "index": 0, "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "name": "f", "content": [{"type": "text", "text": "ok"}]}]
    prompt = render_prompt(messages)
    assert prompt.endswith("<|im_start|>user\n<tool_response>\nok\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n<think>\n")
    assert '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>' in prompt


def test_content_null_without_tool_calls_is_refused():
    with pytest.raises(UsageError, match=r"message 1 \(assistant\) has no 'content'"):
        render_prompt([USER, {"role": "assistant", "content": None}])


def test_developer_role_is_the_system_message():
    """OpenAI's clients send the system prompt as role 'developer' (o1 and newer); QwQ's
    template has no branch for it and dropped it from the prompt."""
    developer = [{"role": "developer", "content": "Answer in French."}, USER]
    system = [{"role": "system", "content": "Answer in French."}, USER]
    assert render_prompt(developer) == render_prompt(system)
    assert "<|im_start|>system\nAnswer in French.<|im_end|>" in render_prompt(developer)


@pytest.mark.parametrize("role", ["bogus", "function", "model", "User"])
def test_roles_the_template_would_drop_are_usage_errors(role):
    with pytest.raises(UsageError, match=rf"message 0 \({role}\): unknown role"):
        render_prompt([{"role": role, "content": "SECRET"}, USER])
