"""`fleetlm-router`'s HTTP side: an OpenAI-compatible front door for the replicas of one LLMService.

Per request: read the body (bounded), resolve its QoS class exactly as the runtime does
(`fleetlm_runtime.server.auth`) and apply the class rules at the edge (`fleetlm_runtime.qos.admit`
against the router's own hold queue: shed classes and full queues get 429 with Retry-After before any
replica is touched); pick a replica (`picker`); send the body unchanged; then relay the answer:

- Streams pass through byte for byte. A replica that fails before the first byte (refused or reset
  connection, or a 503 because it is draining or loading) is retried on another one, up to
  `maxAttempts`; after the first byte there is no retry (tokens were delivered): the stream ends with an
  OpenAI-shaped error event (`data: {"error": ...}`) so the client knows it was cut.
- Other answers (429 with Retry-After, 400, JSON bodies) pass through with their status and headers.
- No ready replica: the request is held (at most `holdMaxRequests` at once, each at most `holdTimeoutS`)
  while the scaler asks for one; a streaming client gets its 200 and SSE comments (`: waiting for a
  replica`) meanwhile, so proxies keep the connection. Past the bounds: 503 with Retry-After and a message
  that says which bound (for a held stream, the same error as an SSE error event).

A client that disconnects closes its upstream connection, which aborts the sequence on the replica.
Kubernetes v1.37's HPA scale-to-zero and this hold are compatible by construction: see `scale`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from fleetlm_router import endpoints as endpoints_mod
from fleetlm_router import metrics as metrics_mod
from fleetlm_router import picker
from fleetlm_router import scale as scale_mod
from fleetlm_router import scrape as scrape_mod
from fleetlm_router import settings as settings_mod
from fleetlm_runtime import config as config_mod
from fleetlm_runtime import contract, qos
from fleetlm_runtime.server import auth, schemas

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 §7.6.1) and those aiohttp recomputes for the new message.
_HOP = frozenset(
    h.lower()
    for h in ("Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
              "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Date", "Server")
)  # fmt: skip


class RouterState:
    """Everything a request handler shares: replicas, in-flight counts, the hold queue, the pickers."""

    def __init__(
        self,
        settings: settings_mod.RouterSettings,
        endpoints: endpoints_mod.EndpointSet,
        *,
        qos_settings: config_mod.QoSSettings,
        api_keys: dict[str, str],
        scaler: scale_mod.Scaler,
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.qos = qos_settings
        self.api_keys = api_keys
        self.scaler = scaler
        self.metrics = metrics_mod.RouterMetrics()
        self.in_flight: dict[str, int] = {}
        self.started: dict[str, int] = {}  # requests ever sent to each replica (the scraper's reference)
        self.held_by_class: dict[str, int] = {}
        self.round_robin = picker.RoundRobin()
        self.seen_keys = picker.SeenKeys()
        self._ring = picker.HashRing([])
        self._ring_version = -1
        self._tie_break = 0
        self._last_scale_up = -1e18
        self._last_activity = -1e18
        self.session: aiohttp.ClientSession | None = None
        self.scraper = scrape_mod.LoadScraper(
            endpoints, lambda: self.session, self.in_flight, self.started, interval_s=settings.scrape_interval_s,
            timeout_s=settings.scrape_timeout_s, on_result=self._on_scrape,
        )  # fmt: skip

    def _on_scrape(self, name: str, reported: scrape_mod.Reported | None) -> None:
        # The replica set is synced here too, not only at the next pick: a replica's load gauges are series
        # of the replicas listed, and before the first pick (or between picks) the list would lag the
        # endpoints, so a scrape's figures would be dropped (seen in CI: no waiting series for a queuing one).
        self.sync_replicas()
        self.metrics.record_scrape(name, reported)

    # -- picking ------------------------------------------------------------------------------------

    def sync_replicas(self) -> None:
        if self._ring_version == self.endpoints.version:
            return
        names = set(self.endpoints.replicas)
        self._ring = picker.HashRing(sorted(names))
        self._ring_version = self.endpoints.version
        self.metrics.set_replicas(names)
        for gone in set(self.started) - names - set(self.in_flight):
            del self.started[gone]  # bounded by the replicas listed or still busy, not by pod churn
        for name in names:
            self.metrics.in_flight.labels(name).set(self.in_flight.get(name, 0))

    def pick(self, key: bytes | None, *, exclude: frozenset[str], seen: bool = True) -> picker.Pick | None:
        self.sync_replicas()
        self._tie_break += 1
        policy = self.settings.policy
        if policy == settings_mod.POLICY_ROUND_ROBIN:
            return self.round_robin.pick(list(self.endpoints.replicas), exclude=exclude)
        if policy == settings_mod.POLICY_LEAST_LOADED:
            key = None
        loads = self.loads()
        home = self.seen_keys.home(key) if key is not None else None
        choice = picker.pick_affinity(
            self._ring, key=key, in_flight=loads.load, load_factor=self.settings.load_factor,
            exclude=exclude, tie_break=self._tie_break, seen=seen, saturated=loads.saturated, home=home,
        )  # fmt: skip
        if choice is not None and key is not None:
            self.seen_keys.note_pick(key, choice, self._ring.replicas)
        return choice

    def loads(self) -> picker.Loads:
        """Own in flight plus what fresh scrapes of the replicas add (`picker.replica_loads`)."""
        return picker.replica_loads(
            self.in_flight, self.scraper.scraped, replicas=self.endpoints.replicas, now_s=time.monotonic(),
            max_age_s=self.settings.scrape_stale_s, kv_saturated=self.settings.kv_saturated,
            queue_saturated=self.settings.queue_saturated,
        )  # fmt: skip

    def begin(self, replica: str) -> None:
        self.in_flight[replica] = self.in_flight.get(replica, 0) + 1
        self.started[replica] = self.started.get(replica, 0) + 1
        if replica in self.endpoints.replicas:
            self.metrics.in_flight.labels(replica).set(self.in_flight[replica])

    def end(self, replica: str) -> None:
        left = self.in_flight.get(replica, 1) - 1
        if left <= 0:
            self.in_flight.pop(replica, None)
        else:
            self.in_flight[replica] = left
        if replica in self.endpoints.replicas:
            self.metrics.in_flight.labels(replica).set(max(left, 0))

    # -- scaling signals ----------------------------------------------------------------------------

    def _fire(self, coro_fn: Callable[[], Any], *, counter: bool) -> None:
        async def run() -> None:
            try:
                await coro_fn()
                if counter:
                    self.metrics.scale_up.labels("sent").inc()
            except Exception as error:  # a failed ask is retried next interval; never fail the request
                log.warning("%s failed: %s", getattr(coro_fn, "__name__", "scaler call"), error)
                if counter:
                    self.metrics.scale_up.labels("failed").inc()

        task = asyncio.ensure_future(run())
        _background.add(task)
        task.add_done_callback(_background.discard)

    def maybe_scale_up(self) -> None:
        now = time.monotonic()
        if now - self._last_scale_up >= self.settings.scale_up_interval_s:
            self._last_scale_up = now
            self._fire(self.scaler.request_scale_up, counter=True)

    def note_activity(self) -> None:
        now = time.monotonic()
        if now - self._last_activity >= self.settings.activity_interval_s:
            self._last_activity = now
            self._fire(self.scaler.report_activity, counter=False)

    def class_load(self) -> dict[str, qos.ClassLoad]:
        return {name: qos.ClassLoad(num_waiting=n) for name, n in self.held_by_class.items()}


_background: set[asyncio.Future[None]] = set()
state_key = web.AppKey("router_state", RouterState)


# ------------------------------------------------------------------------------------------------
# Errors the router answers itself


def _error_body(message: str, *, type_: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "code": code, "param": None}}


def _error(status: int, message: str, *, code: str, retry_after_s: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}
    type_ = "server_error" if status >= 500 else "rate_limit_error" if status == 429 else "invalid_request_error"
    return web.json_response(_error_body(message, type_=type_, code=code), status=status, headers=headers)


async def _sse_error(resp: web.StreamResponse, message: str, *, code: str) -> None:
    data = json.dumps(_error_body(message, type_="server_error", code=code))
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write(f"data: {data}\n\n".encode())
        await resp.write_eof()


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


# ------------------------------------------------------------------------------------------------
# The proxy handler


class _Attempt:
    """Outcome of one try on one replica: an upstream response to relay, or a reason to try another."""

    def __init__(self, upstream: aiohttp.ClientResponse | None, retry_reason: str | None, detail: str = "") -> None:
        self.upstream = upstream
        self.retry_reason = retry_reason
        self.detail = detail


async def _try_replica(state: RouterState, url: str, path: str, body: bytes, headers: dict[str, str]) -> _Attempt:
    assert state.session is not None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=state.settings.connect_timeout_s)
    try:
        upstream = await state.session.post(url + path, data=body, headers=headers, timeout=timeout)
    except (aiohttp.ClientConnectionError, TimeoutError) as error:
        return _Attempt(None, "connect_error", f"{type(error).__name__}: {error}")
    if upstream.status == 503:
        # Draining or still loading: it refused before doing any work, so another replica may serve it.
        detail = (await upstream.text())[:200]
        upstream.release()
        return _Attempt(None, "unavailable", f"HTTP 503 {detail}")
    return _Attempt(upstream, None)


def _forward_headers(request: web.Request) -> dict[str, str]:
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
    peer = request.remote or ""
    prior = request.headers.get("X-Forwarded-For")
    headers["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    return headers


def _response_headers(upstream: aiohttp.ClientResponse, replica: str) -> dict[str, str]:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
    headers["X-FleetLM-Replica"] = replica
    return headers


async def _relay(
    request: web.Request,
    state: RouterState,
    upstream: aiohttp.ClientResponse,
    replica: str,
    held_resp: web.StreamResponse | None,
) -> web.StreamResponse:
    """Send the replica's answer to the client; the stream is cut with an error event if the replica dies."""
    is_stream = upstream.content_type == "text/event-stream"
    if held_resp is not None:
        resp = held_resp  # 200 and SSE headers already went out while the request was held
        if upstream.status != 200 or not is_stream:
            text = await upstream.text()
            try:
                error = json.loads(text)["error"]
                message, code = str(error.get("message")), str(error.get("code") or "upstream_error")
            except (ValueError, KeyError, TypeError, AttributeError):
                message, code = f"HTTP {upstream.status} from the replica", "upstream_error"
            await _sse_error(resp, message, code=code)
            return resp
    elif upstream.status != 200 or not is_stream:
        body = await upstream.read()
        return web.Response(status=upstream.status, body=body, headers=_response_headers(upstream, replica))
    else:
        resp = web.StreamResponse(status=upstream.status, headers=_response_headers(upstream, replica))
        await resp.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as error:
        if isinstance(error, aiohttp.ClientConnectionResetError | ConnectionResetError) and _client_gone(request):
            return resp  # the client left; closing the upstream aborts the sequence
        state.metrics.upstream_lost.inc()
        log.warning("replica %s cut a stream: %s", replica, error)
        await _sse_error(
            resp,
            f"the replica serving this stream ({replica}) went away mid-stream; "
            "the tokens so far are all there will be",
            code="replica_lost",
        )
        return resp
    with contextlib.suppress(ConnectionError, RuntimeError):
        await resp.write_eof()
    return resp


