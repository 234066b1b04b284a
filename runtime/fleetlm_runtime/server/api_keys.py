"""The API-keys file, reloaded while the server runs: a rotated Secret takes effect without a restart.

Kubernetes updates a mounted Secret by swapping a symlink (`..data`) to a new directory, so the file's
content changes under the same path. A background task reads the (small) file every `interval_s`
seconds and, when its bytes changed, validates it with `config.load_api_keys` and swaps the server's key
map in one assignment. Requests already admitted keep the class they were given, and nothing is dropped:
the swap happens between two requests on the event loop. A file that fails validation (a half-written
edit, an unknown class) is refused whole: the keys in force stay, and the error is logged (once per bad
version) and counted, so a typo never locks every client out. This module must never log a key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import pathlib
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from fleetlm_runtime import config as config_mod
from fleetlm_runtime.server import state as state_mod

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0  # the kubelet itself syncs Secret volumes every minute or so; this adds little


class KeyFileWatcher:
    """Reloads `path` into `state.api_keys` when its content changes (see the module docstring)."""

    def __init__(self, state: state_mod.ServerState, path: str | pathlib.Path) -> None:
        self._state = state
        self._path = pathlib.Path(path)
        self._digest = self._read_digest()  # the version the server started with (loaded by the caller)
        self.num_reloads = 0
        self.num_errors = 0

    def _read_digest(self) -> bytes | None:
        try:
            return hashlib.sha256(self._path.read_bytes()).digest()
        except OSError:
            return None  # gone for a moment (mid-swap); the next poll sees the new version

    def poll(self) -> bool:
        """Reload if the file changed; True when new keys are now in force."""
        digest = self._read_digest()
        if digest is None or digest == self._digest:
            return False
        self._digest = digest  # a bad version is reported once, not at every poll
        classes = {c.name for c in self._state.config.qos.classes}
        try:
            keys = config_mod.load_api_keys(self._path, classes=classes)
        except config_mod.ConfigError as error:
            self.num_errors += 1
            log.error(
                "API keys file changed but is invalid; keeping the %d keys in force: %s",
                len(self._state.api_keys),
                error,
            )
            return False
        self._state.api_keys = keys
        self.num_reloads += 1
        log.info("API keys reloaded from %s: %d keys", self._path, len(keys))
        return True


def watch_ctx(
    state: state_mod.ServerState, path: str | pathlib.Path, *, interval_s: float = DEFAULT_INTERVAL_S
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A `cleanup_ctx` that polls the key file for as long as the app runs."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        watcher = KeyFileWatcher(state, path)
        app[watcher_key] = watcher

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval_s)
                try:
                    watcher.poll()
                except Exception:  # never let a reload bug take the watcher (or the server) down
                    log.exception("API keys reload failed")

        task = asyncio.create_task(loop(), name="fleetlm-api-keys-watch")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return ctx


watcher_key = web.AppKey("api_keys_watcher", KeyFileWatcher)
