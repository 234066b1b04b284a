"""Where the engine core runs, and the loop that drives it: commands in, one step at a time, outputs out.

`serve()` is the whole engine loop, written once: apply the commands that arrived (add, abort, new limits,
stop), run one step if anything is unfinished, post the outputs, and block for commands only when idle.
Two executors run it:

* `ThreadExecutor`: a worker thread in the server's process. Cheap to start; tests that reach into the
  core use it. The model shares Python's GIL with the event loop, so at high token rates the HTTP work
  slows the steps (and the steps the HTTP work).
* `ProcessExecutor` (engine/core_process.py): the core in its own process, as vLLM v1 runs its
  EngineCore, so the server's event loop never competes with the model for the GIL.

Both hand their outputs to an `OutputSink` (the AsyncEngine), which owns the streams.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from fleetlm_runtime.engine import outputs
from fleetlm_runtime.engine import request as request_mod

if TYPE_CHECKING:  # the server process imports this module without torch; only the core needs it
    from fleetlm_runtime.engine import core as core_mod

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Add:
    req: request_mod.Request


@dataclass(frozen=True, slots=True)
class Abort:
    req_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Limits:
    max_batch_size: int | None
    max_batch_tokens: int | None


@dataclass(frozen=True, slots=True)
class Stop:
    """Abort whatever is left, post those outputs, and end the loop."""


Command = Add | Abort | Limits | Stop

Post = Callable[[list[outputs.RequestOutput], outputs.EngineStats | None], None]


class OutputSink(Protocol):
    """The receiver of an executor's outputs (the AsyncEngine)."""

    def post(self, produced: list[outputs.RequestOutput], stats: outputs.EngineStats | None) -> None:
        """From any thread: queue outputs and make sure a delivery on the loop follows."""

    def deliver(self, produced: list[outputs.RequestOutput], stats: list[outputs.EngineStats]) -> None:
        """On the loop thread: hand outputs to their streams and stats to the callback, now."""

    def died(self, error: BaseException) -> None:
        """From any thread: the core is gone; fail every stream."""


class Executor(Protocol):
    info: outputs.EngineInfo
    tokenizer: Any
    initial_limits: tuple[int, int]  # (max_batch_size, max_batch_tokens) at start
    clock: Callable[[], float]  # the arrival clock of requests (time.monotonic, or the core's own)

    def start(self, sink: OutputSink) -> None: ...

    def send(self, command: Command) -> None: ...

    async def stop(self) -> None: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def kv_usage(self) -> float: ...


def serve(core: core_mod.EngineCore, receive: Callable[[bool], list[Command]], post: Post) -> None:
    """Drive `core` until a Stop command. `receive(block)` returns the commands that arrived, waiting for
    at least one when `block` (the core is idle); `post` takes each iteration's outputs and stats."""
    while True:
        commands = receive(not core.has_unfinished_requests())
        produced, stopping = apply(core, commands)
        if stopping:
            produced.extend(core.abort_requests(list(core.scheduler.requests)))
            post(produced, None)
            return
        stats = None
        if core.has_unfinished_requests():
            step_outputs, stats = core.step()
            produced.extend(step_outputs)
        if produced or stats is not None:
            post(produced, stats)


def apply(core: core_mod.EngineCore, commands: list[Command]) -> tuple[list[outputs.RequestOutput], bool]:
    """Apply commands in arrival order; returns the outputs they produced and whether a Stop came."""
    produced: list[outputs.RequestOutput] = []
    stopping = False
    for command in commands:
        if isinstance(command, Add):
            try:
                core.add_request(command.req)
            except ValueError as exc:  # InvalidParameterError: validated at submit, but the core has the last word
                produced.append(error_output(command.req, str(exc)))
        elif isinstance(command, Abort):
            produced.extend(core.abort_requests(command.req_ids))
        elif isinstance(command, Limits):
            core.update_limits(max_batch_size=command.max_batch_size, max_batch_tokens=command.max_batch_tokens)
        else:
            stopping = True
    return produced, stopping


def error_output(req: request_mod.Request, message: str) -> outputs.RequestOutput:
    return outputs.RequestOutput(
        req_id=req.req_id,
        new_token_ids=[],
        text="",
        finished=True,
        finish_reason=request_mod.FinishReason.ERROR,
        num_prompt_tokens=req.num_prompt_tokens,
        error=message,
    )


class ThreadExecutor:
    """The core on a worker thread of this process; commands travel through a locked list."""

    def __init__(self, core: core_mod.EngineCore) -> None:
        self.core = core
        self.info = core.info
        self.tokenizer = core.tokenizer
        self.initial_limits = (core.limits.max_batch_size, core.limits.max_batch_tokens)
        self.clock = core.clock
        self._cv = threading.Condition()
        self._commands: list[Command] = []  # guarded by _cv
        self._thread: threading.Thread | None = None
        self._dead = False

    def start(self, sink: OutputSink) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, args=(sink,), name="fleetlm-engine", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        with self._cv:
            self._commands.append(command)
            self._cv.notify()

    async def stop(self) -> None:
        thread = self._thread
        if thread is not None:
            self.send(Stop())
            await asyncio.to_thread(thread.join)
        self.core.close()

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._dead

    @property
    def kv_usage(self) -> float:
        return self.core.kv_usage

    def _receive(self, block: bool) -> list[Command]:
        with self._cv:
            while block and not self._commands:
                self._cv.wait()
            commands, self._commands = self._commands, []
        return commands

    def _run(self, sink: OutputSink) -> None:
        try:
            serve(self.core, self._receive, sink.post)
        except BaseException as exc:
            logger.exception("the engine worker died")
            self._dead = True
            sink.died(exc)
