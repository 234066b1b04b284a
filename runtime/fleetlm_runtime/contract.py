"""The names the runtime, the router and the operator share: metrics, labels, HTTP paths, headers, config
version, and the one annotation the router writes for the operator.

This is the single source of these strings. The runtime declares its Prometheus families from the
constants here and the operator reads /metrics by the same constants, so renaming a metric breaks a
test rather than a production tuning loop. Standard library only: the operator imports this module
and must never pull in aiohttp, prometheus-client, torch or anything else through it.

Counters are named here as *families* (without `_total`); prometheus-client appends `_total` to the
exported sample, and `sample_name()` gives that spelling for readers of the text format.
"""

from __future__ import annotations

from typing import Final

# ------------------------------------------------------------------------------------------------
# Runtime configuration file

CONFIG_SCHEMA_VERSION: Final = "v1"
CONFIG_SCHEMA_VERSION_KEY: Final = "schemaVersion"

# ------------------------------------------------------------------------------------------------
# The LLMService annotation that fleetlm-router stamps on each request it serves or holds (at most once
# per activity interval); the operator's idle handler scales to zero from it. Here because the router
# imports nothing of the operator: both import this module (the operator's api/names.py re-exports it).

ANNOTATION_LAST_REQUEST: Final = "fleetlm.dev/last-request-at"

# ------------------------------------------------------------------------------------------------
# HTTP surface

PATH_COMPLETIONS: Final = "/v1/completions"
PATH_CHAT_COMPLETIONS: Final = "/v1/chat/completions"
PATH_MODELS: Final = "/v1/models"
PATH_HEALTH: Final = "/health"  # process alive (liveness)
PATH_READY: Final = "/ready"  # model loaded and not draining (readiness)
PATH_METRICS: Final = "/metrics"
PATH_ADMIN_CONFIG: Final = "/admin/config"  # GET the applied limits, PUT new ones (bearer token)
PATH_ADMIN_USAGE: Final = "/admin/usage"  # GET the usage ledger per (tenant, class) (bearer token)

# QoS: a class comes from the API key (`Authorization: Bearer <key>`, mapped in the runtime config).
# Only where the config allows it may a client name its class directly, by header or body field.
HEADER_QOS_CLASS: Final = "X-FleetLM-QoS-Class"
FIELD_QOS_CLASS: Final = "qos_class"  # extra body field (openai client: extra_body={"qos_class": ...})
HEADER_REQUEST_ID: Final = "X-Request-Id"
# On answers to cache-eligible (deterministic) requests: how the response cache served them.
HEADER_RESPONSE_CACHE: Final = "X-FleetLM-Response-Cache"
RESPONSE_CACHE_HIT: Final = "hit"  # replayed from the cache
RESPONSE_CACHE_SHARED: Final = "shared"  # an identical request was computing: its result was shared
RESPONSE_CACHE_MISS: Final = "miss"  # computed by the engine (and stored)

# QoS policies (`qos.policy` in the runtime config): `priority` orders by class priority and sheds
# sheddable classes under SLO pressure; `fifo` is the plain batcher (arrival order, one global queue bound).
QOS_POLICY_PRIORITY: Final = "priority"
QOS_POLICY_FIFO: Final = "fifo"
QOS_POLICIES: Final = (QOS_POLICY_PRIORITY, QOS_POLICY_FIFO)

# ------------------------------------------------------------------------------------------------
# Prometheus label names (bounded: never a request id, a prompt or a user)

LABEL_MODEL: Final = "model"
LABEL_QOS_CLASS: Final = "qos_class"
LABEL_FINISHED_REASON: Final = "finished_reason"  # stop | length | abort | error
LABEL_REASON: Final = "reason"  # rejection reasons below
LABEL_RESULT: Final = "result"  # hit | miss
LABEL_GPU: Final = "gpu"  # NVML device index
LABEL_TENANT: Final = "tenant"  # a key's digest from the API-keys file, or TENANT_OTHER (bounded)
LABEL_SOURCE: Final = "source"  # computed | prefix_cache (usage prompt tokens)
TENANT_OTHER: Final = "other"  # every client without a known API key

FINISHED_REASONS: Final = ("stop", "length", "abort", "error")

