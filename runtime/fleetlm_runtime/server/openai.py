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
This module must never block the event loop on model work: long prompts are tokenized in a thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from aiohttp import web

from fleetlm_runtime import contract
from fleetlm_runtime.caches import responses
from fleetlm_runtime.engine import async_engine, outputs
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import auth, response_cache, schemas
from fleetlm_runtime.server import state as state_mod

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

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)


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
    qos_class = state.config.qos.default_class
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
        _check_model(body.model, state)
        client = auth.resolve_client(request, body_class=body.qos_class, qos=state.config.qos, api_keys=state.api_keys)
        qos_class = client.qos_class
        engine = state.require_engine()
        prompt_ids = await _tokenize(engine, body)
        params = _sampling_params(body)
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
    )
    key = response_cache.key_for(state, prompt_ids=prompt_ids, params=params, salt=client.key_id)
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
        stream = _submit(state, engine, p)
    except schemas.APIError as error:
        state.metrics.record_rejection(error.reason, p.qos_class)
        raise
    state.mark_waiting(p.req_id, p.qos_class)
    try:
        if p.body.stream:
            return await _stream(request, state, p, stream, recorder)
        return await _complete(state, p, stream, recorder)
    finally:
        # However the handler ends (done, client gone, cancelled, failed write), the sequence and its KV
        # are released now; a no-op for a request that finished.
        stream.abort()


def _submit(state: state_mod.ServerState, engine: async_engine.AsyncEngine, p: _Prepared) -> async_engine.RequestStream:
    qos_class = state.config.qos.by_name()[p.qos_class]
    try:
        return engine.submit(
            p.prompt_ids,
            p.params,
            req_id=p.req_id,
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


async def _tokenize(
    engine: async_engine.AsyncEngine, body: schemas.CompletionRequest | schemas.ChatCompletionRequest
) -> list[int]:
    if isinstance(body, schemas.ChatCompletionRequest):
        messages: list[dict[str, Any]] = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages
        ]
        size = sum(len(m["content"]) for m in messages)
        add_generation_prompt = body.add_generation_prompt
        try:
            ids = await _maybe_in_thread(
                size, lambda: engine.encode_chat(messages, add_generation_prompt=add_generation_prompt)
            )
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


def _sampling_params(body: schemas.CompletionRequest | schemas.ChatCompletionRequest) -> request_mod.SamplingParams:
    if isinstance(body, schemas.ChatCompletionRequest):
        max_tokens = body.effective_max_tokens
    else:
        max_tokens = body.max_tokens if body.max_tokens is not None else DEFAULT_COMPLETION_MAX_TOKENS
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


def _cache_headers(recorder: response_cache.Recorder | None) -> dict[str, str]:
    return {} if recorder is None else {contract.HEADER_RESPONSE_CACHE: contract.RESPONSE_CACHE_MISS}


def _completion_body(
    state: state_mod.ServerState, p: _Prepared, text: str, finish_reason: str | None, num_output_tokens: int
) -> dict[str, Any]:
    choice: dict[str, Any]
    if p.kind == "chat":
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {
        "id": p.req_id,
        "object": obj,
        "created": int(time.time()),
        "model": state.model_name,
        "choices": [choice],
        "usage": _usage(p.num_prompt_tokens, num_output_tokens),
    }


async def _complete(
    state: state_mod.ServerState,
    p: _Prepared,
    stream: async_engine.RequestStream,
    recorder: response_cache.Recorder | None,
) -> web.Response:
    parts: list[str] = []
    last: outputs.RequestOutput | None = None
    async for out in stream:
        if last is None:
            state.unmark_waiting(p.req_id, p.qos_class)
        parts.append(out.text)
        if recorder is not None:
            recorder.add(out)
        last = out
    if last is None or last.finish_reason is request_mod.FinishReason.ERROR:
        detail = last.error if last is not None and last.error else "the engine ended the request without output"
        raise schemas.APIError(500, f"generation failed: {detail}", type="internal_server_error")
    body = _completion_body(state, p, "".join(parts), _finish_reason(last), last.num_output_tokens)
    return web.json_response(body, headers=_cache_headers(recorder))


