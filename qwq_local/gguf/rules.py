"""Model-level rules for a structurally valid GGUF: the layer count, norm epsilons, the
vocabulary, special token ids, the embedding's row count and the chat template.

These catch what llama.cpp handles badly: duplicate tokens trip an assertion (abort) in its
vocabulary loader, and a token_type array of the wrong length is read past its end. Problems
llama.cpp tolerates become warnings on the GGUFInfo instead of faults.
"""

from __future__ import annotations

import math
from typing import Any

from .info import GGUFFault, GGUFInfo

# Special token ids that must name a real token; other *_token_id keys only warn.
_REQUIRED_IN_RANGE = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id")
_TOKEN_TYPES = range(0, 7)  # llama.cpp's llama_token_type: undefined .. byte
LLAMA_MAX_LAYERS = 512  # llama.cpp asserts (aborts) on a block_count outside 1..512
_NORM_EPSILONS = ("attention.layer_norm_epsilon", "attention.layer_norm_rms_epsilon", "attention.group_norm_epsilon")


def check_model(info: GGUFInfo) -> None:
    """Raise GGUFFault on the first model-level fault; append warnings to `info.warnings`."""
    if info.architecture is None:
        info.warnings.append("no general.architecture: llama.cpp will refuse to load this as a model")
    _check_block_count(info)
    _check_norm_epsilons(info)
    _check_vocabulary(info)
    _check_template(info)


def _value_at(info: GGUFInfo, key: str) -> int:
    return info.field_offsets["values"].get(key, 0)


def _check_block_count(info: GGUFInfo) -> None:
    """Every per-layer loop (llama.cpp's and the memory plan's) runs block_count times."""
    key = f"{info.architecture}.block_count"
    if info.architecture is None or key not in info.metadata:
        return
    if info.metadata_types[key] != "UINT32":
        raise GGUFFault(f"{key} must be UINT32 (llama.cpp refuses other types), not {info.metadata_types[key]}",
                     _value_at(info, key))
    n = info.metadata[key]
    if not 1 <= n <= LLAMA_MAX_LAYERS:
        raise GGUFFault(f"{key} = {n} is outside 1..{LLAMA_MAX_LAYERS} (llama.cpp aborts on this)", _value_at(info, key))


def _check_norm_epsilons(info: GGUFInfo) -> None:
    """ggml's norm kernels assert eps >= 0 when they run: a negative or NaN epsilon passes
    every load check and then aborts the process on its first token."""
    if info.architecture is None:
        return
    for name in _NORM_EPSILONS:
        key = f"{info.architecture}.{name}"
        value = info.metadata.get(key)
        if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
            raise GGUFFault(f"{key} = {value} is not a finite non-negative number (llama.cpp aborts on the first "
                         "token with it)", _value_at(info, key))


def _check_vocabulary(info: GGUFInfo) -> None:
    md = info.metadata
    types = info.metadata_types
    model = md.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in md:
        if isinstance(model, str) and model not in ("", "none"):
            raise GGUFFault(f"tokenizer.ggml.model is {model!r} but tokenizer.ggml.tokens is missing",
                         _value_at(info, "tokenizer.ggml.model"))
        return
    at = _value_at(info, "tokenizer.ggml.tokens")
    if types["tokenizer.ggml.tokens"] != "ARRAY[STRING]":
        raise GGUFFault(f"tokenizer.ggml.tokens must be ARRAY[STRING], not {types['tokenizer.ggml.tokens']}", at)
    tokens: list[str] = md["tokenizer.ggml.tokens"]
    if not tokens:
        raise GGUFFault("tokenizer.ggml.tokens is empty", at)
    n = len(tokens)
    if len(set(tokens)) != n:
        _raise_duplicate_token(tokens, at)

    for key, want in (("tokenizer.ggml.token_type", "ARRAY[INT32]"), ("tokenizer.ggml.scores", "ARRAY[FLOAT32]")):
        if key not in md:
            continue
        if types[key] != want:
            raise GGUFFault(f"{key} must be {want}, not {types[key]}", _value_at(info, key))
        if len(md[key]) != n:
            raise GGUFFault(f"{key} has {len(md[key])} entries but the vocabulary has {n} tokens", _value_at(info, key))
    token_types = md.get("tokenizer.ggml.token_type") or []
    odd = next((i for i, t in enumerate(token_types) if t not in _TOKEN_TYPES), None)
    if odd is not None:
        info.warnings.append(f"token {odd} has unknown token type {token_types[odd]}")

    if "tokenizer.ggml.merges" in md and types["tokenizer.ggml.merges"] != "ARRAY[STRING]":
        raise GGUFFault(f"tokenizer.ggml.merges must be ARRAY[STRING], not {types['tokenizer.ggml.merges']}",
                     _value_at(info, "tokenizer.ggml.merges"))

    for key, value in md.items():
        if not (key.startswith("tokenizer.ggml.") and key.endswith("_token_id")):
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise GGUFFault(f"{key} must be an integer, not {types[key]}", _value_at(info, key))
        if 0 <= value < n:
            continue
        if key in _REQUIRED_IN_RANGE:
            raise GGUFFault(f"{key} = {value} is outside the vocabulary (0..{n - 1})", _value_at(info, key))
        info.warnings.append(f"{key} = {value} is outside the vocabulary (0..{n - 1}); llama.cpp ignores it")

    embd = info.tensor("token_embd.weight")
    if embd is not None and len(embd.shape) == 2 and embd.shape[1] != n:
        at = info.field_offsets["tensors"][info.tensors.index(embd)]
        raise GGUFFault(f"the vocabulary has {n} tokens but token_embd.weight has {embd.shape[1]} rows", at)


def _raise_duplicate_token(tokens: list[str], at: int) -> None:
    first: dict[str, int] = {}
    # Element i starts after the array header (type 4 + count 8 bytes) and i length-prefixed
    # strings; recomputed only here, on the error path, to keep the hot loop lean.
    pos = at + 4 + 4 + 8
    for i, tok in enumerate(tokens):
        if tok in first:
            raise GGUFFault(f"duplicate token {tok!r} at ids {first[tok]} and {i} in tokenizer.ggml.tokens "
                         "(llama.cpp aborts on this)", pos)
        first[tok] = i
        pos += 8 + len(tok.encode("utf-8"))


def _check_template(info: GGUFInfo) -> None:
    key = "tokenizer.chat_template"
    if key not in info.metadata:
        info.warnings.append("no tokenizer.chat_template: qwq-local uses its own copy of QwQ's original template")
        return
    if info.metadata_types[key] != "STRING":
        raise GGUFFault(f"{key} must be a STRING, not {info.metadata_types[key]}", _value_at(info, key))
    problem = template_problem(info.metadata[key])
    if problem:
        raise GGUFFault(f"{key} does not compile: {problem}", _value_at(info, key))


def template_problem(text: str) -> str | None:
    """Why `text` fails to compile as a chat template in our sandbox, or None if it compiles."""
    from ..errors import TemplateError
    from ..chat.template import ChatTemplate

    try:
        ChatTemplate.from_string(text, source="the GGUF")
    except TemplateError as exc:
        return _one_line(exc)
    except RecursionError:
        return "nested too deeply to parse"
    return None


def _one_line(exc: Any) -> str:
    text = " ".join(str(exc).split())
    return text[:300] if text else type(exc).__name__
