"""Requests as the engine sees them: sampling parameters, lifecycle status and per-request state.

`SamplingParams` is the validated, immutable description of *how* to generate (OpenAI semantics);
`Request` is the mutable state of one generation inside the engine (tokens so far, how many of them
are in the KV cache, timings). Both are plain Python: this module must never import torch, the
tokenizer or anything from the server, so the scheduler and its tests stay fast.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from fleetlm_runtime.structured import spec as structured_spec

# OpenAI caps `stop` at 4 sequences; we allow a few more but keep it bounded, because every stop string
# is searched in the text tail on each step.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_LOGPROBS = 20  # OpenAI's cap on top_logprobs (and on the completions API's `logprobs`)
MAX_LOGIT_BIAS = 300  # OpenAI's cap on logit_bias entries


class InvalidParameterError(ValueError):
    """A request parameter is invalid; `param` names it so the HTTP layer can echo it (OpenAI `param`)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


class RequestStatus(enum.IntEnum):
    """Ordered so that `status > PREEMPTED` means finished (vLLM's convention)."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2  # back in the queue after preemption by recompute (its KV was freed)
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self)


class FinishReason(enum.StrEnum):
    """Why a stream ended, with the OpenAI spellings (`stop`, `length`) plus our `abort` and `error`."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction; errors name the parameter.

    `temperature == 0` (or `top_k == 1`) is greedy decoding. `max_tokens=None` means "up to the model's
    context length". `seed` makes sampling reproducible for this request whatever else is batched with
    it. Stop strings end generation as soon as they appear in the detokenized text; the text returned
    stops before them unless `include_stop_str_in_output`.
    """

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    detokenize: bool = True  # False skips text for token-only clients (saves work on every step)
    # Log-probabilities of each sampled token plus this many top alternatives (None: none at all). They are
    # of the model's raw distribution (a log-softmax of its logits before penalties, bias and temperature),
    # as vLLM returns by default, so they do not depend on how the token was picked.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (echo)
    presence_penalty: float = 0.0  # OpenAI: subtracted once from the logit of every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtracted per occurrence of the token in the output so far
    repetition_penalty: float = 1.0  # vLLM/HF: logits of prompt and output tokens divided (>0) or multiplied
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100]) added to the logits
    # Structured output: only tokens its grammar allows are sampled, and the model's EOS ends it once the
    # grammar is complete (EOS stops a constrained request even with ignore_eos: nothing may follow).
    constraint: structured_spec.Constraint | None = None

    def __post_init__(self) -> None:  # noqa: PLR0912 - one independent check per field, in field order
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise InvalidParameterError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise InvalidParameterError("temperature", f"must be in [0, 100], got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidParameterError("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidParameterError("top_k", f"must be -1, 0 (disabled) or >= 1, got {self.top_k!r}")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InvalidParameterError("seed", f"must be an integer in [0, 2**63), got {self.seed!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stop) > MAX_STOP_STRINGS:
            raise InvalidParameterError("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
        for item in stop:
            if not isinstance(item, str) or not item or len(item) > MAX_STOP_STRING_CHARS:
                raise InvalidParameterError(
                    "stop", f"stop strings must be non-empty strings of at most {MAX_STOP_STRING_CHARS} chars"
                )
        object.__setattr__(self, "stop", stop)
        if stop and not self.detokenize:
            raise InvalidParameterError("stop", "stop strings need text: they cannot be used with detokenize=False")
        token_ids = tuple(self.stop_token_ids)
        if any(not isinstance(t, int) or t < 0 for t in token_ids):
            raise InvalidParameterError("stop_token_ids", "must be non-negative integers")
        object.__setattr__(self, "stop_token_ids", token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise InvalidParameterError(name, f"must be an integer in [0, {MAX_LOGPROBS}], got {value!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise InvalidParameterError(name, f"must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 2.0:
            raise InvalidParameterError("repetition_penalty", f"must be in (0, 2], got {self.repetition_penalty!r}")
        bias = tuple((int(t), float(b)) for t, b in self.logit_bias)
        if len(bias) > MAX_LOGIT_BIAS:
            raise InvalidParameterError("logit_bias", f"at most {MAX_LOGIT_BIAS} entries, got {len(bias)}")
        for token, value in bias:
            if token < 0:
                raise InvalidParameterError("logit_bias", f"token ids must be non-negative, got {token}")
            if not math.isfinite(value) or not -100.0 <= value <= 100.0:
                raise InvalidParameterError("logit_bias", f"biases must be in [-100, 100], got {value!r}")
        object.__setattr__(self, "logit_bias", tuple(sorted(bias)))
        if self.constraint is not None and not isinstance(self.constraint, structured_spec.Constraint):
            raise InvalidParameterError("response_format", "must be a structured-output constraint")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def processes_logits(self) -> bool:
        """True when the logits change before picking (penalties, bias): the sampler's slower path."""
        return bool(
            self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0 or self.logit_bias
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True, eq=False)
class Request:
    """One generation inside the engine. Mutated only by the scheduler (and the engine core for stops).

    Token accounting follows vLLM's single-counter model: `num_computed_tokens` says how many of
    `prompt_token_ids + output_token_ids` already have KV in the cache. A prefill, a prefill chunk and a
    decode are the same thing: schedule `num_tokens - num_computed_tokens` more tokens.
    """

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    max_tokens: int  # resolved against the context length, never None
    stop_token_ids: frozenset[int]  # stop_token_ids plus the model's EOS ids unless ignore_eos
    arrival_time_s: float
    qos_class: str = "default"
    priority: int = 0  # lower runs sooner (vLLM semantics); the QoS issue maps classes onto it
    weight: float = 1.0  # its class's fair-share weight among classes of the same priority
    tenant: str = ""  # who sent it (a bounded label: a key's digest or one fold value), never the key
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    scheduled_time_s: float | None = None  # first admission into the running batch
    first_token_time_s: float | None = None
    last_token_time_s: float | None = None
    finished_time_s: float | None = None
    num_preemptions: int = 0
    # Prefix cache: chain hashes of the prompt's full blocks (computed on first admission).
    block_hashes: list[bytes] | None = None
    admit_seq: int = 0  # order of the latest admission into the running batch (preemption picks the newest)
    # Usage: prompt tokens found in the prefix cache at admissions (each recompute looks again), and
    # engine-seconds attributed by each step's token share.
    num_cached_tokens: int = 0
    engine_seconds: float = 0.0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def kv_reservation(self) -> int:
        """KV tokens this request may come to hold at most. Admission does not reserve them (a request holds
        the blocks its computed tokens fill); a request whose worst case exceeds the whole pool is refused."""
        return len(self.prompt_token_ids) + self.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status > RequestStatus.PREEMPTED

    def __lt__(self, other: Request) -> bool:
        # Priority queues order by (priority, arrival); lower priority value runs sooner.
        return (self.priority, self.arrival_time_s) < (other.priority, other.arrival_time_s)


