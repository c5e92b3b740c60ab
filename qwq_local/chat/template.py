"""QwQ's chat template: the shipped original, and sandboxed rendering of any template.

`render_prompt` output is byte-identical to Hugging Face transformers'
`tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=...)`
with QwQ-32B's released template: the same Jinja environment (see sandbox.py), the same
input preparation (None-valued keys dropped, values reduced to plain JSON types, reasoning
fields aliased, the tokenizer's special tokens passed as variables) and the same tool handling
(dict schemas as-is, Python functions converted by transformers' own `get_json_schema`).

Deliberate differences, all on inputs in OpenAI's shapes (messages.py): an assistant message
with tool_calls and `content: None` renders as if its content were "" (transformers fails);
`arguments` given as a JSON string is decoded to the object QwQ was trained on (transformers
writes an escaped string); content given as a list of text parts is joined (transformers fails).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from .. import constants
from ..errors import TemplateError, UsageError
from .messages import normalize_messages
from .sandbox import TemplateLimitError, environment, render_limited

ORIGINAL_TEMPLATE_PATH = constants.DATA_DIR / "chat_template.jinja"

# Names a message's reasoning may come under; transformers copies the first found to the
# first two (templates of other models read them; QwQ's ignores them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplate:
    """A compiled chat template. Build with `original()`, `from_string()` or `from_file()`."""

    def __init__(self, text: str, *, source: str) -> None:
        if not isinstance(text, str):
            raise TemplateError(f"the chat template from {source} is not text")
        if len(text) > constants.TEMPLATE_MAX_SOURCE_CHARS:
            raise TemplateError(
                f"the chat template from {source} is {len(text):,} characters, over the "
                f"{constants.TEMPLATE_MAX_SOURCE_CHARS:,} limit; use template='original'"
            )
        self.text = text
        self.source = source
        self._compiled = _compile(text, source)

    @classmethod
    def original(cls) -> "ChatTemplate":
        """QwQ-32B's released template, shipped inside the package."""
        return _original()

    @classmethod
    def from_string(cls, text: str, *, source: str = "a string") -> "ChatTemplate":
        return _from_string(text, source)

    @classmethod
    def from_file(cls, path: str | Path) -> "ChatTemplate":
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TemplateError(f"chat template file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"cannot read chat template file {path}: {exc}") from None
        return _from_string(text, str(path))

    def same_as(self, other: "ChatTemplate | str") -> bool:
        """Whether two templates render alike: equal after Jinja's own newline normalisation
        and the single trailing newline it drops."""
        other_text = other.text if isinstance(other, ChatTemplate) else other
        return _normalise(self.text) == _normalise(other_text)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Any] | None = None,
        add_generation_prompt: bool = True,
        extra_vars: Mapping[str, Any] | None = None,
        timeout_s: float = constants.TEMPLATE_RENDER_TIMEOUT_S,
        max_chars: int = constants.TEMPLATE_MAX_CHARS,
    ) -> str:
        """Render a conversation. `extra_vars` are further template variables (transformers'
        `**kwargs`); the tokenizer's special tokens are always passed, as transformers does."""
        chat = prepare_messages(messages)
        variables: dict[str, Any] = {**constants.TEMPLATE_SPECIAL_TOKENS, **_plain(dict(extra_vars or {}))}
        variables.update(
            messages=chat,
            tools=_plain(tool_schemas(tools)),
            documents=None,
            add_generation_prompt=add_generation_prompt,
        )
        try:
            return render_limited(self._compiled, variables, timeout_s=timeout_s, max_chars=max_chars)
        except TemplateLimitError:
            raise
        except TemplateError as exc:
            raise TemplateError(f"chat template from {self.source}: {exc}") from None
        except jinja2.exceptions.SecurityError as exc:
            raise TemplateError(f"chat template from {self.source} was stopped by the sandbox: {exc}") from None
        except jinja2.exceptions.UndefinedError as exc:
            raise TemplateError(
                f"chat template from {self.source} failed: {exc} (a message lacks a field it needs?)"
            ) from None
        except jinja2.TemplateError as exc:  # raise_exception() in the template
            raise TemplateError(f"chat template from {self.source} refused the input: {exc}") from None
        except RecursionError:
            raise TemplateError(
                f"chat template from {self.source} recursed too deeply; use template='original'"
            ) from None
        except MemoryError:
            raise TemplateError(f"chat template from {self.source} ran out of memory") from None
        except Exception as exc:  # a template is code: any exception is its failure
            raise TemplateError(
                f"chat template from {self.source} failed to render: {type(exc).__name__}: {exc}"
            ) from None

    def __repr__(self) -> str:
        return f"ChatTemplate(source={self.source!r})"


