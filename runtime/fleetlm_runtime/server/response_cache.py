"""The server's side of the response cache: which requests may use it, their key, and what is stored.

`key_for()` returns None for a request whose output is not fixed by its inputs (sampled without a seed)
or when the cache is off; otherwise the key covers the model section of the config (source, revision,
dtype, context length) and the served name, the rendered prompt's token ids, every field of the engine's
`SamplingParams` (so a parameter added there joins the key by itself: logit_bias, the structured-output
constraint), the request's fields that shape the answer beyond them (`n`, `echo`, tools and tool_choice,
which decide how the text is parsed) and the client's key digest, so
tenants never share answers (a hit would tell one what another asked). A `Recorder` collects what the
engine streamed for one request, and yields a `CachedResponse` only for a natural end (stop or length):
an abort, an error or a cut stream is never stored. No aiohttp here; sse.py replays hits. The store
itself (bounds, expiry, single-flight) is `caches/response_store.py`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fleetlm_runtime.caches import response_store
from fleetlm_runtime.engine import outputs
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.server import state as state_mod

_CACHEABLE = frozenset({request_mod.FinishReason.STOP, request_mod.FinishReason.LENGTH})
_FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)  # 0 and 0.0 must be one key


def key_for(
    state: state_mod.ServerState,
    *,
    prompt_ids: list[int],
    params: request_mod.SamplingParams,
    salt: str,
    n: int = 1,
    echo: bool = False,
    extra: dict[str, Any] | None = None,
) -> str | None:
    if state.response_cache is None:
        return None
    if not response_store.is_deterministic(temperature=params.temperature, top_k=params.top_k, seed=params.seed):
        return None
    if n != 1 or echo or params.logprobs is not None or params.prompt_logprobs is not None:
        # A stored answer is one choice's text: several choices, logprobs and the echoed prompt are not kept.
        return None
    sampling: dict[str, Any] = dataclasses.asdict(params)
    for name in _FLOAT_FIELDS:
        sampling[name] = float(sampling[name])
    sampling["n"], sampling["echo"] = n, echo  # the request's own fields that shape the answer
    if extra:  # e.g. tools and tool_choice, which decide how the same text is parsed into the answer
        sampling["extra"] = extra
    model = {"served": state.model_name, **state.config.model.model_dump(mode="json")}
    return response_store.make_key(model=model, prompt_token_ids=prompt_ids, sampling=sampling, salt=salt)


class Recorder:
    """What the engine streamed for one request, in the pieces it came in."""

    __slots__ = ("last", "pieces")

    def __init__(self) -> None:
        self.pieces: list[str] = []
        self.last: outputs.RequestOutput | None = None

    def add(self, out: outputs.RequestOutput) -> None:
        if out.text:
            self.pieces.append(out.text)
        self.last = out

    def result(self, *, num_prompt_tokens: int) -> response_store.CachedResponse | None:
        last = self.last
        if last is None or not last.finished or last.finish_reason not in _CACHEABLE:
            return None
        return response_store.CachedResponse(
            pieces=tuple(self.pieces),
            finish_reason=str(last.finish_reason),
            num_prompt_tokens=num_prompt_tokens,
            num_output_tokens=last.num_output_tokens,
        )
