"""The OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions (JSON and SSE), /v1/models.

A request is checked completely before it reaches the engine (phase, body size, JSON, types and ranges,
model name, QoS class, context length, then admission: queue limits and shedding, `qos.admit`), so every
refusal is a 4xx/503 in OpenAI's shape and is counted by reason. A deterministic request (temperature 0
or a seed) first asks the response cache: a hit is replayed as a normal JSON answer or SSE stream without
admission (it costs the engine nothing), an identical request already computing is waited for and shared,
and only the first of a kind is computed and stored (`X-FleetLM-Response-Cache: hit|shared|miss`).
A client that goes away (a failed write, or aiohttp cancelling the handler) aborts its engine request at
once, which frees its KV. `n` choices are n engine sequences (`_submit`), merged by index into one JSON
answer (`server/answer.py`) or one SSE stream (`server/sse.py`, OpenAI's framing; it also replays cached
answers); logprobs come in OpenAI's chat or completions shape (`server/logprobs.py`), with the echoed
prompt's too.
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
import typing
import uuid
from typing import Any

from aiohttp import web

from fleetlm_runtime import config as config_mod
from fleetlm_runtime import contract
from fleetlm_runtime.caches import response_store
from fleetlm_runtime.engine import async_engine
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import answer, auth, response_cache, schemas, sse
from fleetlm_runtime.server import state as state_mod
from fleetlm_runtime.server import tools as tools_mod
from fleetlm_runtime.structured import formats

log = logging.getLogger(__name__)

Kind = answer.Kind
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to "up to the context"
TOKENIZE_INLINE_CHARS = 16_384  # above this, tokenizing could stall other streams: use a thread


# Attempts at the response cache before a request computes on its own: a follower whose leader failed
# claims again, and after this many failed leaders it stops waiting on others.
MAX_CACHE_CLAIMS = 3


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
    p = answer.Prepared(
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
    request: web.Request, state: state_mod.ServerState, engine: async_engine.AsyncEngine, p: answer.Prepared, key: str
) -> web.StreamResponse:
    """Answer from the cache, or wait for the identical request computing now, or compute and store."""
    for _ in range(MAX_CACHE_CLAIMS):
        cache = state.response_cache
        if cache is None:  # switched off while this request waited
            break
        claim = cache.claim(key)
        if isinstance(claim, response_store.Hit):
            state.metrics.record_response_cache(hit=True)
            _book_response_cache_hit(state, p, claim.value)
            return await sse.replay(request, state, p, claim.value, contract.RESPONSE_CACHE_HIT)
        if isinstance(claim, response_store.Follower):
            shared = await claim.wait()
            if shared is None:
                continue  # its leader failed or was aborted: claim again (perhaps to lead)
            state.metrics.record_response_cache(hit=True)
            _book_response_cache_hit(state, p, shared)
            return await sse.replay(request, state, p, shared, contract.RESPONSE_CACHE_SHARED)
        state.metrics.record_response_cache(hit=False)
        recorder = response_cache.Recorder()
        try:
            return await _compute(request, state, engine, p, recorder=recorder)
        finally:
            # Whatever happened (done, refused, client gone, cancelled), the followers are released.
            claim.finish(recorder.result(num_prompt_tokens=p.num_prompt_tokens))
    return await _compute(request, state, engine, p)


def _book_response_cache_hit(
    state: state_mod.ServerState, p: answer.Prepared, cached: response_store.CachedResponse
) -> None:
    state.metrics.record_response_cache_hit(
        tenant=p.tenant, qos_class=p.qos_class, num_output_tokens=cached.num_output_tokens
    )


async def _compute(
    request: web.Request,
    state: state_mod.ServerState,
    engine: async_engine.AsyncEngine,
    p: answer.Prepared,
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
    state.mark_waiting(p.req_id, p.qos_class, streams)
    try:
        if p.body.stream:
            return await sse.stream(request, state, p, streams, recorder)
        return await answer.complete(state, p, streams, recorder)
    finally:
        # However the handler ends (done, client gone, cancelled, failed write), the sequences and their KV
        # are released now; a no-op for those that finished.
        for stream in streams:
            stream.abort()


def _submit(
    state: state_mod.ServerState, engine: async_engine.AsyncEngine, p: answer.Prepared
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
    p: answer.Prepared,
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
    if verdict.evict is not None:
        state.evict(verdict.evict)
    if not verdict.admit:
        raise answer.too_many_requests(state, verdict.code or contract.REJECT_QUEUE_FULL, verdict.message)


def _request_id(kind: Kind) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
