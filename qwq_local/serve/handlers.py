"""From an OpenAI request to a generation job, and from the model's events to OpenAI's replies
(whole or as `chat.completion.chunk`s). No HTTP here: app.py routes, this module translates.

Rules kept here (docs/serve.md has them for users):
- a streamed delta never has both `content` and `reasoning_content` null: the role chunk and the
  final chunk carry `content: ""` (Alibaba's DashScope loop for QwQ appends `delta.content`
  whenever `reasoning_content` is null);
- answer text that may be a `<tool_call>` block is held back until it is known; calls go out as
  `delta.tool_calls` (id and name first, then the arguments) once the turn has ended;
- `tool_choice` "none" leaves the tools out of the prompt; "required" or a named function adds a
  grammar (grammar.py) so that the answer is the call(s) and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator

from .. import constants
from ..chat.reasoning import starts_in_thought
from ..errors import ContextOverflowError, RpcError, TemplateError, UsageError
from ..runtime.decode import Event, Sampling
from . import grammar as gbnf
from .engine import Engine, Job, QueueFull
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, chunk

log = logging.getLogger("qwq_local.serve")

__all__ = ["Prepared", "chat_message", "collect", "prepare_chat", "prepare_completion", "stream_chat",
           "stream_completion", "submit", "usage_of"]


@dataclass
class Prepared:
    """A validated request: the prompt, its tokens and the keyword options of stream_prompt."""

    prompt: str
    tokens: list[int]
    options: dict
    include_usage: bool = False
    echo: str = ""  # /v1/completions with echo: the prompt text, sent before the completion


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _sampling(req: Any, model: Any, answer: gbnf.AnswerGrammar | None) -> Sampling:
    if req.n is not None and req.n > 1:
        raise _bad("n > 1 is not supported: ask for one choice and send the request again", "n")
    extra = req.model_extra or {}
    for field in ("logprobs", "top_logprobs"):
        if extra.get(field):  # accepted silently they would read as "no logprobs exist"
            raise _bad(f"{field} is not supported by this server: drop it from the request", field)
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        try:
            tok = int(key)
        except ValueError:
            raise _bad(f"logit_bias keys are token ids, not {key!r}", "logit_bias") from None
        if not 0 <= tok < model.n_vocab:
            raise _bad(f"logit_bias token {tok} is outside the vocabulary (0..{model.n_vocab - 1})", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise _bad(f"logit_bias values must be in [-100, 100], not {value}", "logit_bias")
        bias[tok] = float(value)
    if req.ignore_eos:
        bias = {**model.eog_bias(), **bias}
    if answer is not None and req.grammar:
        raise _bad("give either `grammar` or tool_choice required/named / response_format json, not both", "grammar")
    g = answer.gbnf if answer is not None else req.grammar
    return Sampling(
        temperature=constants.DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=constants.DEFAULT_TOP_P if req.top_p is None else req.top_p,
        top_k=constants.DEFAULT_TOP_K if req.top_k is None else req.top_k,
        min_p=constants.DEFAULT_MIN_P if req.min_p is None else req.min_p,
        presence_penalty=constants.DEFAULT_PRESENCE_PENALTY if req.presence_penalty is None else req.presence_penalty,
        seed=req.seed, grammar=g, logit_bias=bias or None,
        grammar_trigger_tokens=answer.trigger_tokens if answer is not None else (),
        grammar_trigger_patterns=answer.trigger_patterns if answer is not None else ())


def _fits(model: Any, tokens: list[int], param: str) -> list[int]:
    if len(tokens) >= model.n_ctx:
        raise APIError(400, f"This model's context per slot is {model.n_ctx} tokens, but the prompt has "
                            f"{len(tokens)} tokens, which leaves no room for the reply (at most "
                            f"{model.n_ctx - 1} prompt tokens); shorten the messages or start the server with a "
                            "larger --ctx.",
                       param=param, code="context_length_exceeded")
    return tokens


def _stops(stop: Any) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise _bad("stop takes at most 4 sequences", "stop")
    return [s for s in stops if s]


def _answer_grammar(req: ChatCompletionRequest, model: Any, prompt: str) -> gbnf.AnswerGrammar | None:
    choice = req.tool_choice
    rules = None
    if choice == "required" or not isinstance(choice, (str, type(None))):
        if not req.tools:
            raise _bad("tool_choice asks for a tool call but the request has no tools", "tool_choice")
        tools = req.tools
        if not isinstance(choice, str):
            tools = [t for t in req.tools if (t.get("function") or {}).get("name") == choice.function.name]
            if not tools:
                raise _bad(f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           "tool_choice")
        try:
            rules, start = gbnf.tool_call_rules(tools, parallel=choice == "required" and req.parallel_tool_calls
                                                is not False)
        except (ValueError, KeyError, TypeError) as exc:
            raise _bad(f"a tool's parameters cannot be enforced: {exc}", "tools") from None
    fmt = req.response_format
    if fmt is not None and fmt.type != "text":
        if rules is not None:
            raise _bad("response_format json and a forced tool call cannot both constrain the answer",
                       "response_format")
        schema: Any = {"type": "object"}
        if fmt.type == "json_schema":
            spec = fmt.json_schema or {}
            schema = spec.get("schema", spec.get("schema_"))
            if not isinstance(schema, dict):
                raise _bad("response_format json_schema needs {'name': ..., 'schema': {...}}", "response_format")
        try:
            rules, start = gbnf.json_rules(schema, "qwq-answer"), "qwq-answer"
        except ValueError as exc:
            raise _bad(str(exc), "response_format") from None
    if rules is None:
        return None
    return gbnf.answer_grammar(rules, start, in_thought=starts_in_thought(prompt),
                               close_tokens=model.think_close_tokens)


def prepare_chat(req: ChatCompletionRequest, model: Any, *, special_in_content: bool = False) -> Prepared:
    """Validate a chat request against the model; raises APIError (400) for bad input.
    Control-token text inside messages stays plain text unless special_in_content (the server's
    --special-in-content; QwQ.encode_prompt)."""
    tools = req.tools if req.tools and req.tool_choice != "none" else None
    try:
        # encode_prompt, not tokenize(render_prompt(...)): control-token text inside messages
        # stays plain text, so a message cannot forge turns or close the thought.
        prompt, tokens = model.encode_prompt(req.messages, tools=tools, special_in_content=special_in_content)
    except (TemplateError, UsageError) as exc:
        raise _bad(f"messages: {exc}", "messages") from None
    answer = _answer_grammar(req, model, prompt)
    sampling = _sampling(req, model, answer)
    try:
        sampling.check()
    except UsageError as exc:
        raise _bad(str(exc)) from None
    budget = req.thinking_budget if req.thinking_budget is not None else req.thinking_budget_tokens
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    options = {"sampling": sampling, "max_tokens": max_tokens, "thinking_budget": budget, "stop": _stops(req.stop)}
    return Prepared(prompt, _fits(model, tokens, "messages"), options,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage))


def _completion_prompt(req: CompletionRequest, model: Any) -> tuple[str, list[int]]:
    """(text, token ids) of a /v1/completions prompt: a string (special texts become their
    tokens, as in llama-server) or token ids, alone or as a one-item list."""
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) > 1:
            raise _bad("one prompt per request: several would be several choices (n > 1 is not supported)",
                       "prompt")
        prompt = prompt[0]
    if not prompt:
        raise _bad("prompt is empty", "prompt")
    if isinstance(prompt, str):
        try:
            return prompt, model.tokenize(prompt)
        except UsageError as exc:  # text that is not Unicode (a lone "\ud800" escape)
            raise _bad(f"prompt: {exc}", "prompt") from None
    bad = next((t for t in prompt if not 0 <= t < model.n_vocab), None)
    if bad is not None:
        raise _bad(f"prompt token {bad} is outside the vocabulary (0..{model.n_vocab - 1})", "prompt")
    return model.detokenize(prompt), list(prompt)


def prepare_completion(req: CompletionRequest, model: Any) -> Prepared:
    sampling = _sampling(req, model, None)
    options = {"sampling": sampling, "max_tokens": req.max_tokens, "stop": _stops(req.stop)}
    text, tokens = _completion_prompt(req, model)
    return Prepared(text, _fits(model, tokens, "prompt"), options,
                    include_usage=bool(req.stream_options and req.stream_options.include_usage),
                    echo=text if req.echo else "")


def submit(engine: Engine, prepared: Prepared) -> Job:
    """Queue a job; 503 with Retry-After when the queue is full."""
    options = prepared.options

    def run(model, cancel):
        # The prepared ids: tokenizing the text again would read control-token text in messages
        # as control tokens.
        return model.stream_prompt(prepared.prompt, tokens=prepared.tokens, cancel=cancel, **options)

    job = Job(run=run, tokens=prepared.tokens, loop=asyncio.get_running_loop())
    try:
        engine.submit(job)
    except QueueFull as exc:
        raise APIError(503, f"server busy: {exc}; retry shortly", type="server_error", code="server_busy",
                       headers={"Retry-After": "1"}) from None
    return job


async def _events(job: Job) -> AsyncIterator[Any]:
    """The job's events until it ends; a fault in the slot becomes an exception here. Text
    events of one kind that arrived together are merged into one (one chunk for them)."""
    while True:
        merged: list[Any] = []
        for item in await job.take():
            if isinstance(item, Event) and item.kind in ("thinking", "content") and merged \
                    and isinstance(merged[-1], Event) and merged[-1].kind == item.kind:
                merged[-1] = Event(item.kind, merged[-1].text + item.text)
            else:
                merged.append(item)
        for item in merged:
            if item is None:
                if job.shutdown:
                    raise APIError(503, "the server is shutting down", type="server_error", code="shutdown")
                return
            if isinstance(item, tuple) and item and item[0] == "error":
                raise _error(item[1])
            yield item


def _error(exc: BaseException) -> BaseException:
    """The API error for a fault raised in the slot."""
    if isinstance(exc, ContextOverflowError):
        return APIError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (UsageError, TemplateError)):
        return _bad(str(exc))
    if isinstance(exc, RpcError):
        # The context lives partly on the worker: nothing on this server works until restart.
        log.error("an RPC worker failed (%s); restart the server once the worker runs again", exc)
        return APIError(503, "a backend worker of this server is unavailable; the server needs a restart",
                        type="server_error", code="backend_unavailable")
    return exc


async def collect(job: Job, is_disconnected, texts: list[str] | None = None) -> Any:
    """The reply of a non-streamed request. texts: when given, gets the text of every thought and
    answer event, which is what a stream of the same request sends. The job is cancelled, or
    leaves the queue, when the client goes away: that is checked a few times a second (each
    check costs the ASGI server a receive()), also while the job waits for a slot."""
    async def watch() -> None:
        while True:
            await asyncio.sleep(constants.SERVE_DISCONNECT_CHECK_S)
            if await is_disconnected():
                job.leave()
                return

    watcher = asyncio.create_task(watch())
    reply = None
    try:
        async for event in _events(job):
            if event.kind == "done":
                reply = event.reply
            elif texts is not None and event.kind in ("thinking", "content"):
                texts.append(event.text)
    finally:
        watcher.cancel()
        job.leave()  # no-op once finished; frees the slot or queue place if this request was cancelled
    if reply is not None and job.shutdown:
        raise APIError(503, "the server is shutting down", type="server_error", code="shutdown")
    return reply


def usage_of(reply: Any) -> dict:
    """OpenAI's usage object. Speculative decoding's proposals go where OpenAI reports those of
    Predicted Outputs: completion_tokens_details.accepted_prediction_tokens (kept) and
    rejected_prediction_tokens (verified and dropped)."""
    u = reply.usage
    drafted, kept = u.get("draft_tokens", 0), u.get("draft_accepted_tokens", 0)
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"],
            "completion_tokens_details": {"reasoning_tokens": u.get("thinking_tokens", 0),
                                          "accepted_prediction_tokens": kept,
                                          "rejected_prediction_tokens": drafted - kept},
            "prompt_tokens_details": {"cached_tokens": u.get("cached_tokens", 0)}}


def finish_reason(reply: Any) -> str:
    return "length" if reply.finish_reason in ("length", "interrupted") else reply.finish_reason


def chat_message(reply: Any) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "reasoning_content": reply.thinking}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    return message


class _AnswerHold:
    """Answer text goes out at once unless it may be the start of a `<tool_call>` block or the
    whitespace the call parser strips; that part waits for the end of the turn."""

    def __init__(self) -> None:
        self.sent = ""
        self.pending = ""
        self.blocked = False

    def feed(self, text: str) -> str:
        if self.blocked:
            self.pending += text
            return ""
        self.pending += text
        at = self.pending.find(constants.TOOL_CALL_OPEN)
        if at >= 0:
            self.blocked = True
            out, self.pending = self.pending[:at], self.pending[at:]
        else:
            keep = next((n for n in range(min(len(self.pending), len(constants.TOOL_CALL_OPEN) - 1), 0, -1)
                         if self.pending.endswith(constants.TOOL_CALL_OPEN[:n])), 0)
            out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        stripped = out.rstrip()
        self.pending = out[len(stripped):] + self.pending
        out = stripped
        if not self.sent:
            out = out.lstrip()  # the parser strips the answer's start as well
        self.sent += out
        return out

    def rest(self, final: str) -> str:
        """What is left to send so that the streamed text equals the reply's content."""
        return final[len(self.sent):] if final.startswith(self.sent) else ""