def _admit(state: RouterState, qos_class: str) -> qos.Verdict:
    """The runtime's admission rules over the router's hold queue (shed classes, queue bounds per class)."""
    return qos.admit(
        qos_class, qos=state.qos, max_queue_len=max(1, state.settings.hold_max_requests), load=state.class_load()
    )


@dataclasses.dataclass(frozen=True)
class _Accepted:
    """A request past the edge's checks: its body (sent on unchanged), the parsed form and its QoS class."""

    body: bytes
    parsed: dict[str, Any]
    qos_class: str


async def _accept(request: web.Request, state: RouterState) -> _Accepted | web.Response:
    """Read, parse and classify the request, and apply the class rules; a refusal is the error to send."""
    settings = state.settings
    try:
        # A body that trickles in (slowloris) is bounded in time as well as in size.
        async with asyncio.timeout(settings.body_timeout_s):
            body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        state.metrics.rejected.labels("", metrics_mod.REJECT_INVALID).inc()
        return _error(413, f"request body over {settings.max_body_bytes} bytes", code="too_large")
    except TimeoutError:
        state.metrics.rejected.labels("", metrics_mod.REJECT_INVALID).inc()
        return _error(408, f"the request body did not arrive within {settings.body_timeout_s:g}s", code="timeout")
    try:
        # The runtime's own parser and words: a malformed body is a 400 here, before it is held or routed.
        parsed = schemas.parse_json(body)
        if not isinstance(parsed, dict):
            raise schemas.invalid(None, f"the request body must be a JSON object, got {type(parsed).__name__}")
        body_class = parsed.get(contract.FIELD_QOS_CLASS)
        client = auth.resolve_client(
            request, body_class=body_class if isinstance(body_class, str) else None, qos=state.qos,
            api_keys=state.api_keys,
        )  # fmt: skip
    except schemas.APIError as error:
        state.metrics.rejected.labels("", metrics_mod.REJECT_INVALID).inc()
        return error.response()
    state.note_activity()
    verdict = _admit(state, client.qos_class)
    if not verdict.admit:
        # The class rules at the edge: a shed class (or one over its share of the hold queue) never reaches
        # a replica. The same 429 the runtime would give, so clients need one retry policy.
        state.metrics.rejected.labels(client.qos_class, metrics_mod.REJECT_OVERLOADED).inc()
        return _error(429, verdict.message, code=verdict.code or "queue_full", retry_after_s=settings.retry_after_s)
    return _Accepted(body, parsed, client.qos_class)


