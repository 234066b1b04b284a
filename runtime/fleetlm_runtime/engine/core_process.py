"""The engine core in its own process (vLLM v1's EngineCore process, without ZMQ).

Why: with the core on a thread, every torch op releases and re-takes the GIL, and each time the event loop
(SSE writes, JSON, socket syscalls) may hold it; at tens of thousands of tokens/s the two threads convoy
and the server reaches well under the engine's own throughput. A process has its own GIL.

Shape:
* The child is *spawned* (safe with CUDA and with the parent's threads), loads the model itself, and sends
  back its `EngineInfo` and its tokenizer (so both sides tokenize identically), or why it failed.
* Parent -> child: lists of commands (`executor.Add`/`Abort`/`Limits`/`Stop`) on one pipe, framed as
  `multiprocessing.connection` frames them, written from the event loop without blocking (what a full
  pipe does not take waits in a buffer flushed by `add_writer`). A sender thread would cost the loop a
  GIL hand-off per request.
* Child -> parent: one message per engine iteration: outputs as plain tuples (pickling tuples of builtins
  costs a quarter of pickling the dataclasses, and this is paid per token), the step's stats and the KV
  usage. The parent reads them on the event loop (`add_reader`), and drains every message waiting in one
  go, so a busy loop gets several steps at once and each stream one merged chunk.
* Lifetimes: the child ignores SIGINT/SIGTERM (the server drains and then stops it with a Stop command).
  It dies with its parent at once (the kernel's parent-death signal; the closed command pipe too, later,
  where that signal does not exist), so it never outlives a killed server. A child that dies (OOM killer, a
  crash in native code) is seen as EOF: it is reaped, every stream fails, and the server exits non-zero
  (server/app.py watches for it) so that its supervisor starts a fresh one; restarting an engine in place
  would keep a process whose state nobody can vouch for.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import struct
import sys
import time
from typing import Any

from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import executor, outputs
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import errors

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0  # after a Stop, how long the child may take to abort and exit before it is killed
REAP_TIMEOUT_S = 1.0  # after the results pipe's EOF, how long the dead child may take to be collectable
MAX_MESSAGES_PER_READ = 64  # bounded work per loop callback, so a fast core cannot starve the other tasks

_FINISH_REASONS = {r.value: r for r in request_mod.FinishReason}

OutputTuple = tuple[str, list[int], str, bool, str | None, int | str | None, int, int, str | None]


def encode_output(out: outputs.RequestOutput) -> OutputTuple:
    reason = out.finish_reason.value if out.finish_reason is not None else None
    return (
        out.req_id,
        out.new_token_ids,
        out.text,
        out.finished,
        reason,
        out.stop_reason,
        out.num_prompt_tokens,
        out.num_output_tokens,
        out.error,
    )


def decode_output(t: OutputTuple) -> outputs.RequestOutput:
    reason = _FINISH_REASONS[t[4]] if t[4] is not None else None
    return outputs.RequestOutput(t[0], t[1], t[2], t[3], reason, t[5], t[6], t[7], t[8])


class EngineProcessError(RuntimeError):
    """The engine process failed to start or died."""


class ProcessExecutor:
    """Parent side: starts the child, sends commands, reads outputs on the event loop."""

    def __init__(
        self,
        *,
        process: multiprocessing.process.BaseProcess,
        commands: multiprocessing.connection.Connection,
        results: multiprocessing.connection.Connection,
        info: outputs.EngineInfo,
        tokenizer: Any,
        initial_limits: tuple[int, int],
    ) -> None:
        self.info = info
        self.tokenizer = tokenizer
        self.initial_limits = initial_limits
        # Both processes read the same CLOCK_MONOTONIC, so the child's TTFT counts from the arrival here.
        self.clock = time.monotonic
        self._process = process
        self._commands = commands
        self._results = results
        self._unsent = bytearray()  # framed commands the pipe did not take yet (loop thread only)
        self._sink: executor.OutputSink | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kv_usage = 0.0
        self._stopping = False
        self._closed = False
        self._dead = False

    @classmethod
    async def open(cls, config: config_mod.EngineConfig) -> ProcessExecutor:
        """Spawn the core and wait (off the loop) until its model is loaded.

        The child is started from the calling (event-loop) thread, not from a worker thread: the kernel's
        parent-death signal, which kills the child the instant this process dies, fires when the *thread*
        that forked it exits, and the loop's thread lives as long as the server.

        Raises what the child raised while loading (InvalidParameterError naming the field, ModelLoadError),
        or EngineProcessError if it exited without saying why."""
        ctx = multiprocessing.get_context("spawn")
        commands_rx, commands_tx = ctx.Pipe(duplex=False)
        results_rx, results_tx = ctx.Pipe(duplex=False)
        process = ctx.Process(
            target=run_child,
            args=(config, commands_rx, results_tx, _log_settings(), os.getpid()),
            name="fleetlm-engine-core",
            daemon=True,  # multiprocessing kills it if this process exits without stopping it
        )
        process.start()
        # Only the child holds these ends now: its exit (or ours) is then seen as EOF on the other side.
        commands_rx.close()
        results_tx.close()
        try:
            message = await asyncio.to_thread(results_rx.recv)
        except EOFError:
            message = None
        except BaseException:  # cancelled while loading (the server stops): do not leave the child behind
            process.kill()
            await asyncio.to_thread(process.join)
            commands_tx.close()
            results_rx.close()
            raise
        if message is None or message[0] != "ready":
            await asyncio.to_thread(process.join)
            commands_tx.close()
            results_rx.close()
            if message is None:
                raise EngineProcessError(f"the engine process exited (code {process.exitcode}) while loading")
            raise _rebuild_error(message)
        _, info, tokenizer = message
        return cls(
            process=process,
            commands=commands_tx,
            results=results_rx,
            info=info,
            tokenizer=tokenizer,
            initial_limits=(config.max_batch_size, config.max_batch_tokens),
        )

    # ----------------------------------------------------------------------------------------------
    # The executor interface

    def start(self, sink: executor.OutputSink) -> None:
        if self._sink is not None:
            return
        self._sink = sink
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._results.fileno(), self._read)
        os.set_blocking(self._commands.fileno(), False)

    def send(self, command: executor.Command) -> None:
        """Queue a command for the core. On the loop thread once started; never blocks there."""
        if self._closed:
            return
        if self._loop is None:  # not started (e.g. shut down before it ever ran): a plain blocking send
            self._commands.send([command])
            return
        payload = pickle.dumps([command], protocol=pickle.HIGHEST_PROTOCOL)
        self._unsent += struct.pack("!i", len(payload))
        self._unsent += payload
        if len(self._unsent) == len(payload) + 4:  # nothing was waiting before: try to write it now
            self._flush()

    def _flush(self) -> None:
        try:
            written = os.write(self._commands.fileno(), self._unsent)
        except BlockingIOError:
            written = 0
        except OSError:  # the child is gone; the reader reports it
            self._unsent.clear()
            written = 0
        del self._unsent[:written]
        assert self._loop is not None
        if self._unsent:
            self._loop.add_writer(self._commands.fileno(), self._flush)
        else:
            self._loop.remove_writer(self._commands.fileno())

    async def stop(self) -> None:
        """Stop the core (it aborts what is left and posts those outputs), wait for it, deliver the rest."""
        if self._closed:
            return
        self._stopping = True
        self.send(executor.Stop())
        await asyncio.to_thread(self._process.join, STOP_TIMEOUT_S)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within %.0fs; killing it", STOP_TIMEOUT_S)
            self._process.kill()
            await asyncio.to_thread(self._process.join)
        if self._sink is not None:
            self._read(limit=None)  # everything it posted before exiting
        self._close()

    @property
    def is_alive(self) -> bool:
        return not self._dead and self._process.is_alive()

    @property
    def kv_usage(self) -> float:
        """As of the core's last message (each engine iteration sends one)."""
        return self._kv_usage

    @property
    def pid(self) -> int | None:
        return self._process.pid

    # ----------------------------------------------------------------------------------------------
    # Parent internals

    def _read(self, limit: int | None = MAX_MESSAGES_PER_READ) -> None:
        """On the loop: take the messages waiting (at most `limit`), then deliver them at once."""
        produced: list[outputs.RequestOutput] = []
        stats: list[outputs.EngineStats] = []
        ended: str | None = None
        results = self._results
        taken = 0
        try:
            while (limit is None or taken < limit) and not results.closed and results.poll():
                taken += 1
                message = results.recv()
                if message[0] == "out":
                    produced.extend(map(decode_output, message[1]))
                    if message[2] is not None:
                        stats.append(message[2])
                    self._kv_usage = message[3]
                else:  # ("died", description): the child's loop raised; it exits next
                    ended = message[1]
        except (EOFError, OSError):
            if not self._stopping:
                self._reap()
            ended = ended or f"the engine process exited (code {self._process.exitcode})"
        sink = self._sink
        assert sink is not None
        if produced or stats:
            sink.deliver(produced, stats)
        if ended is not None:
            self._detach_reader()
            if not self._stopping:
                self._dead = True
                logger.error("%s", ended)
                sink.died(EngineProcessError(ended))

    def _reap(self) -> None:
        """Collect the dead child's exit status (its code goes into the error, and no zombie lingers). The
        pipe's EOF can come a moment before the kernel lets the exit be collected: a short wait, paid once."""
        self._process.join(REAP_TIMEOUT_S)

    def _detach_reader(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._results.fileno())
            self._loop.remove_writer(self._commands.fileno())

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._detach_reader()
        self._commands.close()
        self._results.close()


