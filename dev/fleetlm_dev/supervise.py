"""Processes kept running the way a Deployment keeps its pods' containers running (restartPolicy Always).

`Supervised` runs one command, and when it exits, for whatever reason, starts it again after a backoff
(doubling from `initial_backoff_s` up to `max_backoff_s`, reset once a run lasted `reset_after_s`), as
the kubelet does, with faster defaults for tests. `stop()` ends it for good (SIGTERM, then SIGKILL) and
stops restarting. Each run appends to one log file, so a test can read the whole history.

Used by the end-to-end suite and the cluster tests for operator replicas: an operator that steps down
exits, and must come back as a standby, as its pod would. Only for tests and the demo.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence

from fleetlm_dev import testing


@dataclasses.dataclass(frozen=True, slots=True)
class Exit:
    pid: int
    code: int
    at_s: float  # time.monotonic() when the exit was seen


class Backoff:
    """The kubelet's CrashLoopBackOff, scaled down: how long to wait before the next start."""

    def __init__(self, *, initial_s: float = 1.0, max_s: float = 10.0, reset_after_s: float = 20.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.reset_after_s = reset_after_s
        self._next_s = initial_s

    def after_exit(self, ran_s: float) -> float:
        """The delay before restarting a process that ran for `ran_s`."""
        if ran_s >= self.reset_after_s:
            self._next_s = self.initial_s
        delay = self._next_s
        self._next_s = min(self.max_s, self._next_s * 2)
        return delay


class Supervised:
    def __init__(
        self,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        log_path: pathlib.Path,
        backoff: Backoff | None = None,
    ) -> None:
        self.command = list(command)
        self.env = dict(env)
        self.log_path = log_path
        self.backoff = backoff or Backoff()
        self.exits: list[Exit] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._proc = self._spawn()
        self._started_at = time.monotonic()
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{log_path.stem}", daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc.poll() is None else None

    @property
    def restarts(self) -> int:
        return len(self.exits)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> int | None:
        """SIGKILL the current process (a crash); the supervisor restarts it. Returns the PID killed."""
        with self._lock:
            if self._proc.poll() is not None:
                return None
            self._proc.kill()
            return self._proc.pid

    def stop(self, *, timeout_s: float = 30) -> None:
        self._stopping.set()
        with self._lock:
            proc = self._proc
        testing.stop_process(proc, timeout_s=timeout_s)
        self._thread.join(timeout=5)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log_path.open("ab") as log:
            return subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _watch(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            code = proc.wait()
            if self._stopping.is_set():
                return
            now = time.monotonic()
            self.exits.append(Exit(pid=proc.pid, code=code, at_s=now))
            delay = self.backoff.after_exit(now - self._started_at)
            if self._stopping.wait(delay):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                with self.log_path.open("ab") as log:
                    log.write(f"--- supervisor: exited {code}, restarted after {delay:.1f}s ---\n".encode())
                self._proc = self._spawn()
                self._started_at = time.monotonic()


def console_script_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