class _Hold:
    """A request waiting for a ready replica: its place in the hold queue (counted per class while it
    waits), the time it waited, and for a stream the response already sent to the client, which the
    eventual replica's answer (or the error) continues."""

    def __init__(self, request: web.Request, state: RouterState, qos_class: str) -> None:
        self._request = request
        self._state = state
        self._qos_class = qos_class
        self.started: float | None = None  # None while not holding
        self.resp: web.StreamResponse | None = None  # stays set once sent, after the hold ends

    def end(self, outcome: str) -> None:
        """Leave the hold queue (a no-op when not holding); `outcome` labels the time it waited."""
        if self.started is None:
            return
        state = self._state
        state.held_by_class[self._qos_class] -= 1
        state.metrics.held.dec()
        state.metrics.hold_seconds.labels(outcome).observe(time.monotonic() - self.started)
        self.started = None

    async def _begin(self, *, stream: bool) -> web.StreamResponse | None:
        """Join the hold queue within its bounds; the 503 to send when it is off or full."""
        state, settings = self._state, self._state.settings
        if settings.hold_max_requests == 0 or settings.hold_timeout_s == 0:
            state.metrics.rejected.labels(self._qos_class, metrics_mod.REJECT_NO_REPLICA).inc()
            return _error(
                503, "no replica is ready and this router does not hold requests", code="no_replica",
                retry_after_s=settings.retry_after_s,
            )  # fmt: skip
        verdict = _admit(state, self._qos_class)
        if not verdict.admit:
            state.metrics.rejected.labels(self._qos_class, metrics_mod.REJECT_NO_REPLICA).inc()
            return _error(
                503, f"no replica is ready, and {verdict.message}; retry later",
                code=verdict.code or "queue_full", retry_after_s=settings.retry_after_s,
            )  # fmt: skip
        self.started = time.monotonic()
        state.held_by_class[self._qos_class] = state.held_by_class.get(self._qos_class, 0) + 1
        state.metrics.held.inc()
        if stream:
            self.resp = web.StreamResponse(
                status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await self.resp.prepare(self._request)
        return None

    async def wait(self, *, stream: bool) -> web.StreamResponse | None:
        """Hold (joining the queue the first time) until the replica set changes or a comment is due; the
        response that ends the request instead: refused, timed out, or the client went away."""
        state, settings = self._state, self._state.settings
        if self.started is None:
            refused = await self._begin(stream=stream)
            if refused is not None:
                return refused
            assert self.started is not None
        state.maybe_scale_up()
        waited = time.monotonic() - self.started
        left = settings.hold_timeout_s - waited
        if left <= 0:
            self.end("timeout")
            state.metrics.rejected.labels(self._qos_class, metrics_mod.REJECT_HOLD_TIMEOUT).inc()
            message = (
                f"no replica became ready within {settings.hold_timeout_s:g}s "
                "(the service is scaled to zero or its replicas are starting); retry later"
            )
            if self.resp is not None:
                await _sse_error(self.resp, message, code="no_replica")
                return self.resp
            return _error(503, message, code="no_replica", retry_after_s=settings.retry_after_s)
        if _client_gone(self._request):
            self.end("gone")
            return self.resp or web.Response(status=499)
        if self.resp is not None:
            try:
                await self.resp.write(f": waiting for a replica ({waited:.0f}s)\n\n".encode())
            except (ConnectionError, RuntimeError):
                self.end("gone")
                return self.resp
        await state.endpoints.wait_changed(min(left, settings.hold_comment_interval_s, 1.0))
        return None


async def _serve_from(
    request: web.Request,
    state: RouterState,
    choice: picker.Pick,
    accepted: _Accepted,
    *,
    headers: dict[str, str],
    held_resp: web.StreamResponse | None,
    failures: list[str],
) -> web.StreamResponse | None:
    """Send the request to the picked replica and relay its answer; None (the failure noted in
    `failures`) when it failed before its first byte, so another replica may be tried."""
    url = state.endpoints.replicas[choice.replica]
    state.begin(choice.replica)
    try:
        attempt = await _try_replica(state, url, request.path_qs, accepted.body, headers)
        if attempt.upstream is None:
            state.metrics.retries.labels(attempt.retry_reason or "connect_error").inc()
            failures.append(f"{choice.replica}: {attempt.detail}")
            return None
        state.metrics.picks.labels(choice.replica, choice.reason).inc()
        async with attempt.upstream as upstream:
            return await _relay(request, state, upstream, choice.replica, held_resp)
    finally:
        state.end(choice.replica)


async def handle_openai(request: web.Request) -> web.StreamResponse:
    state = request.app[state_key]
    settings = state.settings
    accepted = await _accept(request, state)
    if isinstance(accepted, web.Response):
        return accepted
    key = picker.prefix_key(accepted.parsed, num_tokens=settings.prefix_tokens)
    seen = state.seen_keys.check_and_add(key) if key is not None else True
    stream = accepted.parsed.get("stream") is True
    headers = _forward_headers(request)
    tried: set[str] = set()
    failures: list[str] = []
    hold = _Hold(request, state, accepted.qos_class)
    try:
        while True:
            choice = (
                state.pick(key, exclude=frozenset(tried), seen=seen) if len(tried) < settings.max_attempts else None
            )
            if choice is not None:
                hold.end("served")
                tried.add(choice.replica)
                served = await _serve_from(
                    request, state, choice, accepted, headers=headers, held_resp=hold.resp, failures=failures
                )
                if served is not None:
                    return served
                continue
            if failures:
                # Replicas were there and each one tried failed before its first byte: say so, do not hold.
                message = ("every replica tried failed before answering: " + "; ".join(failures))[:1000]
                state.metrics.rejected.labels(accepted.qos_class, metrics_mod.REJECT_ALL_FAILED).inc()
                if hold.resp is not None:
                    await _sse_error(hold.resp, message, code="replicas_failed")
                    return hold.resp
                return _error(502, message, code="replicas_failed", retry_after_s=settings.retry_after_s)
            # No replica is ready: hold, within bounds.
            ended = await hold.wait(stream=stream)
            if ended is not None:
                return ended
    finally:
        hold.end("gone")


async def handle_models(request: web.Request) -> web.StreamResponse:
    """GET /v1/models from any ready replica (they serve one model); 503 when none is."""
    state = request.app[state_key]
    assert state.session is not None
    for name, url in list(state.endpoints.replicas.items()):
        try:
            async with state.session.get(url + contract.PATH_MODELS, headers=_forward_headers(request)) as upstream:
                return web.Response(
                    status=upstream.status, body=await upstream.read(), headers=_response_headers(upstream, name)
                )
        except (aiohttp.ClientError, TimeoutError):
            continue
    return _error(
        503, "no replica is ready to list its model", code="no_replica", retry_after_s=state.settings.retry_after_s
    )


async def handle_health(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def handle_ready(request: web.Request) -> web.Response:
    # Ready as soon as the replica source reported once: with zero replicas the router holds, which is its job.
    state = request.app[state_key]
    if not state.endpoints.synced:
        return web.json_response({"status": "waiting for the replica list"}, status=503)
    return web.json_response({"status": "ready", "replicas": len(state.endpoints.replicas)})


async def handle_metrics(request: web.Request) -> web.Response:
    state = request.app[state_key]
    state.sync_replicas()
    return web.Response(body=state.metrics.render(), headers={"Content-Type": metrics_mod.CONTENT_TYPE})


async def _report_busy(state: RouterState) -> None:
    """A long stream or a held request is traffic too: keep the idle clock from running out under it."""
    while True:
        await asyncio.sleep(state.settings.activity_interval_s)
        if any(state.in_flight.values()) or any(state.held_by_class.values()):
            state.note_activity()


async def _follow_runtime_config(state: RouterState, path: pathlib.Path, *, interval_s: float = 2.0) -> None:
    last: float | None = None
    while True:
        with contextlib.suppress(OSError):
            mtime = (await asyncio.to_thread(path.stat)).st_mtime
            if mtime != last:
                last = mtime
                try:
                    state.qos = (await asyncio.to_thread(config_mod.load_config, path)).qos
                except config_mod.ConfigError as error:
                    log.error("runtime config %s refused, keeping the previous class rules: %s", path, error)
        await asyncio.sleep(interval_s)


async def _follow_api_keys(state: RouterState, path: pathlib.Path, *, interval_s: float = 2.0) -> None:
    """Reload the key -> class map when the file's bytes change (a rotated Secret), as the runtime does
    (`fleetlm_runtime.server.api_keys`), so a key resolves to the same class here as at the pods. A file
    that fails validation is refused whole and the keys in force stay. Never log a key."""

    async def digest() -> bytes | None:
        try:
            return hashlib.sha256(await asyncio.to_thread(path.read_bytes)).digest()
        except OSError:
            return None  # gone for a moment (mid-swap)

    last = await digest()  # the version the keys in force came from (loaded by the caller)
    while True:
        await asyncio.sleep(interval_s)
        current = await digest()
        if current is None or current == last:
            continue
        last = current
        classes = {c.name for c in state.qos.classes}
        try:
            state.api_keys = await asyncio.to_thread(config_mod.load_api_keys, path, classes=classes)
            log.info("API keys reloaded from %s: %d keys", path, len(state.api_keys))
        except config_mod.ConfigError as error:
            log.error("API keys file changed but is invalid; keeping the %d in force: %s", len(state.api_keys), error)


def create_app(
    settings: settings_mod.RouterSettings,
    *,
    source: Any,
    qos_settings: config_mod.QoSSettings | None = None,
    api_keys: dict[str, str] | None = None,
    scaler: scale_mod.Scaler | None = None,
    runtime_config_path: pathlib.Path | None = None,
    api_keys_path: pathlib.Path | None = None,
) -> web.Application:
    """The router app; `source.run(endpoint_set)` feeds it replicas for as long as the app lives.

    With `runtime_config_path` (the service's runtime ConfigMap, mounted) the class rules are re-read
    when the file changes, so classes the operator sheds are refused here as they are at the pods; with
    `api_keys_path` the key -> class map is reloaded when the Secret rotates.
    """
    app = web.Application(client_max_size=settings.max_body_bytes)
    endpoint_set = endpoints_mod.EndpointSet()
    state = RouterState(
        settings, endpoint_set, qos_settings=qos_settings or config_mod.QoSSettings(), api_keys=api_keys or {},
        scaler=scaler or scale_mod.NullScaler(),
    )  # fmt: skip
    app[state_key] = state

    async def lifecycle(_: web.Application) -> AsyncIterator[None]:
        state.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, enable_cleanup_closed=True),
            auto_decompress=False,
        )
        tasks = [asyncio.create_task(source.run(endpoint_set)), asyncio.create_task(_report_busy(state))]
        if settings.scrape_interval_s > 0:
            tasks.append(asyncio.create_task(state.scraper.run()))
        if runtime_config_path is not None:
            tasks.append(asyncio.create_task(_follow_runtime_config(state, runtime_config_path)))
        if api_keys_path is not None:
            tasks.append(asyncio.create_task(_follow_api_keys(state, api_keys_path)))
        yield
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await state.session.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post(contract.PATH_COMPLETIONS, handle_openai)
    app.router.add_post(contract.PATH_CHAT_COMPLETIONS, handle_openai)
    app.router.add_get(contract.PATH_MODELS, handle_models)
    app.router.add_get(contract.PATH_HEALTH, handle_health)
    app.router.add_get(contract.PATH_READY, handle_ready)
    app.router.add_get(contract.PATH_METRICS, handle_metrics)
    return app
