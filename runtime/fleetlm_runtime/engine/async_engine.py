"""AsyncEngine: the asyncio face of the engine. Steps run elsewhere (a thread or a process); streams live
on the loop.

The event loop never runs the model. `submit()`/`generate()` validate on the caller's thread against the
engine's `EngineInfo` (so a bad request fails at once, before any stream starts), then hand the request to
the executor (engine/executor.py: a worker thread, or engine/core_process.py: the core in its own
process); aborts and limit changes travel the same way and apply between two steps.

Outputs come back in batches: several steps that finished while the loop was busy are delivered at once,
and each stream receives its tokens merged into one chunk (vLLM's output collector does the same). The
stats callback runs on the loop thread, once per step, after that step's outputs are delivered.

This module must never import aiohttp or prometheus-client; the server adapts streams and stats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import core_process, executor, outputs, scheduler, validate
from fleetlm_runtime.engine import request as request_mod

if TYPE_CHECKING:  # torch: the server process with the core in another process never imports it
    from fleetlm_runtime.engine import core as core_mod

logger = logging.getLogger(__name__)

StatsCallback = Callable[[outputs.EngineStats], None]


class EngineDrainingError(RuntimeError):
    """The engine is draining or shut down and admits no new requests (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine's worker thread died; nothing more will be served (HTTP 503, restart the process)."""


class RequestStream:
    """The outputs of one request, as an async iterator. Ends after the output with `finished=True`.

    A consumer that stops early must call `abort()` (or use `AsyncEngine.generate`, which does).
    """

    __slots__ = ("_engine", "_finished", "_pending", "_waiter", "prompt_token_ids", "req_id")

    def __init__(self, engine: AsyncEngine, req_id: str, prompt_token_ids: list[int]) -> None:
        self._engine = engine
        self.req_id = req_id
        self.prompt_token_ids = prompt_token_ids
        self._pending: outputs.RequestOutput | None = None
        # A bare future per wait, not an asyncio.Event: this is paid once per token per stream, and the
        # Event's waiter bookkeeping costs several times more.
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False

    @property
    def finished(self) -> bool:
        return self._finished

    def _put(self, out: outputs.RequestOutput) -> None:
        pending = self._pending
        if pending is None:
            self._pending = out
        else:  # the consumer is behind: merge, so it gets everything in one chunk
            pending.new_token_ids.extend(out.new_token_ids)
            pending.text += out.text
            pending.finished = out.finished
            pending.finish_reason = out.finish_reason
            pending.stop_reason = out.stop_reason
            pending.num_output_tokens = out.num_output_tokens
            pending.error = out.error
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> outputs.RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        if self._pending is None:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out = self._pending
        assert out is not None
        self._pending = None
        if out.finished:
            self._finished = True
        return out

    def abort(self) -> None:
        """Stop generating (client gone); the engine frees the KV before its next step."""
        if not self._finished:
            self._engine.abort(self.req_id)


ExecutorKind = Literal["thread", "process"]


class AsyncEngine:
    def __init__(
        self,
        engine: core_mod.EngineCore | executor.Executor,
        *,
        stats_callback: StatsCallback | None = None,
    ) -> None:
        """`engine`: an EngineCore to run on a worker thread of this process, or a started executor."""
        self._executor: executor.Executor = (
            engine
            if isinstance(engine, executor.ThreadExecutor | core_process.ProcessExecutor)
            else executor.ThreadExecutor(engine)  # type: ignore[arg-type]
        )
        self.info = self._executor.info
        self.tokenizer = self._executor.tokenizer
        self._stats_callback = stats_callback
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._out_lock = threading.Lock()
        self._out_pending: list[outputs.RequestOutput] = []  # guarded by _out_lock
        self._stats_pending: list[outputs.EngineStats] = []  # guarded by _out_lock
        self._delivery_scheduled = False  # guarded by _out_lock
        self._streams: dict[str, RequestStream] = {}  # loop thread only
        self._draining = False
        self._shut_down = False
        self._idle = asyncio.Event()
        self._dead: BaseException | None = None
        self._dead_event = asyncio.Event()  # set on the loop once every stream has been failed
        self._limits = self._executor.initial_limits  # (max_batch_size, max_batch_tokens) as last requested

    @classmethod
    async def create(
        cls,
        config: config_mod.EngineConfig,
        *,
        stats_callback: StatsCallback | None = None,
        executor_kind: ExecutorKind = "thread",
    ) -> AsyncEngine:
        """Load the model (without blocking the loop, so it keeps serving /health) and start the engine:
        on a worker thread, or in its own process (`executor_kind="process"`)."""
        if executor_kind == "process":
            built: core_mod.EngineCore | executor.Executor = await core_process.ProcessExecutor.open(config)
        else:
            from fleetlm_runtime.engine import core as core_mod  # noqa: PLC0415  (torch, for this layout only)

            built = await asyncio.to_thread(core_mod.EngineCore, config)
        engine = cls(built, stats_callback=stats_callback)
        engine.start()
        return engine

    # ----------------------------------------------------------------------------------------------
    # Lifecycle

    def start(self) -> None:
        """Bind to the running loop and start the executor (idempotent)."""
        if self._started:
            return
        self._loop = asyncio.get_running_loop()
        self._started = True
        self._executor.start(self)

    @property
    def core(self) -> core_mod.EngineCore:
        """The in-process core (thread executor only): for tests and benchmarks that look inside."""
        core = getattr(self._executor, "core", None)
        if core is None:
            raise RuntimeError("the engine core runs in another process; use `info` and `kv_usage`")
        return core  # type: ignore[no-any-return]

    @property
    def executor_kind(self) -> ExecutorKind:
        return "thread" if isinstance(self._executor, executor.ThreadExecutor) else "process"

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def kv_capacity_tokens(self) -> int:
        return self.info.kv_capacity_tokens

    @property
    def kv_usage(self) -> float:
        """Reserved KV / capacity, now (thread) or as of the core's last iteration (process)."""
        return self._executor.kv_usage

    @property
    def is_running(self) -> bool:
        return self._started and self._dead is None and self._executor.is_alive

    async def wait_dead(self) -> BaseException:
        """Return once the worker (thread or process) has died and every stream has been failed; the
        server then stops, since this engine cannot serve again. Never returns for a healthy engine."""
        await self._dead_event.wait()
        assert self._dead is not None
        return self._dead

    @property
    def is_draining(self) -> bool:
        return self._draining

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop admitting requests and wait for the in-flight ones to finish. True if all finished."""
        self._draining = True
        if not self._streams:
            return True
        self._idle.clear()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def shutdown(self) -> None:
        """Abort whatever is left, stop the executor and wait for it. The engine cannot be restarted."""
        self._draining = True
        if self._shut_down:
            return
        self._shut_down = True
        await self._executor.stop()
        self._deliver()  # the final abort outputs

    # ----------------------------------------------------------------------------------------------
    # Requests

    def submit(
        self,
        prompt: str | Sequence[int],
        sampling_params: request_mod.SamplingParams | None = None,
        *,
        req_id: str | None = None,
        qos_class: str = "default",
        priority: int = 0,
        weight: float = 1.0,
        tenant: str = "",
    ) -> RequestStream:
        """Validate and queue a request; returns its stream. Raises InvalidParameterError (naming the
        parameter), EngineDrainingError or EngineDeadError at once, before anything is queued."""
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped: {self._dead!r}")
        if self._draining:
            raise EngineDrainingError("the engine is draining and admits no new requests")
        self.start()
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        req_id = req_id or uuid.uuid4().hex
        if req_id in self._streams:
            raise request_mod.InvalidParameterError("request_id", f"{req_id!r} is already in flight")
        req = validate.make_request(
            self.info,
            arrival_time_s=self._executor.clock(),
            req_id=req_id,
            prompt_token_ids=prompt_ids,
            sampling_params=sampling_params or request_mod.SamplingParams(),
            qos_class=qos_class,
            priority=priority,
            weight=weight,
            tenant=tenant,
        )
        stream = RequestStream(self, req_id, prompt_ids)
        self._streams[req_id] = stream
        self._executor.send(executor.Add(req))
        return stream

    async def generate(
        self,
        prompt: str | Sequence[int],
        sampling_params: request_mod.SamplingParams | None = None,
        *,
        req_id: str | None = None,
        qos_class: str = "default",
        priority: int = 0,
    ) -> AsyncIterator[outputs.RequestOutput]:
        """Stream a request's outputs; aborts it if the consumer stops early (cancel, break, disconnect)."""
        stream = self.submit(prompt, sampling_params, req_id=req_id, qos_class=qos_class, priority=priority)
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, req_id: str) -> None:
        """End a request now; its stream gets a final output with finish_reason 'abort'. Idempotent."""
        if req_id in self._streams:
            self._executor.send(executor.Abort((req_id,)))

    def update_limits(self, *, max_batch_size: int | None = None, max_batch_tokens: int | None = None) -> None:
        """Change batch limits live; validated now (errors name the field), applied before the next step."""
        size = self._limits[0] if max_batch_size is None else max_batch_size
        tokens = self._limits[1] if max_batch_tokens is None else max_batch_tokens
        scheduler.SchedulerLimits(max_batch_size=size, max_batch_tokens=tokens)  # validates
        self._limits = (size, tokens)
        self._executor.send(executor.Limits(max_batch_size=size, max_batch_tokens=tokens))

    @property
    def limits(self) -> tuple[int, int]:
        """(max_batch_size, max_batch_tokens) as last requested."""
        return self._limits

    # ----------------------------------------------------------------------------------------------
    # Tokenizer helpers for the server

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    def render_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages`, as text (it already holds the special tokens)."""
        return str(
            self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
        )

    def encode_chat(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the template supplies BOS, so none is added again."""
        return self.encode(
            self.render_chat(messages, add_generation_prompt=add_generation_prompt), add_special_tokens=False
        )

    # ----------------------------------------------------------------------------------------------
    # OutputSink: what the executor calls

    def post(self, produced: list[outputs.RequestOutput], stats: outputs.EngineStats | None) -> None:
        """From the worker thread: buffer, and schedule one delivery on the loop if none is pending."""
        self._post(produced, stats)

    def deliver(self, produced: list[outputs.RequestOutput], stats: list[outputs.EngineStats]) -> None:
        """On the loop thread (the process executor's reader): deliver now, after anything buffered."""
        with self._out_lock:
            self._out_pending.extend(produced)
            self._stats_pending.extend(stats)
        self._deliver()

    def died(self, error: BaseException) -> None:
        self._dead = error
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._fail_all, error)

    def _post(self, produced: list[outputs.RequestOutput], stats: outputs.EngineStats | None) -> None:
        with self._out_lock:
            self._out_pending.extend(produced)
            if stats is not None:
                self._stats_pending.append(stats)
            if self._delivery_scheduled:
                return  # the pending delivery will take these too
            self._delivery_scheduled = True
        loop = self._loop
        assert loop is not None
        with contextlib.suppress(RuntimeError):  # loop closed: nobody is listening any more
            loop.call_soon_threadsafe(self._deliver)

    # ----------------------------------------------------------------------------------------------
    # Loop thread

    def _deliver(self) -> None:
        with self._out_lock:
            produced, self._out_pending = self._out_pending, []
            stats, self._stats_pending = self._stats_pending, []
            self._delivery_scheduled = False
        streams = self._streams
        for out in produced:
            stream = streams.get(out.req_id)
            if stream is None:
                continue
            stream._put(out)
            if out.finished:
                del streams[out.req_id]
        if self._stats_callback is not None:
            for item in stats:
                try:
                    self._stats_callback(item)
                except Exception:
                    logger.exception("the stats callback failed")
        if not streams:
            self._idle.set()

    def _fail_all(self, exc: BaseException) -> None:
        for req_id, stream in list(self._streams.items()):
            stream._put(
                outputs.RequestOutput(
                    req_id=req_id,
                    new_token_ids=[],
                    text="",
                    finished=True,
                    finish_reason=request_mod.FinishReason.ERROR,
                    error=f"the engine stopped: {exc!r}",
                )
            )
        self._streams.clear()
        self._idle.set()
        self._dead_event.set()
