"""Plain data that crosses the engine's internal and external boundaries.

`SchedulerOutput` (scheduler -> runner), `RunnerOutput` (runner -> scheduler), `RequestOutput` (engine ->
client stream) and `EngineStats` (engine -> metrics, once per step). Lists rather than tensors, with the
length of each list in a comment, as vLLM does. No torch and no behaviour here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from fleetlm_runtime.engine import request as request_mod


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What a client of the engine needs to know about it, fixed once the model is loaded. It crosses the
    process boundary when the engine core runs in its own process, so requests are validated (and refused,
    naming the parameter) before they are sent."""

    model_id: str
    max_model_len: int  # context length in tokens (prompt + output)
    vocab_size: int  # ids the model can emit
    eos_token_ids: frozenset[int]
    kv_capacity_tokens: int  # tokens the KV pool holds (kv_num_blocks * kv_block_size)
    forward_name: str  # "modules" or "llama-fast"
    kv_block_size: int = 16  # tokens per KV block
    kv_num_blocks: int = 0  # blocks requests can hold (the pool also has one null block)
    kv_pool_bytes: int = 0  # bytes of KV tensors allocated at start, all layers, null block included
    kv_budget_source: str = (
        ""  # what sized the pool: "memory", "max_kv_tokens", "gpu_memory_utilization", "cpu_default"
    )
    weight_bytes: int = 0  # parameters and buffers of the model
    load_seconds: float = 0.0  # time to load the model (0 when the engine was given a loaded model)


@dataclass(frozen=True, slots=True)
class NewRequestData:
    """Sent to the runner once, on the step a request is admitted."""

    req_id: str
    prompt_token_ids: list[int]
    sampling_params: request_mod.SamplingParams
    # Its block table in the KV pool so far. A prefix-cache hit puts the shared cached blocks first: they
    # hold the KV of the first num_computed_tokens tokens, which the scheduler does not schedule.
    block_ids: tuple[int, ...] = ()


@dataclass(slots=True)
class SchedulerOutput:
    """What runs in one step. Requests appear in batch order; all per-request lists align."""

    new_reqs: list[NewRequestData]  # [num_new] admitted this step (they also appear in req_ids)
    req_ids: list[str]  # [num_reqs]
    num_scheduled_tokens: list[int]  # [num_reqs]
    num_computed_tokens: list[int]  # [num_reqs] position of each request's first scheduled token
    do_sample: list[bool]  # [num_reqs] True when this step reaches the end of the request's known tokens
    input_token_ids: list[int]  # [total_num_tokens] each request's scheduled tokens, in batch order
    finished_req_ids: list[str]  # [num_finished] requests that left since the previous step: free their KV
    num_prefill_tokens: int = 0  # prompt tokens in this step (the rest are decode tokens)
    preempted_req_ids: list[str] = field(default_factory=list)  # also in finished_req_ids: state to park
    # Blocks appended this step to the tables of requests admitted earlier (only those that got some).
    new_block_ids: list[tuple[str, list[int]]] = field(default_factory=list)

    @property
    def total_num_tokens(self) -> int:
        return len(self.input_token_ids)

    @property
    def num_reqs(self) -> int:
        return len(self.req_ids)

    @classmethod
    def make_empty(cls, finished_req_ids: list[str] | None = None) -> SchedulerOutput:
        return cls(
            new_reqs=[],
            req_ids=[],
            num_scheduled_tokens=[],
            num_computed_tokens=[],
            do_sample=[],
            input_token_ids=[],
            finished_req_ids=finished_req_ids or [],
        )


@dataclass(slots=True)
class RunnerOutput:
    """Tokens sampled in one step, for the requests whose `do_sample` was set. Rows are in the runner's order
    (decode rows grouped by length), not the batch's: readers match them by `req_ids`, never by position."""

    req_ids: list[str]  # [num_sampled]
    sampled_token_ids: list[int]  # [num_sampled]
    # [num_sampled] when some request asked: (sampled token's logprob, [(token id, logprob)] top ones) or
    # None per row; None when none did (the common case costs nothing)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    # Requests that asked for prompt logprobs, on the step they sample their first token: one entry per
    # prompt token (None for the first)
    prompt_logprobs: dict[str, list[tuple[float, list[tuple[int, float]]] | None]] = field(default_factory=dict)


@dataclass(slots=True)
class RequestOutput:
    """One chunk of a request's stream: the tokens (and text) produced since the previous chunk."""

    req_id: str
    new_token_ids: list[int]  # [num_new_tokens], usually one
    text: str  # detokenized delta; "" when detokenize is off or text is held back at a stop-string prefix
    finished: bool
    finish_reason: request_mod.FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended the request
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    error: str | None = None  # set with finish_reason == ERROR
    # Aligned with new_token_ids when the request asked for logprobs: (logprob, [(token id, logprob)] top).
    logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    # Once, on the first output of a request that asked for prompt logprobs: one entry per prompt token
    # (None for the first, which has no context), like `logprobs`.
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None


class EventKind(enum.StrEnum):
    SCHEDULED = "scheduled"  # left the queue and got KV (queue time = time_s - arrival_time_s)
    FIRST_TOKEN = "first_token"  # TTFT = time_s - arrival_time_s
    FINISHED = "finished"  # e2e = time_s - arrival_time_s; the other fields are filled in


@dataclass(frozen=True, slots=True)
class RequestEvent:
    kind: EventKind
    req_id: str
    qos_class: str
    time_s: float  # time.monotonic() of the event
    arrival_time_s: float
    finish_reason: request_mod.FinishReason | None = None  # FINISHED only
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    scheduled_time_s: float | None = None  # FINISHED only; None if it never left the queue
    first_token_time_s: float | None = None  # FINISHED only; None if it produced no token
    # FINISHED only, for the usage ledger: who sent it (a bounded label, never a key), how many of its
    # prompt tokens the prefix cache served at its first admission, and the engine-seconds attributed to it
    # (each step's duration split by the tokens each request had in it).
    tenant: str = ""
    num_cached_tokens: int = 0
    engine_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class EngineStats:
    """One step's figures, handed to the stats callback (Prometheus lives behind it, not here)."""

    now_s: float  # time.monotonic() at the end of the step
    step_duration_s: float  # wall time of schedule + execute + update
    model_duration_s: float  # of which in the model's forward and output head (the rest is engine overhead)
    batch_size: int  # sequences in this step
    num_tokens: int  # tokens in this step (prefill + decode)
    num_prefill_tokens: int
    num_decode_tokens: int
    num_running: int
    num_waiting: int
    running_by_class: dict[str, int]
    waiting_by_class: dict[str, int]
    kv_usage: float  # KV blocks in use / blocks in the pool, in [0, 1]
    num_kv_tokens_reserved: int  # tokens of the KV blocks in use (whole blocks)
    kv_capacity_tokens: int
    max_batch_size: int  # limits in force for this step (so a pushed change can be confirmed)
    max_batch_tokens: int
    events: tuple[RequestEvent, ...] = ()
    # One entry per decode token in this step: time since that request's previous token.
    inter_token_latencies_s: tuple[float, ...] = field(default=())
    num_preemptions: int = 0  # requests preempted (recompute) in this step
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache in this step
    prefix_cache_hits: int = 0  # of which found (their prefill was skipped)
    prefix_cache_tokens: int = 0  # tokens in blocks indexed by the prefix cache after this step
    kv_blocks_total: int = 0  # blocks in the pool that requests can hold
    kv_blocks_used: int = 0  # of which held by requests after this step
    grammar_compile_s: tuple[float, ...] = ()  # structured outputs: each grammar compiled in this step
