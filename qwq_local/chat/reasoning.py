"""Splitting QwQ's thought from its answer, and Hermes-style tool calls out of the answer.

QwQ's generation prompt ends inside `<think>\\n`, so generated text starts in the thought and
the model writes only the closing `</think>`. The rules, shared by the streaming splitter and
the one-shot `split_thinking` (tests hold them to the same result for any chunking):
- a `<think>` at the very start of the output (a model that opens the thought itself) is dropped;
- everything before the first `</think>` is thinking, as generated;
- after it, the answer with its leading whitespace removed; later `</think>`s are answer text;
- with no `</think>` at all, everything is thinking.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal

from ..constants import THINK_CLOSE, THINK_OPEN, THINKING_CLOSE_TEXT, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

Kind = Literal["thinking", "content"]
Event = tuple[Kind, str]

__all__ = ["ThinkingSplitter", "split_thinking", "parse_tool_calls", "THINKING_CLOSE_TEXT"]


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, content) of a whole generated text."""
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
    ("thinking" | "content", text) events. Holds back only a possible partial tag."""

    def __init__(self) -> None:
        self._state: Literal["start", "thinking", "answer_start", "content"] = "start"
        self._pending = ""

    @property
    def in_thinking(self) -> bool:
        """True until `</think>` has been seen (the runtime counts its thinking budget here)."""
        return self._state in ("start", "thinking")

    def feed(self, piece: str) -> list[Event]:
        if not piece:
            return []
        events: list[Event] = []
        text = self._pending + piece
        self._pending = ""
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
        self._pending = ""
        return events

    def close_thinking(self) -> list[Event]:
        """Feed the text the runtime appends when the thinking budget runs out."""
        return self.feed(THINKING_CLOSE_TEXT)


def _emit(events: list[Event], kind: Kind, text: str) -> None:
    if text:
        events.append((kind, text))


# --- Tool calls ---------------------------------------------------------------------------

_TOOL_CALL_RE = re.compile(re.escape(TOOL_CALL_OPEN) + r"(.*?)" + re.escape(TOOL_CALL_CLOSE), re.DOTALL)


def parse_tool_calls(content: str) -> tuple[str, list[dict[str, Any]]]:
    """Take Hermes-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks out of
    an answer. Returns the remaining text and the calls in OpenAI's shape
    `{"id", "type": "function", "function": {"name", "arguments": <JSON string>}}`. A block that
    is not a valid call stays in the text, so nothing the model wrote is lost."""
    calls: list[dict[str, Any]] = []
    kept: list[str] = []
    last = 0
    for match in _TOOL_CALL_RE.finditer(content):
        call = _parse_call(match.group(1))
        if call is None:
            continue
        kept.append(content[last:match.start()])
        last = match.end()
        calls.append(call)
    if not calls:
        return content, []
    kept.append(content[last:])
    text = "".join(kept)
    # Blocks sit on their own lines; drop the blank lines they leave behind.
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text, calls


def _parse_call(body: str) -> dict[str, Any] | None:
    try:
        data = json.loads(body.strip())
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not data["name"]:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        # Some models emit the arguments pre-encoded; accept them when they are a JSON object.
        try:
            decoded = json.loads(arguments)
        except ValueError:
            return None
        arguments = decoded
    if not isinstance(arguments, dict):
        return None
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }
