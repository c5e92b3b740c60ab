"""Messages as clients send them (OpenAI's chat-completions shapes) -> the dicts QwQ's template
reads. Every caller (QwQ.chat/stream, the CLI, the server) goes through `normalize_messages`,
called by `render_prompt`.

Accepted shapes (source: /v1/chat/completions request format; QwQ's template reads `role`,
`content`, `tool_calls[].function.{name, arguments}`):
- `content` a string, or a list of parts: text parts (`{"type": "text", "text": ...}`, or bare
  strings) are joined with no separator; any other part (image, audio, file) is a UsageError,
  because QwQ-32B reads text only.
- `content: null` (or missing) on an assistant turn that has `tool_calls` renders as "".
- `tool_calls[i]` with or without the `{"type": "function", "function": {...}}` wrapper;
  `arguments` a JSON object or a JSON *string* holding an object (OpenAI's own shape, and the
  shape of `Reply.tool_calls`): the string is decoded, because QwQ was trained on the object
  form (`"arguments": {"city": "Paris"}`), not an escaped string. A string that is not a JSON
  object is a UsageError.
- `tool_call_id` / `name` on tool messages and any other extra keys are kept (the template
  ignores what it does not read); keys whose value is None are dropped, as transformers does.
- `role` is `system`, `user`, `assistant` or `tool`; OpenAI's `developer` (its name for the
  system message since the o1 models) becomes `system`. Any other role is a UsageError: QwQ's
  template has no branch for it and would drop the message without a word.

Errors name the message (and tool call) index, so a client can find the faulty entry.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import UsageError

__all__ = ["normalize_messages", "content_text", "ROLES"]

# The roles QwQ's template renders (its branches: user, system, assistant, tool).
ROLES = ("system", "user", "assistant", "tool")
# Other names clients send for those roles: OpenAI's "developer" is its system message.
_ROLE_ALIASES = {"developer": "system"}

# Part types that carry text (OpenAI's chat "text"; the Responses API's "input_text"/"output_text").
_TEXT_PART_TYPES = ("text", "input_text", "output_text")


def normalize_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Validated copies of `messages` in the one shape the template reads (see the module
    docstring). Raises UsageError naming the first faulty message."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise UsageError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise UsageError("messages is empty: give at least one message")
    return [_normalize(_as_mapping(message, index), index) for index, message in enumerate(messages)]


def content_text(content: Any, *, where: str) -> str:
    """A message's `content` as text: a string as is, a list of text parts joined.
    `where` names the message in errors ("message 2 (user)")."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise UsageError(f"{where}: 'content' must be text or a list of text parts, not {type(content).__name__}")
    texts = []
    for n, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise UsageError(f"{where}, content part {n}: expected {{'type': 'text', 'text': ...}}, "
                             f"not {type(part).__name__}")
        kind = part.get("type", "text")
        if kind not in _TEXT_PART_TYPES:
            raise UsageError(f"{where}, content part {n} is of type {kind!r}; QwQ-32B reads text only: "
                             "send text parts ({'type': 'text', 'text': ...}) or a string")
        text = part.get("text")
        if not isinstance(text, str):
            raise UsageError(f"{where}, content part {n}: 'text' must be a string")
        texts.append(text)
    return "".join(texts)


def _as_mapping(message: Any, index: int) -> Mapping[str, Any]:
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        message = {f.name: getattr(message, f.name) for f in dataclasses.fields(message)}
    elif callable(getattr(message, "model_dump", None)):
        message = message.model_dump()
    if not isinstance(message, Mapping):
        raise UsageError(f"message {index} is a {type(message).__name__}, not a dict with 'role' and 'content'")
    return message


def _normalize(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise UsageError(f"message {index} has no 'role' (expected 'system', 'user', 'assistant' or 'tool')")
    where = f"message {index} ({role})"
    if not role.replace("_", "").replace("-", "").isalnum():
        # The template writes the role as is, after <|im_start|>: it must not carry markup.
        raise UsageError(f"{where}: a role is a word such as 'user' or 'assistant'")
    role = _ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise UsageError(f"{where}: unknown role; QwQ's template renders only "
                         f"{', '.join(map(repr, ROLES))} (and 'developer' as 'system')")
    # transformers drops None-valued keys: templates handle a missing key, not None.
    out = {k: v for k, v in message.items() if v is not None}
    out["role"] = role
    tool_calls = out.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise UsageError(f"{where} has tool_calls; only assistant messages may")
        out["tool_calls"] = _tool_calls(tool_calls, index)
    if "content" not in out:
        if not (role == "assistant" and out.get("tool_calls")):
            raise UsageError(f"{where} has no 'content'; only an assistant message with tool_calls may omit it")
        out["content"] = ""
    else:
        out["content"] = content_text(out["content"], where=where)
    return out


def _tool_calls(tool_calls: Any, index: int) -> list[dict[str, Any]]:
    if isinstance(tool_calls, (str, bytes, Mapping)) or not isinstance(tool_calls, Sequence):
        raise UsageError(f"message {index}: 'tool_calls' must be a list")
    calls = []
    for n, call in enumerate(tool_calls):
        where = f"message {index}, tool call {n}"
        wrapped = isinstance(call, Mapping) and isinstance(call.get("function"), Mapping)
        function = call["function"] if wrapped else call
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str) or not function["name"]:
            raise UsageError(f"{where}: expected {{'function': {{'name': ..., 'arguments': ...}}}}")
        function = {**function, "arguments": _arguments(function.get("arguments"), where)}
        calls.append({**call, "function": function} if wrapped else function)
    return calls


def _arguments(arguments: Any, where: str) -> Mapping[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, Mapping):
        return arguments
    if not isinstance(arguments, str):
        raise UsageError(f"{where}: 'arguments' must be a JSON object or a string holding one, "
                         f"not {type(arguments).__name__}")
    if not arguments.strip():
        return {}
    try:
        decoded = json.loads(arguments, strict=False)  # raw control characters in strings, as models write them
    except ValueError as exc:
        raise UsageError(f"{where}: 'arguments' is a string but not JSON ({exc}); send a JSON object "
                         "or its JSON text, e.g. '{\"city\": \"Paris\"}'") from None
    if not isinstance(decoded, dict):
        raise UsageError(f"{where}: 'arguments' must hold a JSON object, not {type(decoded).__name__}")
    return decoded