# 429, by cause: a queue is full (the global bound or the class's queueLimit), a sheddable class shed by the
# runtime's SLO guard, or shed by the operator (named in qos.shedClasses at max replicas). The metric's
# `reason` and the error body's `code` carry the same cause; the operator counts all three as demand it did
# not serve (REJECT_REASONS_OVERLOAD).
REJECT_QUEUE_FULL: Final = "queue_full"
REJECT_SHED_SLO: Final = "shed_slo_guard"
REJECT_SHED_TUNER: Final = "shed_tuner"
REJECT_REASONS_OVERLOAD: Final = (REJECT_QUEUE_FULL, REJECT_SHED_SLO, REJECT_SHED_TUNER)
CODE_QUEUE_FULL: Final = REJECT_QUEUE_FULL  # error codes of the 429 answers: the cause, as the metric names it
CODE_CLASS_SHED: Final = REJECT_SHED_TUNER
CODE_SLO_SHED: Final = REJECT_SHED_SLO
REJECT_TOO_LONG: Final = "too_long"  # 400: prompt (+ max_tokens) longer than the context
REJECT_INVALID: Final = "invalid"  # 400: malformed JSON, wrong types, out-of-range parameters
REJECT_TOO_LARGE: Final = "too_large"  # 413: request body over the limit
REJECT_DRAINING: Final = "draining"  # 503: SIGTERM received
REJECT_LOADING: Final = "loading"  # 503: model not loaded yet
REJECT_UNAUTHORIZED: Final = "unauthorized"  # 401: unknown API key where keys are required; 403: class raise
REJECT_REASONS: Final = (
    *REJECT_REASONS_OVERLOAD,
    REJECT_TOO_LONG,
    REJECT_INVALID,
    REJECT_TOO_LARGE,
    REJECT_DRAINING,
    REJECT_LOADING,
    REJECT_UNAUTHORIZED,
)

# ------------------------------------------------------------------------------------------------
# Metric families. vLLM equivalents in comments (vllm/v1/metrics/loggers.py); same semantics and
# buckets, `fleetlm_` prefix.

METRIC_PREFIX: Final = "fleetlm_"

# Gauges
NUM_REQUESTS_RUNNING: Final = "fleetlm_num_requests_running"  # {model, qos_class}; vllm:num_requests_running
NUM_REQUESTS_WAITING: Final = "fleetlm_num_requests_waiting"  # {model, qos_class}; vllm:num_requests_waiting
KV_CACHE_USAGE_PERC: Final = "fleetlm_kv_cache_usage_perc"  # {model}; 0..1 (blocks used / total); vllm's
KV_CACHE_BLOCKS_TOTAL: Final = "fleetlm_kv_cache_blocks_total"  # {model}; blocks in the pool; vllm num_gpu_blocks
KV_CACHE_BLOCKS_USED: Final = "fleetlm_kv_cache_blocks_used"  # {model}; blocks held by requests
KV_CACHE_POOL_BYTES: Final = "fleetlm_kv_cache_pool_bytes"  # {model}; KV memory allocated once at start
MODEL_WEIGHT_BYTES: Final = "fleetlm_model_weight_bytes"  # {model}; parameters and buffers
MODEL_LOAD_SECONDS: Final = "fleetlm_model_load_seconds"  # {model}; time to load the weights
BATCH_SIZE: Final = "fleetlm_batch_size"  # {model}; sequences in the latest step
CONFIG_INFO: Final = "fleetlm_config_info"  # {model, CONFIG_INFO_LABELS...} = 1; like vllm:cache_config_info
SERVER_READY: Final = "fleetlm_server_ready"  # {model}; 1 when /ready answers 200
# Start-up timestamps, unix seconds (Prometheus' process_start_time_seconds convention). The process start
# is always exported; the other two are absent until the moment happens (never 0), and keep the first time
# for the life of the process. ready - process start is the pod's own start-up time; counters only grow
# after ready, so a reader may count a pod's first scrape from the ready time.
PROCESS_START_TIME_SECONDS: Final = "fleetlm_process_start_time_seconds"  # {model}; like process_start_time_seconds
MODEL_LOADED_TIME_SECONDS: Final = "fleetlm_model_loaded_time_seconds"  # {model}; weights loaded, engine built
READY_TIME_SECONDS: Final = "fleetlm_ready_time_seconds"  # {model}; first /ready 200 (after the warm-up step)
GPU_UTILIZATION_RATIO: Final = "fleetlm_gpu_utilization_ratio"  # {model, gpu}; 0..1; NVML; absent on CPU
GPU_MEMORY_USED_BYTES: Final = "fleetlm_gpu_memory_used_bytes"  # {model, gpu}; NVML; absent on CPU
GPU_MEMORY_TOTAL_BYTES: Final = "fleetlm_gpu_memory_total_bytes"  # {model, gpu}; NVML; absent on CPU

