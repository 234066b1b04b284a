"""Incremental detokenization for streaming, and stop strings, per request.

Text is produced token by token with the tokenizers library's `DecodeStream` (Rust, about a microsecond a
token), which holds back incomplete UTF-8 sequences and keeps the spacing a full `decode()` would give.
Stop strings are searched only in the tail that the new text could complete, and while a request has
stop strings the last `max(len(stop)) - 1` characters are held back from the stream, so a client never
sees the beginning of a stop string that then turns out to end the text (vLLM does the same).

Pure Python on top of `tokenizers`; must never import torch or the engine's scheduling modules.
"""

from __future__ import annotations

from typing import Any

from tokenizers.decoders import DecodeStream

_PRIME_TOKENS = 4  # prompt tokens fed to the stream first, so the first output token decodes in context


class IncrementalDetokenizer:
    """Turns one request's output tokens into text deltas and finds its stop strings."""

    __slots__ = ("_backend", "_hold", "_include_stop", "_sent", "_stop", "_stream", "_text")

    def __init__(
        self,
        tokenizer: Any,
        *,
        prompt_token_ids: list[int],
        stop: tuple[str, ...] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        prime = prompt_token_ids[-_PRIME_TOKENS:]
        if prime:
            # Decoding the prompt tail first makes the first output token decode with its leading space
            # (e.g. SentencePiece's "▁"), as it would inside a full decode.
            self._stream.step(self._backend, prime)
        self._stop = stop
        self._include_stop = include_stop_str_in_output
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._text = ""  # full output text, kept only when there are stop strings
        self._sent = 0  # characters of _text already returned

    def step(self, token_id: int, *, finished: bool) -> tuple[str, str | None]:
        """Add one token; returns (text delta to stream, the stop string that matched or None)."""
        piece = self._stream.step(self._backend, token_id) or ""
        if not self._stop:
            return piece, None
        return self._step_with_stops(piece, finished)

    def _step_with_stops(self, piece: str, finished: bool) -> tuple[str, str | None]:
        text = self._text
        search_from = max(0, len(text) - self._hold)
        text += piece
        match: tuple[int, str] | None = None
        for stop in self._stop:
            index = text.find(stop, search_from)
            if index >= 0 and (match is None or index < match[0]):
                match = (index, stop)  # the earliest stop wins, whatever its order in the list
        if match is not None:
            index, stop = match
            self._text = text[: index + len(stop) if self._include_stop else index]
            return self._flush(), stop
        self._text = text
        if finished:
            return self._flush(), None
        ready = len(text) - self._hold
        if ready <= self._sent:
            return "", None
        delta = text[self._sent : ready]
        self._sent = ready
        return delta, None

    def flush(self) -> str:
        """Whatever is still held back (the request ended for another reason)."""
        return self._flush() if self._stop else ""

    def _flush(self) -> str:
        delta = self._text[self._sent :]
        self._sent = len(self._text)
        return delta
