"""OpenAI's answers from the engine's outputs: the prepared request, choices, bodies, usage, logprobs.

`complete` gathers a request's sequences into one JSON answer; the pieces here (a choice's text and
logprobs as it arrives, the choice and body shapes, tool-call finishing) are shared with the SSE writer
(`sse.py`), so a streamed answer and a JSON one say the same thing. No admission or caching decisions here:
those are `openai.py`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from fleetlm_runtime import contract
from fleetlm_runtime.engine import async_engine, outputs
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import logprobs as logprobs_mod
from fleetlm_runtime.server import response_cache, schemas
from fleetlm_runtime.server import state as state_mod
from fleetlm_runtime.server import tools as tools_mod

Kind = Literal["completion", "chat"]


@dataclass(frozen=True, slots=True)
class Prepared:
    """A request that passed every check: what is needed to run it or to answer it from the cache."""

    req_id: str
    kind: Kind
    body: schemas.CompletionRequest | schemas.ChatCompletionRequest
    prompt_ids: list[int]
    params: request_mod.SamplingParams
    qos_class: str
    tenant: str = contract.TENANT_OTHER  # auth.Client.tenant: fair sharing and the usage ledger
    tool_plan: tools_mod.ToolPlan | None = None  # chat requests with tools: rendering, grammar, parsing

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def n(self) -> int:
        return self.body.num_choices

    @property
    def structured_kind(self) -> str | None:
        """What constrains its decoding, for the metrics (contract.STRUCTURED_KINDS), or None."""
        constraint = self.params.constraint
        if constraint is None:
            return None
        if self.tool_plan is not None and self.tool_plan.constraint is not None:
            return "tool_call"
        return constraint.kind

    @property
    def parses_tools(self) -> bool:
        return self.tool_plan is not None and self.tool_plan.mode != "none"

    @property
    def echo(self) -> bool:
        return isinstance(self.body, schemas.CompletionRequest) and self.body.echo


def usage_body(num_prompt: int, num_output: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output, "total_tokens": num_prompt + num_output}


def finish_reason_of(out: outputs.RequestOutput) -> str | None:
    return None if out.finish_reason is None else str(out.finish_reason)


def tool_finish(finish_reason: str | None, plan: tools_mod.ToolPlan | None) -> str | None:
    """OpenAI ends an answer that calls tools with `tool_calls` (a cut one keeps `length`), except when the
    request named the function: then the call is the answer asked for, and it ends with `stop`."""
    if plan is not None and plan.mode == "named":
        return finish_reason
    return "tool_calls" if finish_reason == "stop" else finish_reason


def cache_headers(recorder: response_cache.Recorder | None) -> dict[str, str]:
    return {} if recorder is None else {contract.HEADER_RESPONSE_CACHE: contract.RESPONSE_CACHE_MISS}


def make_token_str(state: state_mod.ServerState) -> logprobs_mod.TokenString:
    engine = state.engine
    assert engine is not None
    tokenizer = engine.tokenizer
    cache: dict[int, str] = {}

    def token_str(token_id: int) -> str:
        text = cache.get(token_id)
        if text is None:
            text = cache[token_id] = str(tokenizer.decode([token_id]))
        return text

    return token_str


def no_token_str(token_id: int) -> str:
    raise AssertionError("token strings are only made for requests with logprobs")


def choice_body(p: Prepared, index: int, text: str, finish_reason: str | None, logprobs: Any = None) -> dict[str, Any]:
    if p.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if p.tool_plan is not None and p.parses_tools:
            content, calls = tools_mod.parse(text, p.tool_plan)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish_reason = tool_finish(finish_reason, p.tool_plan)
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(
    state: state_mod.ServerState, p: Prepared, choices: list[dict[str, Any]], num_output_tokens: int
) -> dict[str, Any]:
    return {
        "id": p.req_id,
        "object": "chat.completion" if p.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": choices,
        "usage": usage_body(p.num_prompt_tokens, num_output_tokens),
    }


@dataclass(slots=True)
class ChoiceState:
    """One choice's stream as it arrives (the JSON answer keeps all; SSE keeps what the interval holds)."""

    parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[logprobs_mod.Entry] = field(default_factory=list)
    prompt_logprobs: list[logprobs_mod.Entry | None] | None = None
    last: outputs.RequestOutput | None = None

    def add(self, out: outputs.RequestOutput) -> None:
        self.parts.append(out.text)
        self.token_ids += out.new_token_ids
        if out.logprobs is not None:
            self.logprobs += out.logprobs
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.last = out