# --------------------------------------------------------------------------------------------------
# The child


def run_child(
    config: config_mod.EngineConfig,
    commands: multiprocessing.connection.Connection,
    results: multiprocessing.connection.Connection,
    log_settings: tuple[int, logging.Formatter | None],
    parent_pid: int,
) -> None:
    """The engine process: load, report, then serve commands until Stop or until the parent is gone."""
    die_with_parent(parent_pid)
    # The server decides when the engine stops (after its drain), not a signal sent to the process group.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _setup_child_logging(*log_settings)
    from fleetlm_runtime.engine import core as core_mod  # noqa: PLC0415  (torch: only this process loads it)

    try:
        core = core_mod.EngineCore(config)
    except BaseException as exc:
        if not isinstance(exc, request_mod.InvalidParameterError | errors.ModelLoadError):  # a bug: keep its trace
            logger.exception("the engine failed to load")
        results.send(_describe_error(exc))
        return
    results.send(("ready", core.info, core.tokenizer))

    def receive(block: bool) -> list[executor.Command]:
        received: list[executor.Command] = []
        if block:
            received.extend(commands.recv())  # EOFError when the parent is gone
        while commands.poll():
            received.extend(commands.recv())
        return received

    def post(produced: list[outputs.RequestOutput], stats: outputs.EngineStats | None) -> None:
        payload = ("out", [encode_output(o) for o in produced], stats, core.kv_usage)
        results.send_bytes(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))

    try:
        executor.serve(core, receive, post)
    except (EOFError, BrokenPipeError):
        logger.info("the server process is gone; the engine process exits")
    except BaseException as exc:
        logger.exception("the engine process failed")
        with contextlib.suppress(OSError):
            results.send(("died", f"the engine process failed: {exc!r}"))
        raise
    finally:
        core.close()


PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel SIGKILL this process the moment its parent dies (Linux), so a killed server never
    leaves its engine running on, holding the GPU and its memory, until the next pipe read notices. If the
    parent already died before this ran, exit now: the signal would never come."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent_pid:
        os._exit(0)


def _describe_error(exc: BaseException) -> tuple[str, str, str, str]:
    if isinstance(exc, request_mod.InvalidParameterError):
        return ("failed", "parameter", exc.param, exc.message)
    if isinstance(exc, errors.ModelLoadError):
        return ("failed", "model", "", str(exc))
    return ("failed", type(exc).__name__, "", str(exc))


def _rebuild_error(message: tuple[Any, ...]) -> Exception:
    _, kind, param, text = message
    if kind == "parameter":
        return request_mod.InvalidParameterError(param, text)
    if kind == "model":
        return errors.ModelLoadError(text)
    return EngineProcessError(f"the engine process failed to load: {kind}: {text}")


def _log_settings() -> tuple[int, logging.Formatter | None]:
    """The parent's root level and formatter, so the child's lines look like the server's (text or JSON)."""
    root = logging.getLogger()
    formatter = next((h.formatter for h in root.handlers if h.formatter is not None), None)
    try:
        pickle.dumps(formatter)
    except Exception:  # a formatter that cannot travel: the child uses the default format
        formatter = None
    return root.level, formatter


def _setup_child_logging(level: int, formatter: logging.Formatter | None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(formatter or logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logger.debug("engine process %d started", os.getpid())