# Counters (exported with `_total`)
PROMPT_TOKENS: Final = "fleetlm_prompt_tokens"  # {model, qos_class}; vllm:prompt_tokens
GENERATION_TOKENS: Final = "fleetlm_generation_tokens"  # {model, qos_class}; vllm:generation_tokens
REQUEST_SUCCESS: Final = "fleetlm_request_success"  # {model, qos_class, finished_reason}; vllm:request_success
REQUESTS_REJECTED: Final = "fleetlm_requests_rejected"  # {model, qos_class, reason}; TGI-style
NUM_PREEMPTIONS: Final = "fleetlm_num_preemptions"  # {model}; vllm:num_preemptions
PREFIX_CACHE_QUERIES: Final = "fleetlm_prefix_cache_queries"  # {model}; tokens; vllm:prefix_cache_queries
PREFIX_CACHE_HITS: Final = "fleetlm_prefix_cache_hits"  # {model}; tokens; vllm:prefix_cache_hits
RESPONSE_CACHE_LOOKUPS: Final = "fleetlm_response_cache_lookups"  # {model, result}
# Structured outputs: requests decoded under a grammar, by what constrained them.
STRUCTURED_REQUESTS: Final = "fleetlm_structured_requests"  # {model, kind}: json_object|json_schema|tool_call
# The usage ledger (server/ledger.py): per tenant and class; the same figures as GET /admin/usage.
USAGE_PROMPT_TOKENS: Final = "fleetlm_usage_prompt_tokens"  # {model, qos_class, tenant, source}
USAGE_GENERATION_TOKENS: Final = "fleetlm_usage_generation_tokens"  # {model, qos_class, tenant}
USAGE_RESPONSE_CACHE_TOKENS: Final = "fleetlm_usage_response_cache_tokens"  # {model, qos_class, tenant}
USAGE_ENGINE_SECONDS: Final = "fleetlm_usage_engine_seconds"  # {model, qos_class, tenant}

# Histograms
TIME_TO_FIRST_TOKEN_SECONDS: Final = "fleetlm_time_to_first_token_seconds"  # {model, qos_class}
INTER_TOKEN_LATENCY_SECONDS: Final = "fleetlm_inter_token_latency_seconds"  # {model}
REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS: Final = "fleetlm_request_time_per_output_token_seconds"  # {model, qos_class}
E2E_REQUEST_LATENCY_SECONDS: Final = "fleetlm_e2e_request_latency_seconds"  # {model, qos_class}
REQUEST_QUEUE_TIME_SECONDS: Final = "fleetlm_request_queue_time_seconds"  # {model, qos_class}
REQUEST_INFERENCE_TIME_SECONDS: Final = "fleetlm_request_inference_time_seconds"  # {model, qos_class}
REQUEST_PREFILL_TIME_SECONDS: Final = "fleetlm_request_prefill_time_seconds"  # {model, qos_class}
REQUEST_DECODE_TIME_SECONDS: Final = "fleetlm_request_decode_time_seconds"  # {model, qos_class}
REQUEST_PROMPT_TOKENS: Final = "fleetlm_request_prompt_tokens"  # {model}; 1-2-5 buckets to the context
REQUEST_GENERATION_TOKENS: Final = "fleetlm_request_generation_tokens"  # {model}; 1-2-5 buckets
ITERATION_TOKENS: Final = "fleetlm_iteration_tokens_total"  # {model}; tokens per step (vLLM's name, a histogram)
ITERATION_BATCH_SIZE: Final = "fleetlm_iteration_batch_size"  # {model}; sequences per step
GRAMMAR_COMPILE_SECONDS: Final = "fleetlm_grammar_compile_seconds"  # {model}; per grammar compiled (cache misses)