def too_many_requests(state: state_mod.ServerState, code: str, message: str) -> schemas.APIError:
    """The 429 of a refusal (at the door, or of a waiting request evicted), with its cause and Retry-After."""
    return schemas.APIError(
        429,
        f"{message}; retry later",
        type="rate_limit_error",
        code=code,
        reason=code,
        headers={"Retry-After": str(state.config.server.retry_after_s)},
    )


def refuse_if_evicted(state: state_mod.ServerState, p: Prepared) -> None:
    """Before a response begins: raise the 429 of `p`'s eviction from the queue, if it was evicted."""
    eviction = state.take_eviction(p.req_id)
    if eviction is not None:
        state.metrics.record_rejection(eviction.code, p.qos_class)
        raise too_many_requests(state, eviction.code, eviction.message)


async def merged(streams: list[async_engine.RequestStream]) -> AsyncIterator[tuple[int, outputs.RequestOutput]]:
    """(choice index, output) from all of a request's sequences, in arrival order."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, outputs.RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: async_engine.RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except BaseException as error:  # handed to the consumer, which raises it
            queue.put_nowait((index, error))
            raise
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def echo_text(state: state_mod.ServerState, p: Prepared) -> str:
    """The prompt as text, for echo (completions only): the prompt string, or its ids decoded."""
    assert isinstance(p.body, schemas.CompletionRequest)
    prompt = p.body.single_prompt()
    if isinstance(prompt, str):
        return prompt
    engine = state.engine
    assert engine is not None
    return engine.decode(prompt, skip_special_tokens=False)


def choice_logprobs(
    p: Prepared,
    c: ChoiceState,
    token_str: logprobs_mod.TokenString,
    builder: logprobs_mod.CompletionLogprobs | None,
    *,
    with_prompt: bool,
) -> Any:
    if p.params.logprobs is None:
        return None
    if p.kind == "chat":
        return logprobs_mod.chat(c.token_ids, c.logprobs, token_str)
    assert builder is not None
    if not with_prompt:
        return builder.piece(c.token_ids, c.logprobs)
    prompt = c.prompt_logprobs or [None] * p.num_prompt_tokens
    return builder.piece(p.prompt_ids + c.token_ids, [*prompt, *c.logprobs])


ENGINE_REFUSED_FORMAT = "response_format: "  # str() of the engine's InvalidParameterError for a refused grammar


async def complete(
    state: state_mod.ServerState,
    p: Prepared,
    streams: list[async_engine.RequestStream],
    recorder: response_cache.Recorder | None,
) -> web.Response:
    choices = [ChoiceState() for _ in streams]
    first = True
    async for index, out in merged(streams):
        if first:
            refuse_if_evicted(state, p)
            state.unmark_waiting(p.req_id, p.qos_class)
            first = False
        choices[index].add(out)
        if recorder is not None:
            recorder.add(out)
    refuse_if_evicted(state, p)  # evicted with no output at all
    for c in choices:
        last = c.last
        if last is None or last.finish_reason is request_mod.FinishReason.ERROR:
            detail = last.error if last is not None and last.error else "the engine ended the request without output"
            if detail.startswith(ENGINE_REFUSED_FORMAT):  # the engine's compile refused the schema: the client's
                raise schemas.invalid("response_format", detail[len(ENGINE_REFUSED_FORMAT) :])
            raise schemas.APIError(500, f"generation failed: {detail}", type="internal_server_error")
    echo = echo_text(state, p) if p.echo else ""
    token_str = make_token_str(state) if p.params.logprobs is not None else no_token_str
    body_choices = []
    for index, c in enumerate(choices):
        assert c.last is not None
        builder = logprobs_mod.CompletionLogprobs(token_str) if p.kind == "completion" else None
        lp = choice_logprobs(p, c, token_str, builder, with_prompt=p.echo)
        body_choices.append(choice_body(p, index, echo + "".join(c.parts), finish_reason_of(c.last), lp))
    num_output = sum(c.last.num_output_tokens for c in choices if c.last is not None)
    body = completion_body(state, p, body_choices, num_output)
    return web.json_response(body, headers=cache_headers(recorder))