def _normalise(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text[:-1] if text.endswith("\n") else text


def _compile(text: str, source: str) -> Any:
    try:
        return environment().from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"chat template from {source} has a syntax error at line {exc.lineno}: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise TemplateError(f"chat template from {source} does not compile: {exc}") from None
    except RecursionError:
        raise TemplateError(f"chat template from {source} is nested too deeply to compile") from None


@functools.lru_cache(maxsize=16)
def _from_string(text: str, source: str) -> ChatTemplate:
    return ChatTemplate(text, source=source)


@functools.lru_cache(maxsize=1)
def _original() -> ChatTemplate:
    return ChatTemplate(ORIGINAL_TEMPLATE_PATH.read_text(encoding="utf-8"), source="the original QwQ-32B template")


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    template: ChatTemplate | str | None = None,
) -> str:
    """The prompt text for `messages`, as transformers' apply_chat_template renders it.

    `template` is a ChatTemplate, template text, or None for QwQ's original template.
    """
    if template is None:
        chat_template = ChatTemplate.original()
    elif isinstance(template, ChatTemplate):
        chat_template = template
    else:
        chat_template = ChatTemplate.from_string(template)
    return chat_template.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)


def render_prompt_spans(
    messages: Sequence[Mapping[str, Any]],
    *,
    specials: Sequence[str],
    tools: Sequence[Any] | None = None,
    add_generation_prompt: bool = True,
    template: ChatTemplate | str | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The prompt text (exactly `render_prompt`'s) and the (start, end) spans of the occurrences
    of `specials` (control/tag token texts) in it that come from message text (contents, tool
    results, tool-call arguments, names, tool schemas) rather than from the template itself.

    How: every occurrence inside message text is rendered once more with a random marker in
    front; the markers' positions in the output name those occurrences. A template that changes
    message text in a way the markers disturb (so the marked output, markers removed, differs
    from the plain one) raises TemplateError.
    """
    text = render_prompt(messages, tools=tools, add_generation_prompt=add_generation_prompt, template=template)
    pattern = specials_pattern(tuple(specials))
    chat = normalize_messages(messages)
    schemas = tool_schemas(tools)
    if pattern is None or not (_has_special((chat, schemas), pattern)):
        return text, []
    mark = "\ue000" + secrets.token_hex(8) + "\ue001"
    marked = render_prompt([_mark(m, pattern, mark) for m in chat],
                           tools=None if schemas is None else [_mark(t, pattern, mark) for t in schemas],
                           add_generation_prompt=add_generation_prompt, template=template)
    pieces = marked.split(mark)
    positions, at = [], 0
    for piece in pieces[:-1]:
        at += len(piece)
        positions.append(at)
    if "".join(pieces) != text:
        raise TemplateError("this chat template transforms message text in a way qwq-local cannot follow, so "
                            "it cannot tell control-token text in messages from the template's own; use "
                            "template='original', or special_in_content=True to read all of it as tokens")
    spans = []
    for start in positions:
        found = pattern.match(text, start)
        if found:
            spans.append(found.span())
    return text, spans


@functools.lru_cache(maxsize=8)
def specials_pattern(specials: tuple[str, ...]) -> "re.Pattern[str] | None":
    """A regex finding `specials` as llama.cpp's tokenizer does (longest text first)."""
    texts = sorted({s for s in specials if s}, key=len, reverse=True)
    return re.compile("|".join(re.escape(s) for s in texts)) if texts else None


def _has_special(value: Any, pattern: "re.Pattern[str]") -> bool:
    if isinstance(value, str):
        return pattern.search(value) is not None
    if isinstance(value, Mapping):
        return any(_has_special(v, pattern) for k, v in value.items() if k != "role")
    if isinstance(value, (list, tuple)):
        return any(_has_special(v, pattern) for v in value)
    return False


def _mark(value: Any, pattern: "re.Pattern[str]", mark: str) -> Any:
    if isinstance(value, str):
        return pattern.sub(lambda m: mark + m.group(0), value)
    if isinstance(value, Mapping):
        return {k: v if k == "role" else _mark(v, pattern, mark) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_mark(v, pattern, mark) for v in value]
    return value


# --- Template choice ----------------------------------------------------------------------

@dataclass(frozen=True)
class TemplateSelection:
    template: ChatTemplate
    # Set when the GGUF carries a template that differs from the original one in use; the
    # runtime shows it once with warnings.warn.
    warning: str | None = None


def select_template(choice: str | Path | None, *, gguf_template: str | None) -> TemplateSelection:
    """The runtime's rule: "original" (default) uses the shipped template even when the GGUF
    carries an altered copy (and says so); "gguf" uses the file's; anything else is a path."""
    choice = constants.DEFAULT_TEMPLATE_CHOICE if choice is None else choice
    if isinstance(choice, str) and choice == "original":
        original = ChatTemplate.original()
        warning = None
        if gguf_template and not original.same_as(gguf_template):
            warning = (
                "this GGUF carries a chat template that differs from QwQ-32B's original; using the "
                "original (pass template='gguf' to use the file's own)"
            )
        return TemplateSelection(original, warning)
    if isinstance(choice, str) and choice == "gguf":
        if not gguf_template:
            raise UsageError(
                "template='gguf' was asked for but this GGUF has no tokenizer.chat_template; "
                "use template='original'"
            )
        return TemplateSelection(ChatTemplate.from_string(gguf_template, source="the GGUF file"))
    path = Path(choice)
    if not path.is_file():
        raise UsageError(
            f"template must be 'original', 'gguf' or a path to a template file; {str(choice)!r} is none of these"
        )
    return TemplateSelection(ChatTemplate.from_file(path))


# --- Inputs -------------------------------------------------------------------------------

def tool_schemas(tools: Sequence[Any] | None) -> list[dict] | None:
    """Tools as transformers passes them: dicts unchanged, Python functions converted to JSON
    schema by transformers' own converter (needs transformers installed)."""
    if tools is None:
        return None
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence):
        raise TemplateError("tools must be a list of JSON-schema dicts (or Python functions)")
    schemas = []
    for tool in tools:
        if isinstance(tool, Mapping):
            schemas.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            schemas.append(_function_schema(tool))
        else:
            raise TemplateError(
                f"a tool must be a JSON-schema dict or a Python function, not {type(tool).__name__}"
            )
    return schemas


def _function_schema(func: Any) -> dict:
    try:
        from transformers.utils.chat_template_utils import get_json_schema
    except ImportError:
        raise TemplateError(
            f"tool {func.__name__!r} is a Python function; converting it to a JSON schema needs "
            "transformers (pip install transformers), or pass the schema as a dict"
        ) from None
    try:
        return get_json_schema(func)
    except Exception as exc:  # transformers raises its own error types for bad docstrings/hints
        raise TemplateError(f"cannot make a JSON schema from tool {func.__name__!r}: {exc}") from None


def prepare_messages(messages: Sequence[Any]) -> list[dict]:
    """Normalise OpenAI-shaped messages (see messages.py) and prepare them as transformers does:
    plain JSON types, reasoning fields aliased. Raises UsageError naming the faulty message."""
    return [_alias_reasoning(_plain(message)) for message in normalize_messages(messages)]


def _alias_reasoning(message: dict) -> dict:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


def _plain(value: Any) -> Any:
    """Rebuild data from plain JSON types (transformers' `_plain_template_data`): objects with
    methods the sandbox does not know about never reach the template."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and type(value).__name__ != "ndarray" and hasattr(value, "item"):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"