def resolve_request(
    *,
    req_id: str,
    prompt_token_ids: Sequence[int],
    sampling_params: SamplingParams,
    max_model_len: int,
    vocab_size: int,
    eos_token_ids: frozenset[int],
    arrival_time_s: float,
    qos_class: str = "default",
    priority: int = 0,
    weight: float = 1.0,
    tenant: str = "",
) -> Request:
    """Validate a request against the model and build its engine state; errors name the parameter.

    The context check is the one users hit most: a prompt plus `max_tokens` longer than the context is
    refused here, before it can occupy a queue slot.
    """
    prompt = list(prompt_token_ids)
    if not prompt:
        raise InvalidParameterError("prompt", "the prompt must contain at least one token")
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt):
        raise InvalidParameterError("prompt", f"token ids must be integers in [0, {vocab_size})")
    if len(prompt) >= max_model_len:
        raise InvalidParameterError(
            "prompt",
            f"the prompt has {len(prompt)} tokens, but this model's context is {max_model_len} tokens "
            "and at least one must remain for output",
        )
    for token, _ in sampling_params.logit_bias:
        if token >= vocab_size:
            raise InvalidParameterError(
                "logit_bias", f"token id {token} is not in this model's vocabulary [0, {vocab_size})"
            )
    room = max_model_len - len(prompt)
    max_tokens = sampling_params.max_tokens
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise InvalidParameterError(
            "max_tokens",
            f"max_tokens={max_tokens} plus the prompt's {len(prompt)} tokens exceeds the model's context "
            f"of {max_model_len} tokens; request at most {room} tokens or shorten the prompt",
        )
    stop_ids = set(sampling_params.stop_token_ids)
    if not sampling_params.ignore_eos or sampling_params.constraint is not None:
        stop_ids |= eos_token_ids
    return Request(
        req_id=req_id,
        prompt_token_ids=prompt,
        sampling_params=sampling_params,
        max_tokens=max_tokens,
        stop_token_ids=frozenset(stop_ids),
        arrival_time_s=arrival_time_s,
        qos_class=qos_class,
        priority=priority,
        weight=_check_weight(weight),
        tenant=tenant,
    )


def _check_weight(weight: float) -> float:
    if not _is_number(weight) or not weight > 0:
        raise InvalidParameterError("weight", f"must be a number > 0, got {weight!r}")
    return float(weight)
