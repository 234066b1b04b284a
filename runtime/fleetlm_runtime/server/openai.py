"""The OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions (JSON and SSE), /v1/models.

A request is checked completely before it reaches the engine (phase, body size, JSON, types and ranges,
model name, QoS class, context length, then admission: queue limits and shedding, `qos.admit`), so every
refusal is a 4xx/503 in OpenAI's shape and is counted by reason. A deterministic request (temperature 0
or a seed) first asks the response cache: a hit is replayed as a normal JSON answer or SSE stream without
admission (it costs the engine nothing), an identical request already computing is waited for and shared,
and only the first of a kind is computed and stored (`X-FleetLM-Response-Cache: hit|shared|miss`).
Streams follow OpenAI's framing: `data: {chunk}\\n\\n` per delta, an optional usage chunk with empty
`choices` (`stream_options.include_usage`), then `data: [DONE]`. A client that goes away
(a failed write, or aiohttp cancelling the handler) aborts its engine request at once, which frees its KV.
`n` choices are n engine sequences (`_submit`), merged into one answer or one SSE stream by index;
logprobs come in OpenAI's chat or completions shape (`server/logprobs.py`), with the echoed prompt's too.
`response_format` becomes a grammar constraint carried by `SamplingParams` (`structured/formats.py`; the
engine compiles and enforces it), and `tools`/`tool_choice` are rendered, enforced and parsed back into
`tool_calls`, whole or as stream deltas, by `server/tools.py`.
This module must never block the event loop on model work: long prompts are tokenized in a thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import typing
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from fleetlm_runtime import config as config_mod
from fleetlm_runtime import contract
from fleetlm_runtime.caches import responses
from fleetlm_runtime.engine import async_engine, outputs
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import auth, response_cache, schemas
from fleetlm_runtime.server import logprobs as logprobs_mod
from fleetlm_runtime.server import state as state_mod
from fleetlm_runtime.server import tools as tools_mod
from fleetlm_runtime.structured import formats

log = logging.getLogger(__name__)

Kind = Literal["completion", "chat"]
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to "up to the context"
TOKENIZE_INLINE_CHARS = 16_384  # above this, tokenizing could stall other streams: use a thread
SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies (nginx) must not buffer a token stream
}
_DONE = b"data: [DONE]\n\n"


# Attempts at the response cache before a request computes on its own: a follower whose leader failed
# claims again, and after this many failed leaders it stops waiting on others.
MAX_CACHE_CLAIMS = 3


@dataclass(frozen=True, slots=True)
class _Prepared:
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


async def completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _serve(request, "chat")


async def list_models(request: web.Request) -> web.Response:
    """The served model, once it can serve: while loading (or draining, or failed) a 503 with Retry-After
    like the other API routes, so a client that probes /v1/models before sending work is not misled. Not
    counted as a refusal: a probe is not work."""
    state = request.app[state_mod.state_key]
    state.require_engine()
    card: dict[str, Any] = {
        "id": state.model_name,
        "object": "model",
        "created": state.started_at,
        "owned_by": "fleetlm",
        "root": state.config.model.source,
    }
    if state.engine is not None:
        card["max_model_len"] = state_mod.max_model_len(state.engine)
    return web.json_response({"object": "list", "data": [card]})


# ------------------------------------------------------------------------------------------------
# Admission


async def _serve(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[state_mod.state_key]
    try:
        # The body is judged before the phase: a malformed request is the client's 400 whether or not the
        # model has loaded (a 503 would tell it to retry the same mistake).
        data = schemas.parse_json(await _read_body(request))
        body: schemas.CompletionRequest | schemas.ChatCompletionRequest
        if kind == "chat":
            body = schemas.validate(schemas.ChatCompletionRequest, data)
        else:
            body = schemas.validate(schemas.CompletionRequest, data)
        body.refuse_unsupported()
    except schemas.APIError as error:
        state.metrics.record_rejection(error.reason, state.config.qos.default_class)
        raise
    if isinstance(body, schemas.CompletionRequest) and len(prompts := body.prompts()) > 1:
        return await _serve_batch(request, body, prompts)
    return await _serve_one(request, kind, body)


async def _serve_batch(
    request: web.Request, body: schemas.CompletionRequest, prompts: list[str | list[int]]
) -> web.StreamResponse:
    """OpenAI's batch form of completions (a list of prompts, as evaluation harnesses send): each prompt is
    its own request to the engine, all at once, each admitted, cached and booked like a single one; the
    answer holds prompt i's choice j at index i * n + j and the summed usage. The first refusal or error
    cancels the others (their sequences and KV are released) and is the answer."""
    if body.stream:
        state = request.app[state_mod.state_key]
        state.metrics.record_rejection(contract.REJECT_INVALID, state.config.qos.default_class)
        raise schemas.invalid("stream", "streaming is supported with one prompt per request; send a list of "
                                        "prompts without stream, or one streamed request per prompt")  # fmt: skip
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_serve_batch_element(request, body.model_copy(update={"prompt": prompt}), i))
                for i, prompt in enumerate(prompts)
            ]
    except ExceptionGroup as errors:
        first = errors.exceptions[0]
        raise first.with_traceback(None) from None
    answers = [json.loads(typing.cast(web.Response, task.result()).text or "{}") for task in tasks]
    n = body.n or 1
    choices = [
        {**choice, "index": i * n + int(choice.get("index", 0))}
        for i, answer in enumerate(answers)
        for choice in answer["choices"]
    ]
    usage = {key: sum(int(answer["usage"][key]) for answer in answers) for key in answers[0]["usage"]}
    return web.json_response({**answers[0], "id": _request_id("completion"), "choices": choices, "usage": usage})


async def _serve_batch_element(request: web.Request, body: schemas.CompletionRequest, index: int) -> web.StreamResponse:
    """One prompt of the batch form; an error about the prompt names which one (`prompt[3]`), so a client
    that sent 64 knows which to fix."""
    try:
        return await _serve_one(request, "completion", body)
    except schemas.APIError as error:
        if error.param == "prompt":
            error.param = f"prompt[{index}]"
            error.message = f"prompt[{index}]: {error.message}"
            error.args = (error.message,)
        raise


async def _serve_one(
    request: web.Request, kind: Kind, body: schemas.CompletionRequest | schemas.ChatCompletionRequest
) -> web.StreamResponse:
    state = request.app[state_mod.state_key]
    qos_class = state.config.qos.default_class
    try:
        tool_plan = _tool_plan(body)
        _check_model(body.model, state)
        client = auth.resolve_client(request, body_class=body.qos_class, qos=state.config.qos, api_keys=state.api_keys)
        qos_class = client.qos_class
        engine = state.require_engine()
        prompt_ids = await _tokenize(engine, body, tool_plan)
        params = _sampling_params(body, tool_plan)
        _check_context(kind, len(prompt_ids), params.max_tokens, state_mod.max_model_len(engine))
    except schemas.APIError as error:
        state.metrics.record_rejection(error.reason, qos_class)
        raise
    p = _Prepared(
        req_id=_request_id(kind),
        kind=kind,
        body=body,
        prompt_ids=prompt_ids,
        params=params,
        qos_class=qos_class,
        tenant=client.tenant,
        tool_plan=tool_plan,
    )
    key = response_cache.key_for(
        state, prompt_ids=prompt_ids, params=params, salt=client.key_id, n=p.n, echo=p.echo, extra=_cache_extra(body)
    )
    state.request_started(p.req_id)
    try:
        if key is None:
            return await _compute(request, state, engine, p)
        return await _serve_cacheable(request, state, engine, p, key)
    finally:
        state.request_finished(p.req_id, qos_class)


async def _serve_cacheable(
    request: web.Request, state: state_mod.ServerState, engine: async_engine.AsyncEngine, p: _Prepared, key: str
) -> web.StreamResponse:
    """Answer from the cache, or wait for the identical request computing now, or compute and store."""
    for _ in range(MAX_CACHE_CLAIMS):
        cache = state.response_cache
        if cache is None:  # switched off while this request waited
            break
        claim = cache.claim(key)
        if isinstance(claim, responses.Hit):
            state.metrics.record_response_cache(hit=True)
            _book_response_cache_hit(state, p, claim.value)
            return await _replay(request, state, p, claim.value, contract.RESPONSE_CACHE_HIT)
        if isinstance(claim, responses.Follower):
            shared = await claim.wait()
            if shared is None:
                continue  # its leader failed or was aborted: claim again (perhaps to lead)
            state.metrics.record_response_cache(hit=True)
            _book_response_cache_hit(state, p, shared)
            return await _replay(request, state, p, shared, contract.RESPONSE_CACHE_SHARED)
        state.metrics.record_response_cache(hit=False)
        recorder = response_cache.Recorder()
        try:
            return await _compute(request, state, engine, p, recorder=recorder)
        finally:
            # Whatever happened (done, refused, client gone, cancelled), the followers are released.
            claim.finish(recorder.result(num_prompt_tokens=p.num_prompt_tokens))
    return await _compute(request, state, engine, p)


def _book_response_cache_hit(state: state_mod.ServerState, p: _Prepared, cached: responses.CachedResponse) -> None:
    state.metrics.record_response_cache_hit(
        tenant=p.tenant, qos_class=p.qos_class, num_output_tokens=cached.num_output_tokens
    )


async def _compute(
    request: web.Request,
    state: state_mod.ServerState,
    engine: async_engine.AsyncEngine,
    p: _Prepared,
    *,
    recorder: response_cache.Recorder | None = None,
) -> web.StreamResponse:
    """Admit the request to the engine and answer with what it generates."""
    try:
        _admit(state, p.qos_class)
        streams = _submit(state, engine, p)
    except schemas.APIError as error:
        state.metrics.record_rejection(error.reason, p.qos_class)
        raise
    if p.structured_kind is not None:
        state.metrics.record_structured(p.structured_kind)
    state.mark_waiting(p.req_id, p.qos_class)
    try:
        if p.body.stream:
            return await _stream(request, state, p, streams, recorder)
        return await _complete(state, p, streams, recorder)
    finally:
        # However the handler ends (done, client gone, cancelled, failed write), the sequences and their KV
        # are released now; a no-op for those that finished.
        for stream in streams:
            stream.abort()


def _submit(
    state: state_mod.ServerState, engine: async_engine.AsyncEngine, p: _Prepared
) -> list[async_engine.RequestStream]:
    """One engine sequence per choice. With n > 1 they are `{id}-{i}` and, given a seed, choice i samples
    with seed + i (mod 2**63), so the whole answer is reproducible and the choices differ. They share the
    prompt's KV through the prefix cache: its full blocks are computed once (the scheduler indexes them at
    admission, so siblings admitted in the same step already hit them); only the last partial block is
    computed per sequence."""
    qos_class = state.config.qos.by_name()[p.qos_class]
    streams: list[async_engine.RequestStream] = []
    try:
        for i in range(p.n):
            params, req_id = p.params, p.req_id
            if p.n > 1:
                req_id = f"{p.req_id}-{i}"
                if params.seed is not None:
                    params = dataclasses.replace(params, seed=(params.seed + i) % 2**63)
            streams.append(_submit_one(state, engine=engine, p=p, params=params, req_id=req_id, qos_class=qos_class))
        return streams
    except BaseException:
        for stream in streams:
            stream.abort()
        raise


def _submit_one(
    state: state_mod.ServerState,
    *,
    engine: async_engine.AsyncEngine,
    p: _Prepared,
    params: request_mod.SamplingParams,
    req_id: str,
    qos_class: config_mod.QoSClass,
) -> async_engine.RequestStream:
    try:
        return engine.submit(
            p.prompt_ids,
            params,
            req_id=req_id,
            qos_class=p.qos_class,
            priority=qos_class.priority,
            weight=qos_class.weight,
            tenant=p.tenant,
        )
    except request_mod.InvalidParameterError as error:
        reason = contract.REJECT_TOO_LONG if error.param in ("prompt", "max_tokens") else contract.REJECT_INVALID
        raise schemas.invalid(error.param, error.message, reason=reason) from None
    except (async_engine.EngineDrainingError, async_engine.EngineDeadError) as error:
        draining = isinstance(error, async_engine.EngineDrainingError)
        raise schemas.APIError(
            503,
            str(error),
            type="service_unavailable",
            reason=contract.REJECT_DRAINING if draining else contract.REJECT_LOADING,
            headers={"Retry-After": str(state.config.server.retry_after_s)},
        ) from None


async def _read_body(request: web.Request) -> bytes:
    limit = request.app[state_mod.state_key].config.server.max_request_body_bytes
    too_large = schemas.APIError(
        413,
        f"the request body exceeds the limit of {limit} bytes",
        code="request_too_large",
        reason=contract.REJECT_TOO_LARGE,
    )
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise too_large from None


def _check_model(model: str | None, state: state_mod.ServerState) -> None:
    # OpenAI requires `model`; like vLLM we accept the served name (or none) and refuse other names.
    if model is not None and model != state.model_name:
        raise schemas.APIError(
            404,
            f"the model {model[:200]!r} does not exist; this server serves {state.model_name!r}",
            code="model_not_found",
            param="model",
        )


def _tool_plan(body: schemas.CompletionRequest | schemas.ChatCompletionRequest) -> tools_mod.ToolPlan | None:
    if not isinstance(body, schemas.ChatCompletionRequest):
        return None
    try:
        tool_plan = tools_mod.plan(body.tools, body.tool_choice, parallel_tool_calls=body.parallel_tool_calls)
    except request_mod.InvalidParameterError as error:
        raise schemas.invalid(error.param, error.message) from None
    structured = body.response_format is not None and body.response_format.get("type") not in (None, "text")
    if tool_plan is not None and tool_plan.constraint is not None and structured:
        raise schemas.invalid(
            "response_format", "response_format cannot be combined with tool_choice 'required' or a named tool"
        )
    return tool_plan


def _cache_extra(body: schemas.CompletionRequest | schemas.ChatCompletionRequest) -> dict[str, Any]:
    """Request fields that shape the answer beyond the prompt and SamplingParams: how it is parsed."""
    if not isinstance(body, schemas.ChatCompletionRequest) or not body.tools:
        return {}
    return {"tools": body.tools, "tool_choice": body.tool_choice, "parallel_tool_calls": body.parallel_tool_calls}


async def _tokenize(
    engine: async_engine.AsyncEngine,
    body: schemas.CompletionRequest | schemas.ChatCompletionRequest,
    tool_plan: tools_mod.ToolPlan | None = None,
) -> list[int]:
    if isinstance(body, schemas.ChatCompletionRequest):
        try:
            messages = [tools_mod.template_message(i, m) for i, m in enumerate(body.messages)]
        except request_mod.InvalidParameterError as error:
            raise schemas.invalid(error.param, error.message) from None
        size = sum(len(m["content"]) for m in messages)
        add_generation_prompt = body.add_generation_prompt
        render_tools = tool_plan.render_tools if tool_plan is not None else None
        uses_tools = render_tools is not None or any(m["role"] == "tool" or "tool_calls" in m for m in messages)
        tokenizer = engine.tokenizer
        if render_tools is not None and not tools_mod.template_supports_tools(tokenizer.chat_template):
            raise schemas.invalid("tools", "this model's chat template does not support tools")

        def encode() -> list[int]:
            if not uses_tools:
                return engine.encode_chat(messages, add_generation_prompt=add_generation_prompt)
            # The checkpoint's own template renders the tools, the assistant's calls and the tool results.
            text = tokenizer.apply_chat_template(
                messages,
                # transformers types `tools` as an invariant list[dict | Callable], which a list of dicts is not
                tools=render_tools,  # type: ignore[arg-type]
                add_generation_prompt=add_generation_prompt,
                tokenize=False,
            )
            return engine.encode(str(text), add_special_tokens=False)

        try:
            ids = await _maybe_in_thread(size, encode)
        except Exception as error:  # jinja raises for conversations a template refuses (e.g. roles)
            raise schemas.invalid("messages", f"the chat template rejected these messages: {error}") from None
        return list(ids)
    prompt = body.single_prompt()
    if isinstance(prompt, list):
        return prompt
    if not prompt:
        raise schemas.invalid("prompt", "the prompt must not be empty")
    try:
        return list(await _maybe_in_thread(len(prompt), lambda: engine.encode(prompt)))
    except Exception as error:  # e.g. lone surrogates, which JSON allows and UTF-8 tokenizers cannot take
        raise schemas.invalid("prompt", f"the prompt cannot be tokenized: {type(error).__name__}") from None


async def _maybe_in_thread(size: int, fn: Any) -> Any:
    if size > TOKENIZE_INLINE_CHARS:
        return await asyncio.to_thread(fn)
    return fn()


def _sampling_params(
    body: schemas.CompletionRequest | schemas.ChatCompletionRequest, tool_plan: tools_mod.ToolPlan | None = None
) -> request_mod.SamplingParams:
    prompt_logprobs: int | None = None
    try:
        constraint = formats.from_response_format(body.response_format)
    except request_mod.InvalidParameterError as error:
        raise schemas.invalid(error.param, error.message) from None
    if isinstance(body, schemas.ChatCompletionRequest):
        max_tokens = body.effective_max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        if tool_plan is not None and tool_plan.constraint is not None:
            constraint = tool_plan.constraint  # `required` or a named function: decoded under its grammar
    else:
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
        logprobs = body.logprobs
        if body.echo and logprobs is not None:
            prompt_logprobs = logprobs  # echo returns the prompt's logprobs too
    try:
        return request_mod.SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k is None else body.top_k,
            seed=body.seed,
            stop=body.stop_list,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            include_stop_str_in_output=body.include_stop_str_in_output,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=body.logit_bias_pairs(),
            constraint=constraint,
        )
    except request_mod.InvalidParameterError as error:
        raise schemas.invalid(error.param, error.message) from None


def _check_context(kind: Kind, num_prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    param = "messages" if kind == "chat" else "prompt"
    if num_prompt_tokens == 0:
        raise schemas.invalid(param, "the prompt must contain at least one token")
    if num_prompt_tokens >= max_model_len:
        raise schemas.invalid(
            param,
            f"the prompt has {num_prompt_tokens} tokens, but this model's context is {max_model_len} tokens "
            "and at least one must remain for output",
            reason=contract.REJECT_TOO_LONG,
        )
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_model_len:
        raise schemas.invalid(
            "max_tokens",
            f"max_tokens={max_tokens} plus the prompt's {num_prompt_tokens} tokens exceeds the model's context "
            f"of {max_model_len} tokens; request at most {max_model_len - num_prompt_tokens} tokens",
            reason=contract.REJECT_TOO_LONG,
        )


def _admit(state: state_mod.ServerState, qos_class: str) -> None:
    verdict = state.admit(qos_class)
    if not verdict.admit:
        raise schemas.APIError(
            429,
            f"{verdict.message}; retry later",
            type="rate_limit_error",
            code=verdict.code,
            reason=verdict.code or contract.REJECT_QUEUE_FULL,
            headers={"Retry-After": str(state.config.server.retry_after_s)},
        )


def _request_id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


# ------------------------------------------------------------------------------------------------
# Running it


def _usage(num_prompt: int, num_output: int) -> dict[str, int]:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_output, "total_tokens": num_prompt + num_output}


def _finish_reason(out: outputs.RequestOutput) -> str | None:
    return None if out.finish_reason is None else str(out.finish_reason)


def _tool_finish(finish_reason: str | None, plan: tools_mod.ToolPlan | None) -> str | None:
    """OpenAI ends an answer that calls tools with `tool_calls` (a cut one keeps `length`), except when the
    request named the function: then the call is the answer asked for, and it ends with `stop`."""
    if plan is not None and plan.mode == "named":
        return finish_reason
    return "tool_calls" if finish_reason == "stop" else finish_reason


def _cache_headers(recorder: response_cache.Recorder | None) -> dict[str, str]:
    return {} if recorder is None else {contract.HEADER_RESPONSE_CACHE: contract.RESPONSE_CACHE_MISS}


def _token_str(state: state_mod.ServerState) -> logprobs_mod.TokenString:
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


def _choice(p: _Prepared, index: int, text: str, finish_reason: str | None, logprobs: Any = None) -> dict[str, Any]:
    if p.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if p.tool_plan is not None and p.parses_tools:
            content, calls = tools_mod.parse(text, p.tool_plan)
            if calls:
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish_reason = _tool_finish(finish_reason, p.tool_plan)
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def _completion_body(
    state: state_mod.ServerState, p: _Prepared, choices: list[dict[str, Any]], num_output_tokens: int
) -> dict[str, Any]:
    return {
        "id": p.req_id,
        "object": "chat.completion" if p.kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": choices,
        "usage": _usage(p.num_prompt_tokens, num_output_tokens),
    }


@dataclass(slots=True)
class _ChoiceState:
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


async def _merged(streams: list[async_engine.RequestStream]) -> AsyncIterator[tuple[int, outputs.RequestOutput]]:
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


def _echo_text(state: state_mod.ServerState, p: _Prepared) -> str:
    """The prompt as text, for echo (completions only): the prompt string, or its ids decoded."""
    assert isinstance(p.body, schemas.CompletionRequest)
    prompt = p.body.single_prompt()
    if isinstance(prompt, str):
        return prompt
    engine = state.engine
    assert engine is not None
    return engine.decode(prompt, skip_special_tokens=False)


def _choice_logprobs(
    p: _Prepared,
    c: _ChoiceState,
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


async def _complete(
    state: state_mod.ServerState,
    p: _Prepared,
    streams: list[async_engine.RequestStream],
    recorder: response_cache.Recorder | None,
) -> web.Response:
    choices = [_ChoiceState() for _ in streams]
    first = True
    async for index, out in _merged(streams):
        if first:
            state.unmark_waiting(p.req_id, p.qos_class)
            first = False
        choices[index].add(out)
        if recorder is not None:
            recorder.add(out)
    for c in choices:
        last = c.last
        if last is None or last.finish_reason is request_mod.FinishReason.ERROR:
            detail = last.error if last is not None and last.error else "the engine ended the request without output"
            if detail.startswith(_ENGINE_REFUSED_FORMAT):  # the engine's compile refused the schema: the client's
                raise schemas.invalid("response_format", detail[len(_ENGINE_REFUSED_FORMAT) :])
            raise schemas.APIError(500, f"generation failed: {detail}", type="internal_server_error")
    echo = _echo_text(state, p) if p.echo else ""
    token_str = _token_str(state) if p.params.logprobs is not None else _no_token_str
    body_choices = []
    for index, c in enumerate(choices):
        assert c.last is not None
        builder = logprobs_mod.CompletionLogprobs(token_str) if p.kind == "completion" else None
        lp = _choice_logprobs(p, c, token_str, builder, with_prompt=p.echo)
        body_choices.append(_choice(p, index, echo + "".join(c.parts), _finish_reason(c.last), lp))
    num_output = sum(c.last.num_output_tokens for c in choices if c.last is not None)
    body = _completion_body(state, p, body_choices, num_output)
    return web.json_response(body, headers=_cache_headers(recorder))


_ENGINE_REFUSED_FORMAT = "response_format: "  # str() of the engine's InvalidParameterError for a refused grammar


def _no_token_str(token_id: int) -> str:
    raise AssertionError("token strings are only made for requests with logprobs")


class _ChunkWriter:
    """Pre-rendered JSON around the only varying parts (index, text, logprobs, finish reason): a chunk
    costs one `json.dumps` of its text, which keeps the server's per-token cost small next to the engine's."""

    def __init__(self, p: _Prepared, model_name: str) -> None:
        created = int(time.time())
        model = json.dumps(model_name)
        self._object = "chat.completion.chunk" if p.kind == "chat" else "text_completion"
        self._head = (
            f'{{"id":"{p.req_id}","object":"{self._object}","created":{created},"model":{model},"choices":[{{"index":'
        )
        self._usage_tail = ',"usage":null' if p.body.include_usage else ""
        self._chat = p.kind == "chat"
        self._p = p
        self._model_name = model_name
        self._created = created

    def _render(self, index: int, middle: str, finish_reason: str | None, logprobs: Any) -> bytes:
        reason = "null" if finish_reason is None else json.dumps(finish_reason)
        lp = "null" if logprobs is None else json.dumps(logprobs, ensure_ascii=False, separators=(",", ":"))
        return (
            f'data: {self._head}{index},{middle}"logprobs":{lp},"finish_reason":{reason}}}]{self._usage_tail}}}\n\n'
        ).encode()

    def role(self, index: int = 0) -> bytes:
        if not self._chat:
            return b""
        return self._render(index, '"delta":{"role":"assistant","content":""},', None, None)

    def delta(self, text: str, finish_reason: str | None, index: int = 0, logprobs: Any = None) -> bytes:
        if not text and logprobs is None:
            # OpenAI's closing chat chunk has an empty delta.
            return self._render(index, '"delta":{},' if self._chat else '"text":"",', finish_reason, None)
        body = json.dumps(text, ensure_ascii=False)
        middle = f'"delta":{{"content":{body}}},' if self._chat else f'"text":{body},'
        return self._render(index, middle, finish_reason, logprobs)

    def tool_delta(
        self, delta: tools_mod.Delta, finish_reason: str | None, index: int = 0, logprobs: Any = None
    ) -> bytes:
        """A chat chunk with content and/or tool-call deltas (what `tools.StreamParser` made of a piece)."""
        body: dict[str, Any] = {}
        if delta.content:
            body["content"] = delta.content
        if delta.tool_calls:
            body["tool_calls"] = delta.tool_calls
        middle = f'"delta":{json.dumps(body, ensure_ascii=False, separators=(",", ":"))},'
        return self._render(index, middle, finish_reason, logprobs)

    def usage(self, num_prompt: int, num_output: int) -> bytes:
        chunk = {
            "id": self._p.req_id,
            "object": self._object,
            "created": self._created,
            "model": self._model_name,
            "choices": [],
            "usage": _usage(num_prompt, num_output),
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    @staticmethod
    def error(message: str) -> bytes:
        body = {"error": {"message": message, "type": "internal_server_error", "code": None, "param": None}}
        return b"data: " + json.dumps(body).encode() + b"\n\n"


async def _stream(
    request: web.Request,
    state: state_mod.ServerState,
    p: _Prepared,
    streams: list[async_engine.RequestStream],
    recorder: response_cache.Recorder | None,
) -> web.StreamResponse:
    writer = _ChunkWriter(p, state.model_name)
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **_cache_headers(recorder)})
    n = len(streams)
    want_logprobs = p.params.logprobs is not None
    token_str = _token_str(state) if want_logprobs else _no_token_str
    builders = [logprobs_mod.CompletionLogprobs(token_str) if p.kind == "completion" else None for _ in streams]
    # What the stream interval keeps back per choice (nothing when it is 1): a _ChoiceState per choice,
    # emptied at each chunk.
    held = [_ChoiceState() for _ in streams]
    parsers = [tools_mod.StreamParser(p.tool_plan) for _ in streams] if p.parses_tools and p.tool_plan else None
    started = [False] * n
    finished = [False] * n
    num_output = [0] * n
    echo = _echo_text(state, p) if p.echo else ""
    try:
        await resp.prepare(request)
        interval = state.config.server.stream_interval_tokens
        failed = False
        async for index, out in _merged(streams):
            first = not started[index]
            if first:
                if not any(started):
                    state.unmark_waiting(p.req_id, p.qos_class)
                started[index] = True
                if role := writer.role(index):
                    await resp.write(role)
            if recorder is not None:
                recorder.add(out)
            if out.finish_reason is request_mod.FinishReason.ERROR:
                await resp.write(writer.error(f"generation failed: {out.error or 'engine error'}"))
                failed = True
                break
            num_output[index] = out.num_output_tokens
            h = held[index]
            h.add(out)
            reason = _finish_reason(out)
            if reason is not None:
                finished[index] = True
            if reason is None and not first and len(h.token_ids) < interval:
                continue
            text = "".join(h.parts)
            if first and echo:
                text = echo + text
            lp = None
            if want_logprobs:
                lp = _choice_logprobs(p, h, token_str, builders[index], with_prompt=first and p.echo)
            if parsers is not None:
                delta = parsers[index].feed(text, final=reason is not None)
                if reason is not None and parsers[index].num_calls:
                    reason = _tool_finish(reason, p.tool_plan)
                if delta.content or delta.tool_calls or reason is not None or (lp is not None and h.token_ids):
                    await resp.write(writer.tool_delta(delta, reason, index, lp))
            # Empty deltas (text held back at a possible stop string) are not sent, so every chunk a
            # client times is a real one, except the closing chunk that carries the finish reason.
            elif text or reason is not None or (lp is not None and h.token_ids):
                await resp.write(writer.delta(text, reason, index, lp))
            held[index] = _ChoiceState()
        if not failed:
            if not all(started):
                await resp.write(writer.error("the engine ended the request without output"))
            elif p.body.include_usage:
                await resp.write(writer.usage(p.num_prompt_tokens, sum(num_output)))
        await resp.write(_DONE)
        await resp.write_eof()
    except ConnectionResetError:
        # The client went away mid-stream; the handler's `finally` aborts the request.
        log.debug("client disconnected from %s", p.req_id)
    return resp


async def _replay(
    request: web.Request, state: state_mod.ServerState, p: _Prepared, cached: responses.CachedResponse, how: str
) -> web.StreamResponse:
    """A cached response as this request's answer: its own id and time, the stored text and counts, the
    same shapes as a computed one (JSON, or SSE chunks with the finish reason last, usage and [DONE]).
    Only single-choice answers without logprobs or echo are cached (`response_cache.key_for`)."""
    headers = {contract.HEADER_RESPONSE_CACHE: how}
    if not p.body.stream:
        choice = _choice(p, 0, cached.text, cached.finish_reason)
        body = _completion_body(state, p, [choice], cached.num_output_tokens)
        return web.json_response(body, headers=headers)
    writer = _ChunkWriter(p, state.model_name)
    pieces = cached.pieces or ("",)
    chunks = [writer.role()]
    if p.parses_tools and p.tool_plan is not None:  # the same parse as when it was computed
        parser = tools_mod.StreamParser(p.tool_plan)
        for i, piece in enumerate(pieces):
            final = i == len(pieces) - 1
            delta = parser.feed(piece, final=final)
            reason = (
                (_tool_finish(cached.finish_reason, p.tool_plan) if parser.num_calls else cached.finish_reason)
                if final
                else None
            )
            if delta.content or delta.tool_calls or final:
                chunks.append(writer.tool_delta(delta, reason))
    else:
        chunks += [writer.delta(piece, None) for piece in pieces[:-1]]
        chunks.append(writer.delta(pieces[-1], cached.finish_reason))
    if p.body.include_usage:
        chunks.append(writer.usage(p.num_prompt_tokens, cached.num_output_tokens))
    chunks.append(_DONE)
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    try:
        await resp.prepare(request)
        await resp.write(b"".join(chunks))
        await resp.write_eof()
    except ConnectionResetError:
        log.debug("client disconnected from %s", p.req_id)
    return resp