async def stream_chat(job: Job, *, cid: str, model_id: str, created: int, include_usage: bool
                      ) -> AsyncIterator[dict]:
    """`chat.completion.chunk` bodies for sse-starlette; an error mid-stream becomes an
    `{"error": ...}` event. The job is cancelled when the client goes away."""
    yield chunk(cid, model_id, created, delta={"role": "assistant", "content": ""})
    hold = _AnswerHold()
    try:
        async for event in _events(job):
            if event.kind == "thinking":
                yield chunk(cid, model_id, created, delta={"reasoning_content": event.text})
            elif event.kind == "content":
                text = hold.feed(event.text)
                if text:
                    yield chunk(cid, model_id, created, delta={"content": text})
            elif event.kind == "done":
                reply = event.reply
                rest = hold.rest(reply.content)
                if rest:
                    yield chunk(cid, model_id, created, delta={"content": rest})
                for i, call in enumerate(reply.tool_calls):
                    fn = call["function"]
                    yield chunk(cid, model_id, created, delta={"content": "", "tool_calls": [
                        {"index": i, "id": call["id"], "type": "function",
                         "function": {"name": fn["name"], "arguments": ""}}]})
                    yield chunk(cid, model_id, created, delta={"content": "", "tool_calls": [
                        {"index": i, "function": {"arguments": fn["arguments"]}}]})
                if job.shutdown:
                    raise APIError(503, "the server is shutting down", type="server_error", code="shutdown")
                yield chunk(cid, model_id, created, delta={"content": ""}, finish_reason=finish_reason(reply))
                if include_usage:
                    yield chunk(cid, model_id, created, usage=usage_of(reply))
    finally:
        job.leave()


async def stream_completion(job: Job, *, cid: str, model_id: str, created: int, include_usage: bool,
                            echo: str = "") -> AsyncIterator[dict]:
    """`text_completion` chunks of a raw prompt (thought and answer text alike), after the
    prompt's own text when `echo` holds it."""
    try:
        if echo:
            yield chunk(cid, model_id, created, delta={"content": echo}, object="text_completion")
        async for event in _events(job):
            if event.kind in ("thinking", "content"):
                yield chunk(cid, model_id, created, delta={"content": event.text}, object="text_completion")
            elif event.kind == "done":
                yield chunk(cid, model_id, created, delta={"content": ""}, object="text_completion",
                            finish_reason=finish_reason(event.reply))
                if include_usage:
                    yield chunk(cid, model_id, created, usage=usage_of(event.reply), object="text_completion")
    finally:
        job.leave()
