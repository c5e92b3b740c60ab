"""GBNF grammars that constrain the answer after the thought: a forced tool call
(`tool_choice` "required" or a named function) and `response_format` json_object/json_schema.

The JSON parts come from llama.cpp's own JSON-schema-to-GBNF converter (llama-cpp-python ships
it ported to Python as `llama_cpp.llama_grammar.SchemaConverter`, the same code as llama.cpp's
examples/json_schema_to_grammar.py), with the string-character rule of llama.cpp's C++ converter,
which keeps raw control characters out of strings. The thought runs free: when the prompt ends inside
`<think>`, the grammar is lazy and starts at the `</think>` token (llama.cpp's lazy grammar with
a trigger token), so it covers exactly `</think>`, the blank line after it, and the answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Sequence

from ..constants import THINK_CLOSE, TOOL_CALL_CLOSE, TOOL_CALL_OPEN

_PORT_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'

__all__ = ["AnswerGrammar", "answer_grammar", "json_rules", "tool_call_rules", "tool_call_schema"]


@dataclass(frozen=True)
class AnswerGrammar:
    """A grammar for `Sampling`: the GBNF text and, when lazy, the trigger (the thought-close
    token ids, or a regex over the generated text when `</think>` is not one token)."""

    gbnf: str
    trigger_tokens: tuple[int, ...] = ()
    trigger_patterns: tuple[str, ...] = ()


def json_rules(schema: Any, name: str) -> str:
    """GBNF rules for a JSON schema, its start rule called `name`. Raises ValueError for a
    schema the converter cannot handle."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        schema = converter.resolve_refs(schema, "request")
        converter.visit(schema, name)
        gbnf = converter.format_grammar()
    except (KeyError, ValueError, TypeError, AssertionError, NotImplementedError, RecursionError) as exc:
        raise ValueError(f"the JSON schema cannot be turned into a grammar: {exc}") from None
    # llama-cpp-python's port lets a string hold raw control characters, which JSON forbids
    # (json.loads fails on them); llama.cpp's converter excludes them (json-schema-to-grammar.cpp).
    gbnf = gbnf.replace(_PORT_CHAR, _JSON_CHAR)
    return gbnf.rstrip("\n") + "\n"


def tool_call_schema(tools: Sequence[dict]) -> dict:
    """The JSON of one Hermes-style call (`{"name": ..., "arguments": {...}}`) to any of `tools`,
    the arguments following each function's `parameters` schema."""
    options = []
    for tool in tools:
        function = tool.get("function", tool)
        params = function.get("parameters") or {"type": "object"}
        options.append({"type": "object", "properties": {"name": {"const": function["name"]}, "arguments": params},
                        "required": ["name", "arguments"]})
    return options[0] if len(options) == 1 else {"anyOf": options}


def answer_grammar(answer_rules: str, answer_rule: str, *, in_thought: bool, close_tokens: Sequence[int]
                   ) -> AnswerGrammar:
    """Wrap rules for the answer so they apply after the thought.

    in_thought: the prompt ends inside `<think>` (chat.reasoning.starts_in_thought, the runtime's own rule); then the grammar
    waits for `</think>` (one token: `close_tokens`) and its root starts with that text."""
    if not in_thought:
        return AnswerGrammar(f"root ::= {answer_rule}\n{answer_rules}")
    # A few blank-line characters after `</think>`, not any number: an unbounded run lets a model
    # spend its whole budget on whitespace.
    root = f'root ::= {json.dumps(THINK_CLOSE)} [ \\n]{{0,3}} {answer_rule}\n'
    if len(close_tokens) == 1:
        return AnswerGrammar(root + answer_rules, trigger_tokens=(int(close_tokens[0]),))
    # `</think>` spelled with several tokens: trigger on the text instead (regex_match over what
    # was generated; the group marks where the grammar starts).
    return AnswerGrammar(root + answer_rules, trigger_patterns=(r"[\s\S]*?(" + "</think>" + r")[\s\S]*",))


def tool_call_rules(tools: Sequence[dict], *, parallel: bool) -> tuple[str, str]:
    """(rules, start rule) for one or more `<tool_call>` blocks and nothing else."""
    rules = json_rules(tool_call_schema(tools), "qwq-call-json")
    block = f'qwq-call ::= {json.dumps(TOOL_CALL_OPEN + chr(10))} qwq-call-json {json.dumps(chr(10) + TOOL_CALL_CLOSE)}\n'
    calls = 'qwq-calls ::= qwq-call ("\\n" qwq-call)*\n' if parallel else "qwq-calls ::= qwq-call\n"
    return rules + block + calls, "qwq-calls"
