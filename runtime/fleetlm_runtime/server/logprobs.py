"""Log-probabilities in OpenAI's two response shapes, from the engine's (logprob, [(id, logprob)]) entries.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}`.
Completions: `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}`, where an
echoed prompt's first token has no logprob (None, as OpenAI and vLLM give it). A token's string is the
tokenizer's decoding of that token alone (vLLM's default), its `bytes` the UTF-8 of that string.
The values are of the model's raw distribution (see `engine/sampling.py`). No aiohttp, no engine here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Entry = tuple[float, list[tuple[int, float]]]
TokenString = Callable[[int], str]


def _item(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}


def chat(token_ids: Sequence[int], entries: Sequence[Entry], token_str: TokenString) -> dict[str, Any]:
    content = []
    for token_id, (logprob, top) in zip(token_ids, entries, strict=True):
        item = _item(token_str(token_id), logprob)
        item["top_logprobs"] = [_item(token_str(t), lp) for t, lp in top]
        content.append(item)
    return {"content": content}


class CompletionLogprobs:
    """The completions shape, built in pieces (a stream sends one per chunk; text_offset carries on)."""

    __slots__ = ("offset", "token_str")

    def __init__(self, token_str: TokenString) -> None:
        self.token_str = token_str
        self.offset = 0

    def piece(self, token_ids: Sequence[int], entries: Sequence[Entry | None]) -> dict[str, Any]:
        tokens: list[str] = []
        offsets: list[int] = []
        token_logprobs: list[float | None] = []
        tops: list[dict[str, float] | None] = []
        for token_id, entry in zip(token_ids, entries, strict=True):
            token = self.token_str(token_id)
            tokens.append(token)
            offsets.append(self.offset)
            self.offset += len(token)
            if entry is None:  # an echoed prompt's first token: nothing to condition it on
                token_logprobs.append(None)
                tops.append(None)
                continue
            logprob, top = entry
            token_logprobs.append(logprob)
            tops.append({self.token_str(t): lp for t, lp in top})
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}
