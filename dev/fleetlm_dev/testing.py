"""Small helpers for tests that drive real processes: poll for a condition (never sleep blindly), and stop
what the test started by its own PID."""

from __future__ import annotations

import pathlib
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from fleetlm_runtime.engine.outputs import RequestOutput
    from fleetlm_runtime.engine.request import SamplingParams

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (servers that tests start bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class WaitTimeout(AssertionError):
    """Raised when a polled condition did not hold in time; the message names the condition."""


def wait_for(what: str, probe: Callable[[], T | None], *, timeout_s: float = 60, interval_s: float = 0.25) -> T:
    """Poll `probe` until it returns something truthy and return that; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout_s
    last: T | None = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise WaitTimeout(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")
        time.sleep(interval_s)


def stop_process(proc: subprocess.Popen[bytes], *, timeout_s: float = 30) -> int:
    """Stop a process this test started: SIGTERM (so it can drain), SIGKILL after `timeout_s`; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait()


def children_of(pid: int) -> list[int]:
    """The PIDs of `pid`'s children (Linux lists them per thread that forked them, so all threads)."""
    tasks = pathlib.Path(f"/proc/{pid}/task").iterdir()
    return [int(c) for task in tasks for c in (task / "children").read_text().split()]


def is_running(pid: int) -> bool:
    """Whether `pid` exists and is not a zombie (exited, not yet reaped: gone for our purposes)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(") ", 1)[1][0] != "Z"


def greedy(max_tokens: int, **extra: Any) -> SamplingParams:
    """Sampling parameters for a deterministic request (temperature 0) of `max_tokens`."""
    from fleetlm_runtime.engine.request import SamplingParams  # noqa: PLC0415  (operator tests need no runtime)

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


async def collect(stream: AsyncIterator[RequestOutput]) -> tuple[list[int], str, RequestOutput]:
    """Drain an engine stream: all its token ids, its text, and its last (finished) output."""
    tokens: list[int] = []
    text = ""
    last = None
    async for out in stream:
        tokens.extend(out.new_token_ids)
        text += out.text
        last = out
    assert last is not None and last.finished
    return tokens, text, last
