"""Splitting QwQ's thought from its answer, and Hermes-style tool calls out of the answer.

Where generation starts follows the prompt (`starts_in_thought`): QwQ's released template ends
its generation prompt inside `<think>\\n`, so the model writes only the closing `</think>`; a
template whose generation prompt is a plain `<|im_start|>assistant\\n` (Qwen2.5-style GGUFs, QwQ's
template as first published) or one that closes the thought itself (`...</think>\\n\\n`) starts
in the answer. The rules, shared by the streaming splitter and the one-shot `split_thinking`
(tests hold them to the same result for any chunking):
- starting in the thought: a `<think>` at the very start of the output (a model that opens the
  thought again) is dropped; everything before the first `</think>` is thinking; with no
  `</think>` at all, everything is thinking;
- starting in the answer: the output is answer unless it opens with `<think>` (after optional
  whitespace), which enters the thought as above;
- after the thought closes, the answer with its leading whitespace removed; later `</think>`s
  and `<think>`s are answer text.

Tool calls (`parse_tool_calls`, `turn_tool_calls`): a call is `<tool_call>` followed by one JSON
object `{"name": ..., "arguments": {...}}` (read with json.JSONDecoder.raw_decode, so the JSON
value, not a `</tool_call>` inside a string, decides where it ends) and then `</tool_call>`, or
the end of the text (a call the turn ended before closing). Only the text of parsed calls and the
whitespace directly around them is removed; blocks that do not parse stay as text. Calls in the
answer are returned; when the turn ends inside a thought that never closed, the calls in the
thought are returned (never silently lost); calls inside a thought that was closed are
deliberation and are not returned.
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Literal

from ..constants import IM_START, THINK_CLOSE, THINK_OPEN, THINKING_CLOSE_TEXT, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

Kind = Literal["thinking", "content"]
Event = tuple[Kind, str]

__all__ = ["ThinkingSplitter", "split_thinking", "starts_in_thought", "parse_tool_calls", "turn_tool_calls",
           "THINKING_CLOSE_TEXT"]


def starts_in_thought(prompt: str) -> bool:
    """Whether generation after `prompt` starts inside the thought: the turn being generated
    (the text after the prompt's last `<|im_start|>`) holds a `<think>` with no `</think>` after it."""
    turn = prompt[prompt.rfind(IM_START) + 1:] if IM_START in prompt else prompt
    opened = turn.rfind(THINK_OPEN)
    return opened >= 0 and turn.find(THINK_CLOSE, opened) < 0


def split_thinking(text: str, *, in_thought: bool = True) -> tuple[str, str]:
    """(thinking, content) of a whole generated text; `in_thought`: whether generation started
    inside the thought (`starts_in_thought(prompt)`)."""
    if not in_thought:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return "", stripped
        text = stripped
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):]
    thinking, found, content = text.partition(THINK_CLOSE)
    return (thinking, content.lstrip()) if found else (thinking, "")


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`: the only part
    that must wait for the next piece before we know whether the tag is arriving."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ThinkingSplitter:
    """Streaming version of `split_thinking`: feed text pieces as tokens are decoded, get back
    ("thinking" | "content", text) events. Holds back only a possible partial tag.
    `in_thought`: whether generation starts inside the thought (`starts_in_thought(prompt)`)."""

    def __init__(self, *, in_thought: bool = True) -> None:
        self._state: Literal["open", "start", "thinking", "answer_start", "content"] = (
            "start" if in_thought else "open")
        self._pending = ""
        self.opened = in_thought

    @property
    def in_thinking(self) -> bool:
        """True while inside the thought (the runtime counts its thinking budget here)."""
        return self._state in ("start", "thinking")

    def feed(self, piece: str) -> list[Event]:
        if not piece:
            return []
        events: list[Event] = []
        text = self._pending + piece
        self._pending = ""
        if self._state == "open":
            # Starting in the answer: wait until we know whether the model opens a thought.
            head = text.lstrip()
            if not head or (len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head)):
                self._pending = text
                return events
            if not head.startswith(THINK_OPEN):
                self._state = "content"
                _emit(events, "content", head)
                return events
            self.opened = True
            text = head
            self._state = "start"
        if self._state == "start":
            if len(text) < len(THINK_OPEN) and THINK_OPEN.startswith(text):
                self._pending = text
                return events
            if text.startswith(THINK_OPEN):
                text = text[len(THINK_OPEN):]
            self._state = "thinking"
        if self._state == "thinking":
            before, found, after = text.partition(THINK_CLOSE)
            if not found:
                keep = _partial_suffix(text, THINK_CLOSE)
                self._pending = text[len(text) - keep:] if keep else ""
                _emit(events, "thinking", text[: len(text) - keep])
                return events
            _emit(events, "thinking", before)
            self._state = "answer_start"
            text = after
        if self._state == "answer_start":
            text = text.lstrip()
            if not text:
                return events
            self._state = "content"
        _emit(events, "content", text)
        return events

    def finish(self) -> list[Event]:
        """Flush what was held back (a partial tag that never completed is thought text)."""
        events: list[Event] = []
        if self._state in ("start", "thinking"):
            _emit(events, "thinking", self._pending)
        elif self._state == "open":
            _emit(events, "content", self._pending.lstrip())
        self._pending = ""
        return events

    def close_thinking(self) -> list[Event]:
        """Feed the text the runtime appends when the thinking budget runs out."""
        return self.feed(THINKING_CLOSE_TEXT)


def _emit(events: list[Event], kind: Kind, text: str) -> None:
    if text:
        events.append((kind, text))


# --- Tool calls ---------------------------------------------------------------------------

_DECODER = json.JSONDecoder(strict=False)  # raw control characters in strings, as models write them
_WS = " \t\r\n"


def parse_tool_calls(content: str) -> tuple[str, list[dict[str, Any]]]:
    """Take Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks out of
    text (rules in the module docstring). Returns the remaining text and the calls in OpenAI's
    shape `{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}`. A block
    that is not a valid call stays in the text, so nothing the model wrote is lost."""
    spans: list[tuple[int, int]] = []
    calls: list[dict[str, Any]] = []
    pos = 0
    while (start := content.find(TOOL_CALL_OPEN, pos)) >= 0:
        parsed = _parse_block(content, start)
        if parsed is None:
            pos = start + len(TOOL_CALL_OPEN)
            continue
        end, call = parsed
        spans.append((start, end))
        calls.append(call)
        pos = end
    if not calls:
        return content, []
    return _remove(content, spans), calls


def _parse_block(text: str, start: int) -> tuple[int, dict[str, Any]] | None:
    """(end of the block, call) for the `<tool_call>` at `start`, or None if it is not a call."""
    i = _skip_ws(text, start + len(TOOL_CALL_OPEN))
    if not text.startswith("{", i):
        return None
    try:
        data, i = _DECODER.raw_decode(text, i)
    except ValueError:
        return None
    call = _as_call(data)
    if call is None:
        return None
    i = _skip_ws(text, i)
    if text.startswith(TOOL_CALL_CLOSE, i):
        return i + len(TOOL_CALL_CLOSE), call
    rest = text[i:]
    if TOOL_CALL_CLOSE.startswith(rest):  # the end of the text, or a close tag cut short by it
        return len(text), call
    return None


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _remove(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` without the blocks in `spans`: consecutive blocks with only whitespace between them
    go as one; the whitespace around a run goes with it, except that a run between two pieces of
    text leaves the longer of the two whitespace stretches that surrounded it."""
    out: list[str] = []
    last = 0
    k = 0
    while k < len(spans):
        start, end = spans[k]
        while k + 1 < len(spans) and not text[end:spans[k + 1][0]].strip(_WS):
            k += 1
            end = spans[k][1]
        k += 1
        gap = text[last:start]
        kept = gap.rstrip(_WS)
        after = _skip_ws(text, end)
        out.append(kept)
        if any(out) and after < len(text):  # text on both sides: keep them apart as they were
            out.append(max(gap[len(kept):], text[end:after], key=len))
        last = after
    out.append(text[last:])
    return "".join(out)


def _as_call(data: Any) -> dict[str, Any] | None:
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        # Some models emit the arguments pre-encoded; accept them when they are a JSON object.
        try:
            arguments = json.loads(arguments, strict=False)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def turn_tool_calls(thinking: str, content: str, *, thought_closed: bool) -> tuple[str, str, list[dict[str, Any]]]:
    """(thinking, content, calls) of a finished turn: calls from the answer, or, when the turn
    ended inside a thought that never closed, from the thought (taken out of it). Calls in a
    closed thought stay there: the model was deliberating. Callers report finish_reason
    "tool_calls" whenever calls are returned."""
    content, calls = parse_tool_calls(content)
    if not thought_closed and not calls:
        thinking, calls = parse_tool_calls(thinking)
    return thinking, content, calls
