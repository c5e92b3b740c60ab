"""Thinking/answer split (streaming and one-shot) and tool-call parsing."""

from __future__ import annotations

import json

import pytest

from qwq_local.constants import THINKING_CLOSE_TEXT
from qwq_local.chat.reasoning import ThinkingSplitter, parse_tool_calls, split_thinking

SAMPLES = [
    "Okay, 2+2.\nIt's 4 <not a tag> </thin k>\n</think>\n\n  The answer is **4**. </think> stays",
    "<think>\nself-opened thought</think>\t\n answer",
    "no close tag at all, < / think > <</th",
    "</think>answer only",
    "thought</think>",
    "thought</think> \n\n ",
    "<thin",
    "<think>",
    "<<think>x</think>y",
    "a</</think>b",
    "emoji 🤔 中文</think>\n\n答案 ✅",
]


def run_stream(pieces):
    splitter = ThinkingSplitter()
    events = []
    for piece in pieces:
        events += splitter.feed(piece)
    events += splitter.finish()
    assert all(text for _, text in events), "no empty events"
    thinking = "".join(t for kind, t in events if kind == "thinking")
    content = "".join(t for kind, t in events if kind == "content")
    return thinking, content, events


def test_one_shot_rules():
    assert split_thinking("I think.\n</think>\n\n Answer.") == ("I think.\n", "Answer.")
    assert split_thinking("<think>\nx</think>y") == ("\nx", "y")
    assert split_thinking("all thought") == ("all thought", "")
    assert split_thinking("a</think>b</think>c") == ("a", "b</think>c")
    assert split_thinking("") == ("", "")


@pytest.mark.parametrize("text", SAMPLES)
def test_char_by_char_matches_one_shot(text):
    thinking, content, _ = run_stream(list(text))
    assert (thinking, content) == split_thinking(text)


@pytest.mark.parametrize("text", SAMPLES)
def test_every_two_piece_split_matches_one_shot(text):
    expected = split_thinking(text)
    for cut in range(len(text) + 1):
        thinking, content, _ = run_stream([text[:cut], text[cut:]])
        assert (thinking, content) == expected, cut


@pytest.mark.parametrize("text", SAMPLES)
def test_every_three_piece_split_matches_one_shot(text):
    expected = split_thinking(text)
    for a in range(len(text) + 1):
        for b in range(a, len(text) + 1):
            thinking, content, _ = run_stream([text[:a], text[a:b], text[b:]])
            assert (thinking, content) == expected, (a, b)


@pytest.mark.parametrize("pieces", [["</th", "ink>"], ["<", "/think", ">"], ["<", "/", "t", "h", "i", "n", "k", ">"]])
def test_close_tag_split_across_pieces(pieces):
    thinking, content, events = run_stream(["Let me see.", "\n", *pieces, "\n\n", " ", "Yes."])
    assert (thinking, content) == ("Let me see.\n", "Yes.")
    assert [kind for kind, _ in events] == ["thinking", "thinking", "content"]


def test_holds_back_only_the_ambiguous_suffix():
    splitter = ThinkingSplitter()
    assert splitter.feed("a < b and </th") == [("thinking", "a < b and ")]
    assert splitter.feed("ought") == [("thinking", "</thought")]
    assert splitter.feed("x<") == [("thinking", "x")]
    assert splitter.feed("/think>") == []
    assert not splitter.in_thinking
    assert splitter.feed("\n") == []
    assert splitter.feed("\n  Hi") == [("content", "Hi")]
    assert splitter.feed(" there\n") == [("content", " there\n")]
    assert splitter.finish() == []


def test_leading_open_tag_is_stripped_only_at_start():
    splitter = ThinkingSplitter()
    assert splitter.feed("<th") == []
    assert splitter.feed("ink>\nhm") == [("thinking", "\nhm")]
    assert splitter.feed(" <think>") == [("thinking", " <think>")]


def test_no_close_tag_everything_is_thinking():
    thinking, content, _ = run_stream(["still ", "thinking ", "</thi"])
    assert (thinking, content) == ("still thinking </thi", "")


def test_budget_close_text_switches_to_answer():
    splitter = ThinkingSplitter()
    splitter.feed("long thought")
    assert splitter.in_thinking
    assert splitter.close_thinking() == [("thinking", "\n")]
    assert not splitter.in_thinking
    assert splitter.feed("Final.") == [("content", "Final.")]
    assert split_thinking("long thought" + THINKING_CLOSE_TEXT + "Final.") == ("long thought\n", "Final.")


# --- Tool calls ---------------------------------------------------------------------------