COUNTERS: Final = frozenset(
    {
        PROMPT_TOKENS,
        GENERATION_TOKENS,
        REQUEST_SUCCESS,
        REQUESTS_REJECTED,
        NUM_PREEMPTIONS,
        PREFIX_CACHE_QUERIES,
        PREFIX_CACHE_HITS,
        RESPONSE_CACHE_LOOKUPS,
        STRUCTURED_REQUESTS,
        USAGE_PROMPT_TOKENS,
        USAGE_GENERATION_TOKENS,
        USAGE_RESPONSE_CACHE_TOKENS,
        USAGE_ENGINE_SECONDS,
    }
)
GAUGES: Final = frozenset(
    {
        NUM_REQUESTS_RUNNING,
        NUM_REQUESTS_WAITING,
        KV_CACHE_USAGE_PERC,
        KV_CACHE_BLOCKS_TOTAL,
        KV_CACHE_BLOCKS_USED,
        KV_CACHE_POOL_BYTES,
        MODEL_WEIGHT_BYTES,
        MODEL_LOAD_SECONDS,
        BATCH_SIZE,
        CONFIG_INFO,
        SERVER_READY,
        PROCESS_START_TIME_SECONDS,
        MODEL_LOADED_TIME_SECONDS,
        READY_TIME_SECONDS,
        GPU_UTILIZATION_RATIO,
        GPU_MEMORY_USED_BYTES,
        GPU_MEMORY_TOTAL_BYTES,
    }
)
HISTOGRAMS: Final = frozenset(
    {
        TIME_TO_FIRST_TOKEN_SECONDS,
        INTER_TOKEN_LATENCY_SECONDS,
        REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS,
        E2E_REQUEST_LATENCY_SECONDS,
        REQUEST_QUEUE_TIME_SECONDS,
        REQUEST_INFERENCE_TIME_SECONDS,
        REQUEST_PREFILL_TIME_SECONDS,
        REQUEST_DECODE_TIME_SECONDS,
        REQUEST_PROMPT_TOKENS,
        REQUEST_GENERATION_TOKENS,
        ITERATION_TOKENS,
        GRAMMAR_COMPILE_SECONDS,
        ITERATION_BATCH_SIZE,
    }
)
# Exported only where NVML finds a GPU: a reader must treat their absence as "no GPU", never as zero.
GPU_METRICS: Final = frozenset({GPU_UTILIZATION_RATIO, GPU_MEMORY_USED_BYTES, GPU_MEMORY_TOTAL_BYTES})
# Declared from the start but without a series until their moment has come (a reader sees "not yet").
STARTUP_MOMENTS: Final = frozenset({MODEL_LOADED_TIME_SECONDS, READY_TIME_SECONDS})

# vLLM-named aliases, so an Inference Gateway endpoint picker (GIE/llm-d EPP, default engine "vllm") reads
# this runtime with no engineConfigs: totals over classes, labelled `model_name` (and `engine`) as vLLM v1
# does. Names are fixed by that protocol (landscape-2026.md, part b), not by our prefix.
VLLM_NUM_REQUESTS_WAITING: Final = "vllm:num_requests_waiting"  # {model_name, engine}; TotalQueuedRequests
VLLM_NUM_REQUESTS_RUNNING: Final = "vllm:num_requests_running"  # {model_name, engine}; TotalRunningRequests
VLLM_KV_CACHE_USAGE_PERC: Final = "vllm:kv_cache_usage_perc"  # {model_name, engine}; 0..1
VLLM_CACHE_CONFIG_INFO: Final = "vllm:cache_config_info"  # {block_size, num_gpu_blocks, engine} = 1
VLLM_LABEL_MODEL_NAME: Final = "model_name"
VLLM_LABEL_ENGINE: Final = "engine"
VLLM_ALIASES: Final = frozenset(
    {VLLM_NUM_REQUESTS_WAITING, VLLM_NUM_REQUESTS_RUNNING, VLLM_KV_CACHE_USAGE_PERC, VLLM_CACHE_CONFIG_INFO}
)

# The labels of CONFIG_INFO besides `model`: the limits in force, so the operator can confirm a push.
CONFIG_INFO_LABELS: Final = (
    "max_batch_size",
    "max_batch_tokens",
    "max_kv_tokens",
    "max_queue_len",
    "qos_classes",  # comma-separated class names, in priority order
    "default_qos_class",
    "prefix_cache",  # "true" | "false"
    "response_cache",  # "true" | "false"
    "schema_version",
    "qos_policy",  # QOS_POLICIES
    "shed_classes",  # comma-separated classes refused by the operator's push (qos.shedClasses); "" for none
    "kv_cache_memory",  # bytes of the KV pool (allocated at start; before it, the configured budget or "")
    "kv_block_size",  # tokens per KV block
    "kv_num_blocks",  # blocks in the pool ("" until the engine has started)
)

# vLLM's buckets (vllm/v1/metrics/loggers.py), so dashboards and percentiles line up.
TTFT_BUCKETS_S: Final = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS_S: Final = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S: Final = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
LABEL_STRUCTURED_KIND: Final = "kind"
STRUCTURED_KINDS: Final = ("json_object", "json_schema", "tool_call")
GRAMMAR_COMPILE_BUCKETS_S: Final = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
ITERATION_TOKENS_BUCKETS: Final = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to and including `max_value`."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


def sample_name(family: str) -> str:
    """The name a family's value has in the text exposition (`_total` for counters)."""
    return f"{family}_total" if family in COUNTERS else family
