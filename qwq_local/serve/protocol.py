"""The OpenAI-compatible wire format: request and response models (pydantic), apart from the
serving logic, as vLLM's entrypoints keep them.

Field names and meanings follow OpenAI's Chat Completions API; the QwQ extras follow the
servers clients already know: `thinking_budget` (DashScope) and `thinking_budget_tokens`
(llama.cpp's server) cap the thought, `grammar` (llama.cpp's server) constrains the whole
completion with GBNF, `ignore_eos` (llama.cpp's server) bans the end tokens. Unknown fields are accepted and ignored, as OpenAI's SDKs send new ones.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "APIError", "ChatCompletionRequest", "CompletionRequest", "ErrorBody", "StreamOptions", "ToolChoiceFunction",
    "chunk", "completion_id", "error_body",
]


class APIError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # noqa: A002
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


def error_body(exc: APIError) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`, OpenAI's error shape."""
    return {"error": ErrorBody(message=exc.message, type=exc.type, param=exc.param, code=exc.code).model_dump()}


class _Lenient(BaseModel):
    # Clients send fields this server does not use (user, store, metadata, ...): accept them.
    # Strict types, as OpenAI's API: "stream": "yes" or "max_tokens": true are 400s, not coerced.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)  # NaN: "a finite number"


class StreamOptions(_Lenient):
    include_usage: bool = False


class FunctionName(_Lenient):
    name: str


class ToolChoiceFunction(_Lenient):
    """`{"type": "function", "function": {"name": ...}}`: this one tool must be called."""

    type: Literal["function"] = "function"
    function: FunctionName


class ResponseFormat(_Lenient):
    """`text`, `json_object`, or `json_schema` with `{"name", "schema", "strict"}`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[dict[str, Any]] = None


class _Sampling(_Lenient):
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0.0, le=1.0)
    presence_penalty: Optional[float] = Field(None, ge=-2.0, le=2.0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    logit_bias: Optional[dict[str, float]] = None
    n: Optional[int] = Field(None, ge=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    grammar: Optional[str] = None
    ignore_eos: bool = False


class ChatCompletionRequest(_Sampling):
    """`POST /v1/chat/completions`. `messages` are passed on as they came (the conversation
    layer validates them); max_tokens / max_completion_tokens count thought + answer."""

    messages: list[dict[str, Any]] = Field(..., min_length=1)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], ToolChoiceFunction]] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormat] = None
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    thinking_budget: Optional[int] = Field(None, ge=0)
    thinking_budget_tokens: Optional[int] = Field(None, ge=0)


class CompletionRequest(_Sampling):
    """`POST /v1/completions`: a raw prompt, no template, no thought split."""

    # A string or token ids, alone or as a one-item list (OpenAI's shapes; several prompts would
    # be several choices, which n > 1 refuses too).
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


def completion_id(prefix: str = "chatcmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def chunk(cid: str, model: str, created: int, *, delta: dict | None = None, finish_reason: str | None = None,
          usage: dict | None = None, object: str = "chat.completion.chunk") -> dict:  # noqa: A002
    """One streamed chunk; `usage` alone gives the usage chunk with empty `choices`."""
    body: dict[str, Any] = {"id": cid, "object": object, "created": created, "model": model}
    if usage is not None and delta is None and finish_reason is None:
        body["choices"] = []
        body["usage"] = usage
        return body
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if object == "chat.completion.chunk":
        choice["delta"] = delta or {}
        choice["logprobs"] = None
    else:
        choice["text"] = (delta or {}).get("content", "")
        choice["logprobs"] = None
    body["choices"] = [choice]
    return body


def now() -> int:
    return int(time.time())
