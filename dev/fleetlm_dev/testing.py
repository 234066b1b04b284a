"""Small helpers for tests that drive real processes: poll for a condition (never sleep blindly), and stop
what the test started by its own PID."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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
