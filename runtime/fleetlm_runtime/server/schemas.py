"""OpenAI request bodies (pydantic, strict types) and the OpenAI error shape.

A body is parsed in two steps so every failure becomes a 400 that names its parameter: `parse_json()`
refuses malformed JSON (and NaN/Infinity, which JSON does not have), then `validate()` checks types and
ranges with OpenAI's semantics. Unknown fields are ignored, as OpenAI and vLLM do, so newer clients keep
working. Options we do not implement (best_of, suffix) are refused by name
rather than silently ignored. Nothing here touches the engine or aiohttp beyond building responses.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

import pydantic
from aiohttp import web

from fleetlm_runtime import contract

_M = TypeVar("_M", bound=pydantic.BaseModel)

MAX_PROMPTS = 64  # prompts in one completions request (OpenAI's batch form; each is a request to the engine)
MAX_PROMPT_CHARS = 4_000_000  # far above any context; a guard so a hostile body cannot make tokenizing slow
MAX_MESSAGES = 4096
MAX_N = 16  # choices per request: each is a sequence in the engine (sharing the prompt's cached blocks)
MAX_LOGIT_BIAS = 300  # OpenAI's cap


class APIError(Exception):
    """An error answered in OpenAI's shape. `reason` feeds the rejection counter (contract.REJECT_*)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        reason: str = contract.REJECT_INVALID,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.reason = reason
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status, headers=self.headers)


