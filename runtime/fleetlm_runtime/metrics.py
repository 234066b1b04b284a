"""Prometheus collectors for the runtime, fed from the engine's per-step `EngineStats`.

Names, labels and buckets come from `contract` (vLLM's semantics under the `fleetlm_` prefix). Every
collector lives on a private `CollectorRegistry`, so two apps in one process (tests) never collide and
nothing leaks into the global registry. Labels are bounded: model, qos_class, finished_reason, reason,
result, gpu; never a request id. This module depends on the engine's data types; the engine must never
import it (as with vLLM's stat loggers), and it must never block: `record()` runs on the event loop.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

import prometheus_client
from prometheus_client import core, process_collector, registry

from fleetlm_runtime import config as config_mod
from fleetlm_runtime import contract, exposition, gpu
from fleetlm_runtime.engine import outputs
from fleetlm_runtime.server import ledger as ledger_mod

CONTENT_TYPE = prometheus_client.CONTENT_TYPE_LATEST
_M = contract.LABEL_MODEL
_C = contract.LABEL_QOS_CLASS

# When this module was imported: the process start where /proc cannot say (not Linux).
_IMPORTED_AT_S = time.time()


def process_start_time_s() -> float:
    """When this process started, unix seconds: what prometheus-client's process collector reports as
    `process_start_time_seconds` (from /proc), else the time this module was imported. The runtime's
    registry is private and has no process collector, so the value is exported once, under the prefix."""
    collector = process_collector.ProcessCollector(registry=None)
    for family in collector.collect():
        if family.name == "process_start_time_seconds" and family.samples:
            return float(family.samples[0].value)
    return _IMPORTED_AT_S


# Latencies are observed only for requests that ran to their natural end; an abort's "e2e" is the
# time the client gave up, which would drag percentiles toward whatever timeout the client had.
_COMPLETED = frozenset({"stop", "length"})


class _ConfigInfoCollector(registry.Collector):
    """`fleetlm_config_info{...} 1` with exactly one label set: the limits in force now."""

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name
        self._labels: dict[str, str] = {}

    def set(self, labels: dict[str, str]) -> None:
        self._labels = dict(labels)  # swapped whole, so a scrape never sees half an update

    def collect(self) -> Iterator[core.Metric]:
        if not self._labels:
            return
        names = [_M, *contract.CONFIG_INFO_LABELS]
        family = core.GaugeMetricFamily(
            contract.CONFIG_INFO, "Limits and switches in force (value 1); the labels carry them.", labels=names
        )
        family.add_metric([self._model_name, *(self._labels[n] for n in contract.CONFIG_INFO_LABELS)], 1.0)
        yield family


class _VllmAliasCollector(registry.Collector):
    """The four series an Inference Gateway endpoint picker reads by default, under vLLM's names.

    Values are totals kept by `RuntimeMetrics` as plain numbers at each engine step, so a scrape costs a
    few string formats (the picker scrapes every 50 ms). Block size and count: the KV config's
    `blockSize` and the engine's KV capacity in tokens divided by it (absent until the engine reports it).
    """

    def __init__(self, model_name: str) -> None:
        self._model_name = model_name
        self.waiting = 0
        self.running = 0
        self.kv_usage = 0.0
        self.block_size: int | None = None
        self.num_blocks: int | None = None

    def collect(self) -> Iterator[core.Metric]:
        labels = [contract.VLLM_LABEL_MODEL_NAME, contract.VLLM_LABEL_ENGINE]
        values = [self._model_name, "0"]
        for name, doc, value in (
            (contract.VLLM_NUM_REQUESTS_WAITING, "Requests waiting (all classes; vLLM's name).", self.waiting),
            (contract.VLLM_NUM_REQUESTS_RUNNING, "Requests running (all classes; vLLM's name).", self.running),
            (contract.VLLM_KV_CACHE_USAGE_PERC, "KV-cache usage, 0..1 (vLLM's name).", self.kv_usage),
        ):
            family = core.GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric(values, float(value))
            yield family
        if self.block_size is not None and self.num_blocks is not None:
            info = core.GaugeMetricFamily(
                contract.VLLM_CACHE_CONFIG_INFO, "KV-cache configuration (vLLM's name); value 1.",
                labels=["block_size", "num_gpu_blocks", contract.VLLM_LABEL_ENGINE],
            )  # fmt: skip
            info.add_metric([str(self.block_size), str(self.num_blocks), "0"], 1.0)
            yield info


class _GpuCollector(registry.Collector):
    """Samples NVML at scrape time, so idle pods cost nothing; yields nothing on CPU machines."""

    def __init__(self, model_name: str, sampler: gpu.NvmlSampler) -> None:
        self._model_name = model_name
        self._sampler = sampler

    def collect(self) -> Iterator[core.Metric]:
        samples = self._sampler.sample()
        labels = [_M, contract.LABEL_GPU]
        util = core.GaugeMetricFamily(contract.GPU_UTILIZATION_RATIO, "GPU busy fraction (NVML), 0..1.", labels=labels)
        used = core.GaugeMetricFamily(contract.GPU_MEMORY_USED_BYTES, "GPU memory in use (NVML).", labels=labels)
        total = core.GaugeMetricFamily(contract.GPU_MEMORY_TOTAL_BYTES, "GPU memory size (NVML).", labels=labels)
        for s in samples:
            values = [self._model_name, str(s.index)]
            util.add_metric(values, s.utilization_ratio)
            used.add_metric(values, float(s.memory_used_bytes))
            total.add_metric(values, float(s.memory_total_bytes))
        yield from (util, used, total)


class RuntimeMetrics:
    """All runtime collectors. `record()` takes one engine step; the server adds rejections."""

    def __init__(  # noqa: PLR0915 - one statement per collector, all declared here: the list reads as the contract
        self,
        *,
        model_name: str,
        max_model_len: int,
        qos_classes: Sequence[str] = ("default",),
        gpu_sampler: gpu.NvmlSampler | None = None,
    ) -> None:
        # `_created` series double the payload and read as extra gauge families to text parsers (the
        # operator's among them); vLLM-style scrapers do not use them. This switch is process-wide.
        prometheus_client.disable_created_metrics()
        self.model_name = model_name
        self.model_loaded_at_s: float | None = None
        self.ready_at_s: float | None = None
        self.registry = registry.CollectorRegistry(auto_describe=True)
        self._exposition = exposition.CachedExposition()
        r = self.registry
        m = model_name
        by_class = [_M, _C]

        self._running = prometheus_client.Gauge(
            contract.NUM_REQUESTS_RUNNING, "Requests in the running batch.", by_class, registry=r
        )
        self._waiting = prometheus_client.Gauge(
            contract.NUM_REQUESTS_WAITING, "Requests waiting to be scheduled.", by_class, registry=r
        )
        self._kv_usage = prometheus_client.Gauge(
            contract.KV_CACHE_USAGE_PERC, "KV-cache blocks in use / blocks in the pool, 0..1.", [_M], registry=r
        ).labels(m)
        # The KV pool and the weights, fixed once the engine has started (zero before).
        self._kv_blocks_total = prometheus_client.Gauge(
            contract.KV_CACHE_BLOCKS_TOTAL, "KV-cache blocks in the pool.", [_M], registry=r
        ).labels(m)
        self._kv_blocks_used = prometheus_client.Gauge(
            contract.KV_CACHE_BLOCKS_USED, "KV-cache blocks held by requests.", [_M], registry=r
        ).labels(m)
        self._kv_pool_bytes = prometheus_client.Gauge(
            contract.KV_CACHE_POOL_BYTES, "Bytes of the KV-cache pool, allocated once at start.", [_M], registry=r
        ).labels(m)
        self._weight_bytes = prometheus_client.Gauge(
            contract.MODEL_WEIGHT_BYTES, "Bytes of the model's weights.", [_M], registry=r
        ).labels(m)
        self._load_seconds = prometheus_client.Gauge(
            contract.MODEL_LOAD_SECONDS, "Seconds the model took to load.", [_M], registry=r
        ).labels(m)
        self._engine_info: outputs.EngineInfo | None = None
        self._batch_size = prometheus_client.Gauge(
            contract.BATCH_SIZE, "Sequences in the latest engine step.", [_M], registry=r
        ).labels(m)
        self._ready = prometheus_client.Gauge(
            contract.SERVER_READY, "1 while /ready answers 200 (loaded, not draining).", [_M], registry=r
        ).labels(m)
        # Start-up timestamps: the loaded and ready series appear only when that moment comes (absent, not
        # 0, before), so "not yet" never reads as 1970.
        prometheus_client.Gauge(
            contract.PROCESS_START_TIME_SECONDS, "Start time of the process, unix seconds.", [_M], registry=r
        ).labels(m).set(process_start_time_s())
        self._model_loaded_time = prometheus_client.Gauge(
            contract.MODEL_LOADED_TIME_SECONDS, "When the model finished loading, unix seconds.", [_M], registry=r
        )
        self._ready_time = prometheus_client.Gauge(
            contract.READY_TIME_SECONDS,
            "When /ready first answered 200 (model loaded and one warm-up step run), unix seconds.",
            [_M],
            registry=r,
        )

        self._prompt_tokens = prometheus_client.Counter(
            contract.PROMPT_TOKENS, "Prompt tokens of finished requests.", by_class, registry=r
        )
        self._generation_tokens = prometheus_client.Counter(
            contract.GENERATION_TOKENS, "Generated tokens of finished requests.", by_class, registry=r
        )
        self._success = prometheus_client.Counter(
            contract.REQUEST_SUCCESS,
            "Finished requests by finish reason.",
            [*by_class, contract.LABEL_FINISHED_REASON],
            registry=r,
        )
        self._rejected = prometheus_client.Counter(
            contract.REQUESTS_REJECTED,
            "Requests refused before reaching the engine, by reason.",
            [*by_class, contract.LABEL_REASON],
            registry=r,
        )
        # Declared now so dashboards and the operator find them; they stay at zero until the engine
        # preempts or has caches (a zero here is the truth: none happened).
        self._preemptions = prometheus_client.Counter(
            contract.NUM_PREEMPTIONS, "Preemptions (recompute).", [_M], registry=r
        ).labels(m)
        self._prefix_queries = prometheus_client.Counter(
            contract.PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache.", [_M], registry=r
        ).labels(m)
        self._prefix_hits = prometheus_client.Counter(
            contract.PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache.", [_M], registry=r
        ).labels(m)
        response_lookups = prometheus_client.Counter(
            contract.RESPONSE_CACHE_LOOKUPS, "Response-cache lookups.", [_M, contract.LABEL_RESULT], registry=r
        )
        self._response_hits = response_lookups.labels(m, "hit")
        structured = prometheus_client.Counter(
            contract.STRUCTURED_REQUESTS,
            "Requests decoded under a grammar (structured outputs, enforced tool calls).",
            [_M, contract.LABEL_STRUCTURED_KIND],
            registry=r,
        )
        self._structured = {kind: structured.labels(m, kind) for kind in contract.STRUCTURED_KINDS}
        self._response_misses = response_lookups.labels(m, "miss")

        # The usage ledger: the same figures as GET /admin/usage, labelled by tenant (bounded: see ledger.py).
        self.ledger = ledger_mod.UsageLedger()
        by_tenant = [*by_class, contract.LABEL_TENANT]
        self._usage_prompt = prometheus_client.Counter(
            contract.USAGE_PROMPT_TOKENS,
            "Prompt tokens of finished requests by tenant: computed, or served from the prefix cache.",
            [*by_tenant, contract.LABEL_SOURCE],
            registry=r,
        )
        self._usage_generation = prometheus_client.Counter(
            contract.USAGE_GENERATION_TOKENS, "Generated tokens of finished requests by tenant.", by_tenant, registry=r
        )
        self._usage_response_cache = prometheus_client.Counter(
            contract.USAGE_RESPONSE_CACHE_TOKENS,
            "Completion tokens served from the response cache (not generated) by tenant.",
            by_tenant,
            registry=r,
        )
        self._usage_engine_seconds = prometheus_client.Counter(
            contract.USAGE_ENGINE_SECONDS,
            "Engine step time attributed to requests by their share of each step's tokens, by tenant.",
            by_tenant,
            registry=r,
        )

        def hist(name: str, doc: str, buckets: Iterable[float], labels: list[str]) -> prometheus_client.Histogram:
            return prometheus_client.Histogram(name, doc, labels, buckets=tuple(buckets), registry=r)

        self._ttft = hist(
            contract.TIME_TO_FIRST_TOKEN_SECONDS, "Arrival to first token.", contract.TTFT_BUCKETS_S, by_class
        )
        self._itl = hist(
            contract.INTER_TOKEN_LATENCY_SECONDS, "Time between tokens of a stream.", contract.ITL_BUCKETS_S, [_M]
        ).labels(m)
        self._tpot = hist(
            contract.REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS,
            "Per request: decode time / (output tokens - 1).",
            contract.ITL_BUCKETS_S,
            by_class,
        )
        latency = contract.REQUEST_LATENCY_BUCKETS_S
        self._e2e = hist(contract.E2E_REQUEST_LATENCY_SECONDS, "Arrival to last token.", latency, by_class)
        self._queue = hist(contract.REQUEST_QUEUE_TIME_SECONDS, "Arrival to first scheduling.", latency, by_class)
        self._inference = hist(
            contract.REQUEST_INFERENCE_TIME_SECONDS, "First scheduling to last token.", latency, by_class
        )
        self._prefill = hist(
            contract.REQUEST_PREFILL_TIME_SECONDS, "First scheduling to first token.", latency, by_class
        )
        self._decode = hist(contract.REQUEST_DECODE_TIME_SECONDS, "First token to last token.", latency, by_class)
        token_buckets = contract.build_1_2_5_buckets(max(1, max_model_len))
        self._req_prompt_tokens = hist(
            contract.REQUEST_PROMPT_TOKENS, "Prompt tokens per finished request.", token_buckets, [_M]
        ).labels(m)
        self._req_generation_tokens = hist(
            contract.REQUEST_GENERATION_TOKENS, "Generated tokens per finished request.", token_buckets, [_M]
        ).labels(m)
        self._iteration_tokens = hist(
            contract.ITERATION_TOKENS, "Tokens per engine step.", contract.ITERATION_TOKENS_BUCKETS, [_M]
        ).labels(m)
        self._iteration_batch = hist(
            contract.ITERATION_BATCH_SIZE, "Sequences per engine step.", contract.ITERATION_TOKENS_BUCKETS, [_M]
        ).labels(m)

        self._grammar_compile = hist(
            contract.GRAMMAR_COMPILE_SECONDS,
            "Seconds per grammar compiled in the engine (compiled grammars are cached by schema).",
            contract.GRAMMAR_COMPILE_BUCKETS_S,
            [_M],
        ).labels(m)

        self._config_info = _ConfigInfoCollector(m)
        r.register(self._config_info)
        self._vllm = _VllmAliasCollector(m)
        r.register(self._vllm)
        self._gpu_sampler = gpu_sampler
        if gpu_sampler is not None:
            r.register(_GpuCollector(m, gpu_sampler))

        # Per-class children, created once: a label lookup per token would cost more than the token.
        self._classes: list[str] = []
        for name in qos_classes:
            self._add_class(name)
        self._ready.set(0)

    # ----------------------------------------------------------------------------------------------

    def _add_class(self, qos_class: str) -> None:
        if qos_class in self._classes:
            return
        self._classes.append(qos_class)
        m = self.model_name
        # Touch every per-class series so it exists (at zero) before the first request of that class.
        self._running.labels(m, qos_class).set(0)
        self._waiting.labels(m, qos_class).set(0)
        self._prompt_tokens.labels(m, qos_class)
        self._generation_tokens.labels(m, qos_class)
        self._touch_usage(qos_class, contract.TENANT_OTHER)
        for reason in contract.FINISHED_REASONS:
            self._success.labels(m, qos_class, reason)

    def _touch_usage(self, qos_class: str, tenant: str) -> None:
        m = self.model_name
        for source in ("computed", "prefix_cache"):
            self._usage_prompt.labels(m, qos_class, tenant, source)
        self._usage_generation.labels(m, qos_class, tenant)
        self._usage_response_cache.labels(m, qos_class, tenant)
        self._usage_engine_seconds.labels(m, qos_class, tenant)

    def _record_usage(self, event: outputs.RequestEvent) -> None:
        m, c = self.model_name, event.qos_class
        tenant = self.ledger.add_finished(
            tenant=event.tenant or contract.TENANT_OTHER,
            qos_class=c,
            num_prompt_tokens=event.num_prompt_tokens,
            num_cached_tokens=event.num_cached_tokens,
            num_output_tokens=event.num_output_tokens,
            engine_seconds=event.engine_seconds,
        )
        cached = min(event.num_cached_tokens, event.num_prompt_tokens)
        self._usage_prompt.labels(m, c, tenant, "computed").inc(event.num_prompt_tokens - cached)
        self._usage_prompt.labels(m, c, tenant, "prefix_cache").inc(cached)
        self._usage_generation.labels(m, c, tenant).inc(event.num_output_tokens)
        self._usage_engine_seconds.labels(m, c, tenant).inc(event.engine_seconds)

    def record_response_cache_hit(self, *, tenant: str, qos_class: str, num_output_tokens: int) -> None:
        """An answer replayed from the response cache: booked to its tenant in the usage ledger."""
        label = self.ledger.add_response_cache_hit(
            tenant=tenant, qos_class=qos_class, num_output_tokens=num_output_tokens
        )
        m = self.model_name
        if qos_class not in self._classes:
            self._add_class(qos_class)
        self._touch_usage(qos_class, label)
        self._usage_response_cache.labels(m, qos_class, label).inc(num_output_tokens)

    def record(self, stats: outputs.EngineStats) -> None:
        """One engine step: gauges, per-step histograms, then the request events it carried."""
        m = self.model_name
        for qos_class in (*stats.running_by_class, *stats.waiting_by_class):
            if qos_class not in self._classes:
                self._add_class(qos_class)
        for qos_class in self._classes:
            self._running.labels(m, qos_class).set(stats.running_by_class.get(qos_class, 0))
            self._waiting.labels(m, qos_class).set(stats.waiting_by_class.get(qos_class, 0))
        self._kv_usage.set(stats.kv_usage)
        self._kv_blocks_used.set(stats.kv_blocks_used)
        self._batch_size.set(stats.batch_size)
        vllm = self._vllm
        vllm.running = sum(stats.running_by_class.values())
        vllm.waiting = sum(stats.waiting_by_class.values())
        vllm.kv_usage = stats.kv_usage
        if stats.num_tokens:  # idle wake-ups are not iterations
            self._iteration_tokens.observe(stats.num_tokens)
            self._iteration_batch.observe(stats.batch_size)
        observe_itl = self._itl.observe
        for itl_s in stats.inter_token_latencies_s:
            observe_itl(itl_s)
        if stats.num_preemptions:
            self._preemptions.inc(stats.num_preemptions)
        if stats.prefix_cache_queries:
            self._prefix_queries.inc(stats.prefix_cache_queries)
            self._prefix_hits.inc(stats.prefix_cache_hits)
        for seconds in stats.grammar_compile_s:
            self._grammar_compile.observe(seconds)
        for event in stats.events:
            self._record_event(event)

    def _record_event(self, event: outputs.RequestEvent) -> None:
        m, c = self.model_name, event.qos_class
        if c not in self._classes:
            self._add_class(c)
        if event.kind is outputs.EventKind.FIRST_TOKEN:
            self._ttft.labels(m, c).observe(event.time_s - event.arrival_time_s)
            return
        if event.kind is not outputs.EventKind.FINISHED:
            return  # SCHEDULED: queue time is taken from FINISHED, which carries every timestamp
        reason = str(event.finish_reason) if event.finish_reason is not None else "error"
        self._success.labels(m, c, reason).inc()
        self._prompt_tokens.labels(m, c).inc(event.num_prompt_tokens)
        self._generation_tokens.labels(m, c).inc(event.num_output_tokens)
        self._record_usage(event)
        if reason not in _COMPLETED:
            return
        self._req_prompt_tokens.observe(event.num_prompt_tokens)
        self._req_generation_tokens.observe(event.num_output_tokens)
        self._e2e.labels(m, c).observe(event.time_s - event.arrival_time_s)
        scheduled, first = event.scheduled_time_s, event.first_token_time_s
        if scheduled is not None:
            self._queue.labels(m, c).observe(scheduled - event.arrival_time_s)
            self._inference.labels(m, c).observe(event.time_s - scheduled)
            if first is not None:
                self._prefill.labels(m, c).observe(first - scheduled)
        if first is not None:
            decode_s = event.time_s - first
            self._decode.labels(m, c).observe(decode_s)
            if event.num_output_tokens > 1:
                self._tpot.labels(m, c).observe(decode_s / (event.num_output_tokens - 1))

    def set_idle(self, *, kv_usage: float) -> None:
        """No request in the engine: nothing runs or waits (used when no step reported it)."""
        m = self.model_name
        for qos_class in self._classes:
            self._running.labels(m, qos_class).set(0)
            self._waiting.labels(m, qos_class).set(0)
        self._batch_size.set(0)
        self._kv_usage.set(kv_usage)
        self._vllm.running = self._vllm.waiting = 0
        self._vllm.kv_usage = kv_usage
        if self._engine_info is not None:
            self._kv_blocks_used.set(round(kv_usage * self._engine_info.kv_num_blocks))

    def set_engine_info(self, info: outputs.EngineInfo) -> None:
        """The engine has started: publish its pool and weights (fixed from now on)."""
        self._engine_info = info
        self._kv_blocks_total.set(info.kv_num_blocks)
        self._kv_pool_bytes.set(info.kv_pool_bytes)
        self._weight_bytes.set(info.weight_bytes)
        self._load_seconds.set(info.load_seconds)
        self._vllm.block_size = info.kv_block_size
        self._vllm.num_blocks = info.kv_num_blocks

    def record_structured(self, kind: str) -> None:
        """One request admitted with a grammar; `kind` is one of contract.STRUCTURED_KINDS."""
        self._structured[kind].inc()

    def record_rejection(self, reason: str, qos_class: str) -> None:
        self._rejected.labels(self.model_name, qos_class, reason).inc()

    def record_response_cache(self, *, hit: bool) -> None:
        """One lookup of a cache-eligible request: a hit (stored or shared) or a miss (computed)."""
        (self._response_hits if hit else self._response_misses).inc()

    def set_ready(self, ready: bool) -> None:
        self._ready.set(1 if ready else 0)

    def mark_model_loaded(self, at_s: float) -> None:
        """The model is loaded (unix seconds); only the first call counts."""
        if self.model_loaded_at_s is None:
            self.model_loaded_at_s = at_s
            self._model_loaded_time.labels(self.model_name).set(at_s)

    def mark_ready(self, at_s: float) -> None:
        """The server turned ready (unix seconds); only the first call counts."""
        if self.ready_at_s is None:
            self.ready_at_s = at_s
            self._ready_time.labels(self.model_name).set(at_s)

    def set_config(self, cfg: config_mod.RuntimeConfig, *, max_kv_tokens: int | None) -> None:
        """Publish the limits in force; call after every applied change (startup and PUT /admin/config)."""
        classes = sorted(cfg.qos.classes, key=lambda c: (c.priority, c.name))
        for qos_class in classes:  # a class added live has its series at zero before its first request
            self._add_class(qos_class.name)
        kv = max_kv_tokens if max_kv_tokens is not None else cfg.batching.max_kv_tokens
        info = self._engine_info
        budget = cfg.kv_cache.memory_bytes
        pool_bytes = str(info.kv_pool_bytes) if info is not None else ("" if budget is None else str(budget))
        # What an endpoint picker reads as vllm:cache_config_info: the pool's own blocks once it is allocated.
        block_size = info.kv_block_size if info is not None else cfg.kv_cache.block_size
        self._vllm.block_size = block_size
        if info is not None:
            self._vllm.num_blocks = info.kv_num_blocks
        else:
            self._vllm.num_blocks = None if kv is None else kv // block_size
        self._config_info.set(
            {
                "max_batch_size": str(cfg.batching.max_batch_size),
                "max_batch_tokens": str(cfg.batching.max_batch_tokens),
                "max_kv_tokens": "" if kv is None else str(kv),
                "max_queue_len": str(cfg.batching.max_queue_len),
                "qos_classes": ",".join(c.name for c in classes),
                "default_qos_class": cfg.qos.default_class,
                "prefix_cache": str(cfg.caching.prefix_cache.enabled).lower(),
                "response_cache": str(cfg.caching.response_cache.enabled).lower(),
                "schema_version": cfg.schema_version,
                "qos_policy": cfg.qos.policy,
                "shed_classes": ",".join(cfg.qos.shed_classes),
                "kv_cache_memory": pool_bytes,
                "kv_block_size": str(info.kv_block_size if info is not None else cfg.kv_cache.block_size),
                "kv_num_blocks": str(info.kv_num_blocks) if info is not None else "",
            }
        )

    def render(self) -> bytes:
        """The text exposition (`generate_latest`'s bytes, rendered with cached series prefixes)."""
        return self._exposition.render(self.registry)
