"""Small helpers for tests that drive real processes: poll for a condition, never sleep blindly."""

from __future__ import annotations

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