def test_parse_single_and_several_tool_calls():
    content = (
        "I'll check both.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln", "days": [1, 2]}}\n</tool_call>'
    )
    text, calls = parse_tool_calls(content)
    assert text == "I'll check both."
    assert len(calls) == 2
    for call in calls:
        assert set(call) == {"id", "type", "function"}
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert isinstance(call["function"]["arguments"], str)
    assert calls[0]["id"] != calls[1]["id"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert calls[1]["function"]["arguments"] == '{"city": "Köln", "days": [1, 2]}'


def test_parse_tool_call_variants():
    _, calls = parse_tool_calls('<tool_call>{"name": "now"}</tool_call>')
    assert calls[0]["function"] == {"name": "now", "arguments": "{}"}
    _, calls = parse_tool_calls('<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"x": 1}
    _, calls = parse_tool_calls('<tool_call>{"name": "f", "parameters": {"y": 2}}</tool_call>')
    assert json.loads(calls[0]["function"]["arguments"]) == {"y": 2}


@pytest.mark.parametrize("content", [
    "plain answer, no calls",
    "<tool_call>\n{not json}\n</tool_call>",
    '<tool_call>\n{"arguments": {}}\n</tool_call>',
    '<tool_call>\n["name", "f"]\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": "not json"}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>',
    '<tool_call>\n{"name": "f", "arguments": {"a": 1}',  # cut off inside the JSON
    '<tool_call>\n{"name": "f", "arguments": {}} trailing words',  # neither closed nor at the end
])
def test_invalid_tool_calls_stay_text(content):
    assert parse_tool_calls(content) == (content, [])


def test_valid_and_invalid_mixed():
    content = 'A<tool_call>{bad}</tool_call>B<tool_call>{"name": "f", "arguments": {}}</tool_call>C'
    text, calls = parse_tool_calls(content)
    assert text == "A<tool_call>{bad}</tool_call>BC"
    assert [c["function"]["name"] for c in calls] == ["f"]


# --- issue 9: the split follows the prompt --------------------------------------------------

@pytest.mark.parametrize("prompt, expected", [
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n", True),
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
    ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
    # a <think> in an earlier turn's text does not count: only the turn being generated does
    ("<|im_start|>user\nsay <think><|im_end|>\n<|im_start|>assistant\n", False),
    ("plain completion prompt", False),
    ("<think>\n", True),
])
def test_starts_in_thought(prompt, expected):
    from qwq_local.chat.reasoning import starts_in_thought

    assert starts_in_thought(prompt) is expected


ANSWER_SAMPLES = ["The answer is 4.", "  \n The answer is 4.", "<think>\nhm</think>\n\nFour.", " \n<think>x</think>y",
                  "<thinking is fun", "<thin", "", " ", "ans </think> <think>", "<think>never closed"]


@pytest.mark.parametrize("text", ANSWER_SAMPLES)
def test_starting_in_the_answer_any_chunking_matches_one_shot(text):
    expected = split_thinking(text, in_thought=False)
    for cut in range(len(text) + 1):
        for cut2 in range(cut, len(text) + 1):
            splitter = ThinkingSplitter(in_thought=False)
            events = []
            for piece in (text[:cut], text[cut:cut2], text[cut2:]):
                events += splitter.feed(piece)
            events += splitter.finish()
            assert all(t for _, t in events)
            got = ("".join(t for k, t in events if k == "thinking"), "".join(t for k, t in events if k == "content"))
            assert got == expected, (cut, cut2)


def test_starting_in_the_answer_rules():
    assert split_thinking("The answer is 4.", in_thought=False) == ("", "The answer is 4.")
    assert split_thinking("<think>\nhm</think>\n\nFour.", in_thought=False) == ("\nhm", "Four.")
    assert split_thinking("Four. <think>x</think>", in_thought=False) == ("", "Four. <think>x</think>")
    splitter = ThinkingSplitter(in_thought=False)
    assert not splitter.in_thinking
    assert splitter.feed("The") == [("content", "The")]
    assert not splitter.in_thinking and not splitter.opened
    opening = ThinkingSplitter(in_thought=False)
    assert opening.feed("<think>") == [] and opening.in_thinking and opening.opened


# --- issue 9: tool calls never lost or mangled ----------------------------------------------

def test_unterminated_call_at_end_of_turn_is_parsed():
    for tail in ("", "\n", "\n</tool", "</tool_call"):
        text, calls = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' + tail)
        assert text == "" and len(calls) == 1, tail
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}


def test_close_tag_inside_a_string_argument():
    arg = "Close each call with </tool_call> on its own line."
    content = 'Sure.\n<tool_call>\n' + json.dumps({"name": "note", "arguments": {"text": arg}}) + '\n</tool_call>'
    text, calls = parse_tool_calls(content)
    assert text == "Sure."
    assert json.loads(calls[0]["function"]["arguments"]) == {"text": arg}


def test_only_the_blocks_and_their_whitespace_change():
    code = "Here:\n```python\nimport os\n\n\ndef main():\n    pass\n```\n\n\n\nDone."
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    text, calls = parse_tool_calls(code + "\n" + call)
    assert text == code and len(calls) == 1
    text, _ = parse_tool_calls("Before.\n\n" + call + "\n" + call + "\n\nAfter.\n\n\n\nEnd")
    assert text == "Before.\n\nAfter.\n\n\n\nEnd"
    text, _ = parse_tool_calls(call + "\n\n  Trailing text  ")
    assert text == "Trailing text  "


def test_calls_in_an_unclosed_thought_are_returned_and_in_a_closed_one_not():
    from qwq_local.chat.reasoning import turn_tool_calls

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    thinking, content, calls = turn_tool_calls("Let me look it up.\n" + call, "", thought_closed=False)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert thinking == "Let me look it up." and content == ""
    thinking, content, calls = turn_tool_calls("I could call " + call, "No call needed.", thought_closed=True)
    assert calls == [] and call in thinking and content == "No call needed."
