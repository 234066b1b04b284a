"""Model errors, importable without torch (the server process reports them; only the engine loads models)."""

from __future__ import annotations


class ModelLoadError(ValueError):
    """The model cannot be loaded or is not supported; the message says what to do instead."""