class _ChunkWriter:
    """Pre-rendered JSON around the only varying parts (text, finish reason): a chunk costs one
    `json.dumps` of its text, which keeps the server's per-token cost small next to the engine's."""

    def __init__(self, p: _Prepared, model_name: str) -> None:
        created = int(time.time())
        model = json.dumps(model_name)
        head = f'{{"id":"{p.req_id}","object":"%s","created":{created},"model":{model},"choices":[{{"index":0,'
        self._usage_tail = ',"usage":null' if p.body.include_usage else ""
        if p.kind == "chat":
            self._head = head % "chat.completion.chunk" + '"delta":{"content":'
            self._mid = "},"
            self._role_chunk = self._render(
                head % "chat.completion.chunk" + '"delta":{"role":"assistant","content":""},', None
            )
            # OpenAI's closing chat chunk has an empty delta.
            self._empty_head = head % "chat.completion.chunk" + '"delta":{},'
        else:
            self._head = head % "text_completion" + '"text":'
            self._mid = ","
            self._role_chunk = b""
            self._empty_head = head % "text_completion" + '"text":"",'
        self._object = "chat.completion.chunk" if p.kind == "chat" else "text_completion"
        self._p = p
        self._model_name = model_name
        self._created = created

    def _render(self, prefix: str, finish_reason: str | None) -> bytes:
        reason = "null" if finish_reason is None else json.dumps(finish_reason)
        return f'data: {prefix}"logprobs":null,"finish_reason":{reason}}}]{self._usage_tail}}}\n\n'.encode()

    def role(self) -> bytes:
        return self._role_chunk

    def delta(self, text: str, finish_reason: str | None) -> bytes:
        if not text:
            return self._render(self._empty_head, finish_reason)
        return self._render(f"{self._head}{json.dumps(text, ensure_ascii=False)}{self._mid}", finish_reason)

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
    stream: async_engine.RequestStream,
    recorder: response_cache.Recorder | None,
) -> web.StreamResponse:
    writer = _ChunkWriter(p, state.model_name)
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **_cache_headers(recorder)})
    try:
        await resp.prepare(request)
        last: outputs.RequestOutput | None = None
        interval = state.config.server.stream_interval_tokens
        held_text, held_tokens = "", 0  # what the stream interval keeps back (nothing when it is 1)
        async for out in stream:
            first = last is None
            if first:
                state.unmark_waiting(p.req_id, p.qos_class)
                if role := writer.role():
                    await resp.write(role)
            last = out
            if recorder is not None:
                recorder.add(out)
            if out.finish_reason is request_mod.FinishReason.ERROR:
                await resp.write(writer.error(f"generation failed: {out.error or 'engine error'}"))
                break
            reason = _finish_reason(out)
            held_text += out.text
            held_tokens += len(out.new_token_ids)
            if reason is None and not first and held_tokens < interval:
                continue
            # Empty deltas (text held back at a possible stop string) are not sent, so every chunk a
            # client times is a real one, except the closing chunk that carries the finish reason.
            if held_text or reason is not None:
                await resp.write(writer.delta(held_text, reason))
            held_text, held_tokens = "", 0
        if last is None:
            await resp.write(writer.error("the engine ended the request without output"))
        elif p.body.include_usage:
            await resp.write(writer.usage(p.num_prompt_tokens, last.num_output_tokens))
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
    same shapes as a computed one (JSON, or SSE chunks with the finish reason last, usage and [DONE])."""
    headers = {contract.HEADER_RESPONSE_CACHE: how}
    if not p.body.stream:
        body = _completion_body(state, p, cached.text, cached.finish_reason, cached.num_output_tokens)
        return web.json_response(body, headers=headers)
    writer = _ChunkWriter(p, state.model_name)
    pieces = cached.pieces or ("",)
    chunks = [writer.role()]
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
