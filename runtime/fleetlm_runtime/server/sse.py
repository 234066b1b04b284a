"""Server-sent events in OpenAI's framing, and answers replayed from the response cache.

A stream is `data: {chunk}\\n\\n` per delta (held back to `server.stream_interval_tokens` tokens per
chunk), an optional usage chunk with empty `choices` (`stream_options.include_usage`), then
`data: [DONE]`. A client that goes away mid-stream ends the write; the handler's `finally` aborts the
engine request. A cached answer is replayed in the same shapes as a computed one, JSON or SSE.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from aiohttp import web

from fleetlm_runtime import contract
from fleetlm_runtime.caches import response_store
from fleetlm_runtime.engine import async_engine, outputs
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import answer, response_cache
from fleetlm_runtime.server import logprobs as logprobs_mod
from fleetlm_runtime.server import state as state_mod
from fleetlm_runtime.server import tools as tools_mod

log = logging.getLogger(__name__)

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies (nginx) must not buffer a token stream
}
DONE = b"data: [DONE]\n\n"


class ChunkWriter:
    """Pre-rendered JSON around the only varying parts (index, text, logprobs, finish reason): a chunk
    costs one `json.dumps` of its text, which keeps the server's per-token cost small next to the engine's."""

    def __init__(self, p: answer.Prepared, model_name: str) -> None:
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
            "usage": answer.usage_body(num_prompt, num_output),
        }
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    @staticmethod
    def error(message: str) -> bytes:
        body = {"error": {"message": message, "type": "internal_server_error", "code": None, "param": None}}
        return b"data: " + json.dumps(body).encode() + b"\n\n"


class _Choices:
    """Per-choice state of one stream: what the stream interval holds back (an answer.ChoiceState per
    choice, emptied at each chunk), the logprob builders, the tool-call parsers and the output counts."""

    def __init__(self, state: state_mod.ServerState, p: answer.Prepared, n: int) -> None:
        self._p = p
        self._want_logprobs = p.params.logprobs is not None
        self._token_str = answer.make_token_str(state) if self._want_logprobs else answer.no_token_str
        self._builders = [
            logprobs_mod.CompletionLogprobs(self._token_str) if p.kind == "completion" else None for _ in range(n)
        ]
        self._held = [answer.ChoiceState() for _ in range(n)]
        self._parsers = (
            [tools_mod.StreamParser(p.tool_plan) for _ in range(n)] if p.parses_tools and p.tool_plan else None
        )
        self._echo = answer.echo_text(state, p) if p.echo else ""
        self.num_output = [0] * n

    def chunk(
        self, writer: ChunkWriter, index: int, out: outputs.RequestOutput, *, first: bool, interval: int
    ) -> bytes | None:
        """Add `out` to its choice; the chunk to send now, or None (held back by the interval, or empty)."""
        p = self._p
        self.num_output[index] = out.num_output_tokens
        h = self._held[index]
        h.add(out)
        reason = answer.finish_reason_of(out)
        if reason is None and not first and len(h.token_ids) < interval:
            return None
        self._held[index] = answer.ChoiceState()
        text = "".join(h.parts)
        if first and self._echo:
            text = self._echo + text
        lp = None
        if self._want_logprobs:
            lp = answer.choice_logprobs(p, h, self._token_str, self._builders[index], with_prompt=first and p.echo)
        if self._parsers is not None:
            delta = self._parsers[index].feed(text, final=reason is not None)
            if reason is not None and self._parsers[index].num_calls:
                reason = answer.tool_finish(reason, p.tool_plan)
            if delta.content or delta.tool_calls or reason is not None or (lp is not None and h.token_ids):
                return writer.tool_delta(delta, reason, index, lp)
            return None
        # Empty deltas (text held back at a possible stop string) are not sent, so every chunk a
        # client times is a real one, except the closing chunk that carries the finish reason.
        if text or reason is not None or (lp is not None and h.token_ids):
            return writer.delta(text, reason, index, lp)
        return None


async def stream(
    request: web.Request,
    state: state_mod.ServerState,
    p: answer.Prepared,
    streams: list[async_engine.RequestStream],
    recorder: response_cache.Recorder | None,
) -> web.StreamResponse:
    writer = ChunkWriter(p, state.model_name)
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **answer.cache_headers(recorder)})
    choices = _Choices(state, p, len(streams))
    started = [False] * len(streams)
    try:
        interval = state.config.server.stream_interval_tokens
        failed = False
        async for index, out in answer.merged(streams):
            first = not started[index]
            if first:
                if not any(started):
                    # The response begins with the first output, not at admission: a request evicted from
                    # the queue before it (its class shed, or displaced by a higher one) still gets a 429.
                    answer.refuse_if_evicted(state, p)
                    state.unmark_waiting(p.req_id, p.qos_class)
                    await resp.prepare(request)
                started[index] = True
                if role := writer.role(index):
                    await resp.write(role)
            if recorder is not None:
                recorder.add(out)
            if out.finish_reason is request_mod.FinishReason.ERROR:
                await resp.write(writer.error(f"generation failed: {out.error or 'engine error'}"))
                failed = True
                break
            if (chunk := choices.chunk(writer, index, out, first=first, interval=interval)) is not None:
                await resp.write(chunk)
        if not resp.prepared:  # no output at all
            answer.refuse_if_evicted(state, p)
            await resp.prepare(request)
        if not failed:
            if not all(started):
                await resp.write(writer.error("the engine ended the request without output"))
            elif p.body.include_usage:
                await resp.write(writer.usage(p.num_prompt_tokens, sum(choices.num_output)))
        await resp.write(DONE)
        await resp.write_eof()
    except ConnectionResetError:
        # The client went away mid-stream; the handler's `finally` aborts the request.
        log.debug("client disconnected from %s", p.req_id)
    return resp


async def replay(
    request: web.Request,
    state: state_mod.ServerState,
    p: answer.Prepared,
    cached: response_store.CachedResponse,
    how: str,
) -> web.StreamResponse:
    """A cached response as this request's answer: its own id and time, the stored text and counts, the
    same shapes as a computed one (JSON, or SSE chunks with the finish reason last, usage and [DONE]).
    Only single-choice answers without logprobs or echo are cached (`response_cache.key_for`)."""
    headers = {contract.HEADER_RESPONSE_CACHE: how}
    if not p.body.stream:
        choice = answer.choice_body(p, 0, cached.text, cached.finish_reason)
        body = answer.completion_body(state, p, [choice], cached.num_output_tokens)
        return web.json_response(body, headers=headers)
    writer = ChunkWriter(p, state.model_name)
    pieces = cached.pieces or ("",)
    chunks = [writer.role()]
    if p.parses_tools and p.tool_plan is not None:  # the same parse as when it was computed
        parser = tools_mod.StreamParser(p.tool_plan)
        for i, piece in enumerate(pieces):
            final = i == len(pieces) - 1
            delta = parser.feed(piece, final=final)
            reason = (
                (answer.tool_finish(cached.finish_reason, p.tool_plan) if parser.num_calls else cached.finish_reason)
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
    chunks.append(DONE)
    resp = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    try:
        await resp.prepare(request)
        await resp.write(b"".join(chunks))
        await resp.write_eof()
    except ConnectionResetError:
        log.debug("client disconnected from %s", p.req_id)
    return resp