def invalid(param: str | None, message: str, *, reason: str = contract.REJECT_INVALID) -> APIError:
    return APIError(400, message, param=param, code="invalid_value" if param else None, reason=reason)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """The decoded body, or a 400 that says why it is not JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise invalid(None, "the request body is not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError) as error:
        raise invalid(None, f"the request body is not valid JSON: {error}") from None


class _Request(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)


class StreamOptions(_Request):
    include_usage: bool = False


# Parameters both endpoints share, with OpenAI's ranges.
NonNegInt = Annotated[int, pydantic.Field(ge=0, lt=2**63)]
StopField = Annotated[
    str
    | Annotated[list[Annotated[str, pydantic.Field(min_length=1, max_length=256)]], pydantic.Field(max_length=16)]
    | None,
    pydantic.Field(default=None),
]


class _Sampling(_Request):
    model: str | None = None  # OpenAI requires it; we check it against the served name in the handler
    max_tokens: Annotated[int, pydantic.Field(ge=1, le=1_000_000)] | None = None
    temperature: Annotated[float, pydantic.Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, pydantic.Field(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, pydantic.Field(ge=-1, le=1_000_000)] | None = None  # vLLM extension
    n: Annotated[int, pydantic.Field(ge=1, le=MAX_N)] | None = None
    seed: Annotated[int, pydantic.Field(ge=0, lt=2**63)] | None = None
    stop: StopField
    stop_token_ids: Annotated[list[NonNegInt], pydantic.Field(max_length=64)] | None = None  # vLLM extension
    ignore_eos: bool = False  # vLLM extension
    include_stop_str_in_output: bool = False  # vLLM extension
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, pydantic.Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, pydantic.Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, pydantic.Field(gt=0.0, le=2.0)] | None = None  # vLLM extension
    logit_bias: Annotated[dict[str, float], pydantic.Field(max_length=MAX_LOGIT_BIAS)] | None = None
    user: Annotated[str, pydantic.Field(max_length=256)] | None = None
    qos_class: Annotated[str, pydantic.Field(max_length=64)] | None = None  # see contract.FIELD_QOS_CLASS
    # Structured outputs (structured/formats.py checks it and names the bad field); completions take it as
    # vLLM's do, so a client on either API gets JSON that matches its schema.
    response_format: dict[str, Any] | None = None

    def refuse_unsupported(self) -> None:
        """OpenAI options we do not implement: refused by name, never silently ignored."""
        self.logit_bias_pairs()
        if self.stream_options is not None and not self.stream:
            raise invalid("stream_options", "stream_options is only allowed when stream is true")

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """OpenAI's {"token id": bias} as (id, bias) pairs; a key that is not a token id or a bias outside
        [-100, 100] is a 400 naming logit_bias (ids past the vocabulary are refused by the engine, also so)."""
        pairs: list[tuple[int, float]] = []
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit()) or len(key) > 12:
                raise invalid("logit_bias", f"keys must be token ids (non-negative integers), got {key[:40]!r}")
            if not -100.0 <= value <= 100.0:
                raise invalid("logit_bias", f"biases must be in [-100, 100], got {value!r} for token {key}")
            pairs.append((int(key), float(value)))
        return tuple(pairs)

    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


TokenIds = Annotated[list[Annotated[int, pydantic.Field(ge=0, lt=2**31)]], pydantic.Field(max_length=1_000_000)]


class CompletionRequest(_Sampling):
    prompt: (
        Annotated[str, pydantic.Field(max_length=MAX_PROMPT_CHARS)]
        | TokenIds
        | Annotated[
            list[Annotated[str, pydantic.Field(max_length=MAX_PROMPT_CHARS)]], pydantic.Field(max_length=MAX_PROMPTS)
        ]
        | Annotated[list[TokenIds], pydantic.Field(max_length=MAX_PROMPTS)]
    )
    echo: bool = False
    logprobs: Annotated[int, pydantic.Field(ge=0, le=20)] | None = None
    best_of: Annotated[int, pydantic.Field(ge=1, le=128)] | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.best_of not in (None, 1):
            raise invalid("best_of", "best_of is not supported; use n for several choices")
        if self.suffix:
            raise invalid("suffix", "suffix is not supported")

    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request: one, or the batch form's several (a list of strings or of id lists)."""
        prompt = self.prompt
        if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
            return [self.single_prompt()]
        return [p if isinstance(p, str) else list(p) for p in prompt]

    def single_prompt(self) -> str | list[int]:
        """The one prompt (a list of one is unwrapped); a batch of several is split before this is asked."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if not prompt:
            raise invalid("prompt", "the prompt must not be empty")
        first = prompt[0]
        if isinstance(first, int):
            return [t for t in prompt if isinstance(t, int)]
        if isinstance(first, str):
            return first
        return list(first)


class TextPart(_Request):
    type: Literal["text"]
    text: Annotated[str, pydantic.Field(max_length=MAX_PROMPT_CHARS)]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, pydantic.Field(max_length=MAX_PROMPT_CHARS)] | list[TextPart] | None = None
    name: Annotated[str, pydantic.Field(max_length=256)] | None = None
    # Tool calling: an assistant turn's calls (OpenAI's shape, checked in server/tools.py) and the id of the
    # call a `tool` message answers.
    tool_calls: Annotated[list[dict[str, Any]], pydantic.Field(max_length=128)] | None = None
    tool_call_id: Annotated[str, pydantic.Field(max_length=256)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], pydantic.Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: Annotated[int, pydantic.Field(ge=1, le=1_000_000)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, pydantic.Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None  # checked by server/tools.py, which names the bad field
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_generation_prompt: bool = True  # vLLM extension

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs needs logprobs set to true")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise invalid("max_completion_tokens", "max_tokens and max_completion_tokens disagree")

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def validate(model: type[_M], data: Any) -> _M:
    """Validate a decoded body; a 400 naming the first bad parameter otherwise."""
    if not isinstance(data, dict):
        raise invalid(None, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as error:
        raise _validation_error(error) from None


def _validation_error(error: pydantic.ValidationError) -> APIError:
    errors = error.errors(include_url=False, include_input=False)
    first = errors[0]
    param = str(first["loc"][0]) if first["loc"] else None
    if param and first["type"] == "missing":
        return invalid(param, f"{param} is required", reason=contract.REJECT_INVALID)
    # A union reports one error per member; the message names the parameter and what it accepts.
    details = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors if e["loc"] and str(e["loc"][0]) == param
    )
    return invalid(param, f"invalid {param}: {details[:500]}" if param else details[:500])
