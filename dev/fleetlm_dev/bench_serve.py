"""`fleetlm-dev bench serve`: a load generator for any OpenAI-compatible server, measured as vLLM measures.

Arrivals are Poisson (gamma when `--burstiness` is not 1) at `--request-rate`, or as fast as a fixed
`--max-concurrency` allows. Prompts come from a random-length dataset (fixed, uniform, normal, lognormal
or exponential lengths) or a shared-prefix dataset (prefix caching), a `--repeat-fraction` of requests
may repeat an earlier one exactly (response caching; figures are then split by first/repeat and by the
server's `X-FleetLM-Response-Cache` answer), and each request may belong to a QoS class (by API key or
header) in a given mix; per class, the report gives the success rate and the refusals by status.
Every request streams, and the client records the same figures as `vllm bench serve` (vllm/benchmarks/serve.py):

- TTFT: send -> first SSE chunk that carries `choices` (even an empty text);
- ITL: every gap between consecutive content chunks, pooled over requests;
- E2EL: send -> last content chunk (the trailing usage chunk is ignored);
- TPOT: (E2EL - TTFT) / (output_tokens - 1), for requests with more than one output token;
- throughput: completed/duration, output tokens/duration, (input + output)/duration, plus the peak
  one-second output rate and the peak concurrency; duration runs from the first send to the last end;
- goodput: completed requests per second whose TTFT, TPOT and E2EL are each within `--goodput` SLOs.

Output: percentile tables (mean, p50, p90, p95, p99), `--json`, and `--plot out.png` (matplotlib, Agg).
`--compare-url` runs the same requests against a second server in the same invocation. This module must
never import torch or the runtime: it is a client and talks HTTP only.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from typing import Any, Literal

import aiohttp
import numpy as np
import tqdm

PERCENTILES = (50, 90, 95, 99)
QOS_HEADER = "X-FleetLM-QoS-Class"  # fleetlm_runtime.contract.HEADER_QOS_CLASS; no runtime import here
CACHE_HEADER = "X-FleetLM-Response-Cache"  # fleetlm_runtime.contract.HEADER_RESPONSE_CACHE: hit|shared|miss
Endpoint = Literal["completions", "chat"]
LengthDist = Literal["fixed", "uniform", "normal", "lognormal", "exponential"]

# Plain words for text prompts (chat, or --prompt-format text): about one token each on most BPEs.
_TEXT = (
    "the model serves tokens to every client while the scheduler keeps the batch full and the cache warm "
    "latency matters when queues grow so the operator watches each class and adds replicas before targets "
    "slip cats dogs birds rivers trees numbers colours music questions answers systems memory bandwidth"
)
_WORDS = tuple(_TEXT.split(" "))


@dataclasses.dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: str | list[int]
    prompt_len: int  # intended input length (tokens for id prompts, words for text prompts)
    output_len: int
    qos_class: str | None = None
    repeat: bool = False  # an exact repeat of an earlier request of the dataset


@dataclasses.dataclass(slots=True)
class RequestResult:
    qos_class: str | None
    repeat: bool = False
    cache: str | None = None  # the server's X-FleetLM-Response-Cache answer, when it sent one
    success: bool = False
    status: int = 0
    error: str = ""
    retry_after: str | None = None  # the Retry-After header of a refusal (429/503)
    prompt_tokens: int = 0  # from the usage chunk (or the spec when the server sends none)
    output_tokens: int = 0
    ttft_s: float = 0.0
    latency_s: float = 0.0  # E2EL
    itl_s: list[float] = dataclasses.field(default_factory=list)
    start_s: float = 0.0  # perf_counter at send
    chunk_times_s: list[float] = dataclasses.field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if self.output_tokens > 1:
            return (self.latency_s - self.ttft_s) / (self.output_tokens - 1)
        return None


@dataclasses.dataclass(frozen=True, slots=True)
class SLO:
    """Goodput thresholds in seconds; None means "not part of the definition"."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2el_s: float | None = None

    def met_by(self, r: RequestResult) -> bool:
        if not r.success:
            return False
        # vLLM's goodput counts a one-token request's TPOT as 0 (it has no inter-token time).
        tpot = r.tpot_s or 0.0
        return (
            (self.ttft_s is None or r.ttft_s <= self.ttft_s)
            and (self.tpot_s is None or tpot <= self.tpot_s)
            and (self.e2el_s is None or r.latency_s <= self.e2el_s)
        )

    @property
    def empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2el_s is None


@dataclasses.dataclass(frozen=True, slots=True)
class BenchConfig:
    url: str
    endpoint: Endpoint = "completions"
    model: str | None = None  # None: the first id from GET /v1/models
    num_prompts: int = 100
    num_warmups: int = 0
    request_rate: float = math.inf  # requests/s; inf sends as fast as max_concurrency allows
    burstiness: float = 1.0  # 1 = Poisson; <1 burstier, >1 more regular (gamma shape)
    max_concurrency: int | None = None
    seed: int = 0
    timeout_s: float = 600.0
    ignore_eos: bool = True  # exact output lengths (vLLM's random dataset does the same)
    temperature: float = 0.0
    class_keys: tuple[tuple[str, str], ...] = ()  # class -> API key (Authorization: Bearer)
    class_header: bool = False  # send the class in the QoS header instead of (or besides) a key
    api_key: str | None = None  # for requests without a class
    slo: SLO = SLO()
    class_slos: tuple[tuple[str, SLO], ...] = ()
    progress: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class DatasetConfig:
    kind: Literal["random", "shared-prefix"] = "random"
    prompt_format: Literal["token-ids", "text"] = "token-ids"
    input_len: int = 128
    output_len: int = 64
    input_dist: LengthDist = "fixed"
    output_dist: LengthDist = "fixed"
    range_ratio: float = 0.5  # spread for uniform/normal (fraction of the mean)
    prefix_len: int = 256
    num_prefixes: int = 4
    # Ids drawn from [low, high): a byte-level BPE always has its 256 byte tokens, and SentencePiece
    # vocabularies keep their byte-fallback tokens low too, so this range is valid for any real model.
    token_id_low: int = 10
    token_id_high: int = 250
    class_mix: tuple[tuple[str, float], ...] = ()  # (class, weight)
    repeat_fraction: float = 0.0  # share of requests that repeat an earlier one exactly (response cache)


# ------------------------------------------------------------------------------------------------
# Datasets


def _draw_length(rng: random.Random, mean: int, dist: LengthDist, ratio: float) -> int:
    if dist == "fixed":
        value = float(mean)
    elif dist == "uniform":
        value = rng.uniform(mean * (1 - ratio), mean * (1 + ratio))
    elif dist == "normal":
        value = rng.gauss(mean, mean * ratio / 2)
    elif dist == "lognormal":
        sigma = max(ratio, 1e-6)
        value = rng.lognormvariate(math.log(mean) - sigma**2 / 2, sigma)  # mean preserved
    elif dist == "exponential":
        value = rng.expovariate(1 / mean)
    else:
        raise ValueError(f"unknown length distribution {dist!r}")
    return max(1, round(value))


def _make_prompt(rng: random.Random, length: int, ds: DatasetConfig) -> str | list[int]:
    if ds.prompt_format == "token-ids":
        return [rng.randrange(ds.token_id_low, ds.token_id_high) for _ in range(length)]
    return " ".join(rng.choice(_WORDS) for _ in range(length))


def _join(prefix: str | list[int], suffix: str | list[int]) -> str | list[int]:
    if isinstance(prefix, list) and isinstance(suffix, list):
        return prefix + suffix
    return f"{prefix} {suffix}"


def build_dataset(ds: DatasetConfig, *, num: int, seed: int) -> list[RequestSpec]:
    """Deterministic for a seed, so two targets (or two runs) see the same requests."""
    rng = random.Random(seed)
    classes = [c for c, _ in ds.class_mix]
    weights = [w for _, w in ds.class_mix]
    num_prefixes = ds.num_prefixes if ds.kind == "shared-prefix" else 0
    prefixes = [_make_prompt(rng, ds.prefix_len, ds) for _ in range(num_prefixes)]
    specs: list[RequestSpec] = []
    originals: list[RequestSpec] = []
    for _ in range(num):
        # Only drawn when asked for, so datasets without repeats stay what they were for a seed.
        if ds.repeat_fraction > 0 and originals and rng.random() < ds.repeat_fraction:
            specs.append(dataclasses.replace(rng.choice(originals), repeat=True))
            continue
        in_len = _draw_length(rng, ds.input_len, ds.input_dist, ds.range_ratio)
        out_len = _draw_length(rng, ds.output_len, ds.output_dist, ds.range_ratio)
        prompt = _make_prompt(rng, in_len, ds)
        if prefixes:
            prompt = _join(rng.choice(prefixes), prompt)
            in_len += ds.prefix_len
        qos_class = rng.choices(classes, weights)[0] if classes else None
        specs.append(RequestSpec(prompt=prompt, prompt_len=in_len, output_len=out_len, qos_class=qos_class))
        originals.append(specs[-1])
    return specs


# ------------------------------------------------------------------------------------------------
# One streamed request


def _payload(cfg: BenchConfig, model: str, spec: RequestSpec) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": spec.output_len,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    if cfg.endpoint == "chat":
        text = spec.prompt if isinstance(spec.prompt, str) else " ".join(str(t) for t in spec.prompt)
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = spec.prompt
    return body


def _headers(cfg: BenchConfig, spec: RequestSpec) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    key = dict(cfg.class_keys).get(spec.qos_class or "", cfg.api_key)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if cfg.class_header and spec.qos_class:
        headers[QOS_HEADER] = spec.qos_class
    return headers


async def send_request(
    session: aiohttp.ClientSession, cfg: BenchConfig, model: str, spec: RequestSpec
) -> RequestResult:
    path = "/v1/chat/completions" if cfg.endpoint == "chat" else "/v1/completions"
    result = RequestResult(qos_class=spec.qos_class, repeat=spec.repeat, prompt_tokens=spec.prompt_len)
    start = time.perf_counter()
    result.start_s = start
    try:
        async with session.post(
            cfg.url.rstrip("/") + path, json=_payload(cfg, model, spec), headers=_headers(cfg, spec)
        ) as resp:
            result.status = resp.status
            result.cache = resp.headers.get(CACHE_HEADER)
            if resp.status != 200:
                result.retry_after = resp.headers.get("Retry-After")
                result.error = (await resp.text())[:300]
                return result
            async for raw in resp.content:
                line = raw.strip()
                if not line or line.startswith(b":"):
                    continue  # blank separators and SSE comments (keep-alive pings)
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])[:300]
                    return result
                _record_chunk(result, chunk, start)
        if not result.chunk_times_s:
            result.error = "the stream carried no tokens"
            return result
        if not result.output_tokens:  # a server without usage chunks: one token per content chunk
            result.output_tokens = len(result.chunk_times_s)
        result.latency_s = result.chunk_times_s[-1] - start
        result.success = True
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, ValueError) as error:
        result.error = f"{type(error).__name__}: {error}"[:300]
    return result


def _record_chunk(result: RequestResult, chunk: dict[str, Any], start: float) -> None:
    """One SSE chunk's timing (TTFT for the first with choices, then inter-token latencies) and usage."""
    now = time.perf_counter()
    if chunk.get("choices"):
        if not result.chunk_times_s:
            result.ttft_s = now - start
        else:
            result.itl_s.append(now - result.chunk_times_s[-1])
        result.chunk_times_s.append(now)
    if usage := chunk.get("usage"):
        result.output_tokens = int(usage.get("completion_tokens") or 0)
        result.prompt_tokens = int(usage.get("prompt_tokens") or result.prompt_tokens)


# ------------------------------------------------------------------------------------------------
# A run against one target


@dataclasses.dataclass(slots=True)
class RunOutcome:
    url: str
    model: str
    duration_s: float
    results: list[RequestResult]


async def _arrivals(cfg: BenchConfig, count: int, rng: random.Random) -> Any:
    """Yield indexes 0..count-1 at Poisson/gamma intervals (immediately when the rate is infinite)."""
    for index in range(count):
        yield index
        if math.isinf(cfg.request_rate) or index == count - 1:
            continue
        theta = 1.0 / (cfg.request_rate * cfg.burstiness)
        await asyncio.sleep(rng.gammavariate(cfg.burstiness, theta))


async def discover_model(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url.rstrip("/") + "/v1/models") as resp:
        resp.raise_for_status()
        body = await resp.json()
    models = body.get("data") or []
    if not models:
        raise RuntimeError(f"{url}/v1/models lists no model")
    return str(models[0]["id"])


async def run_target(
    cfg: BenchConfig, specs: Sequence[RequestSpec], *, warmups: Sequence[RequestSpec] = (), label: str = ""
) -> RunOutcome:
    """Send `specs` as the config says and collect one result per request (warmups are not counted)."""
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, force_close=False)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = cfg.model or await discover_model(session, cfg.url)
        if warmups:
            await asyncio.gather(*(send_request(session, cfg, model, s) for s in warmups))
        semaphore = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
        bar = tqdm.tqdm(total=len(specs), desc=label or cfg.url, disable=not cfg.progress, file=sys.stderr)
        results: list[RequestResult | None] = [None] * len(specs)

        async def one(index: int) -> None:
            if semaphore is None:
                results[index] = await send_request(session, cfg, model, specs[index])
            else:
                async with semaphore:
                    results[index] = await send_request(session, cfg, model, specs[index])
            bar.update(1)

        rng = random.Random(cfg.seed + 1)
        tasks: list[asyncio.Task[None]] = []
        start = time.perf_counter()
        try:
            async for index in _arrivals(cfg, len(specs), rng):
                if semaphore is not None:
                    # Closed loop at fixed concurrency: do not queue thousands of tasks ahead of the slots.
                    await semaphore.acquire()
                    semaphore.release()
                tasks.append(asyncio.create_task(one(index)))
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            bar.close()
        done = [r for r in results if r is not None]
        end = max((r.start_s + r.latency_s for r in done if r.success), default=time.perf_counter())
        return RunOutcome(url=cfg.url, model=model, duration_s=max(end - start, 1e-9), results=done)


# ------------------------------------------------------------------------------------------------
# Figures


def _stats_ms(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "std": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64) * 1000.0
    out = {"mean": float(arr.mean()), "std": float(arr.std())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(arr, p))
    return out


def _peak_output_rate(results: Sequence[RequestResult]) -> float:
    """Peak output tokens in any one-second bucket (tokens spread evenly over a request's chunks)."""
    buckets: dict[int, float] = {}
    starts = [r.start_s for r in results]
    if not starts:
        return 0.0
    origin = min(starts)
    for r in results:
        if not r.success or not r.chunk_times_s:
            continue
        per_chunk = r.output_tokens / len(r.chunk_times_s)
        for t in r.chunk_times_s:
            key = int(t - origin)
            buckets[key] = buckets.get(key, 0.0) + per_chunk
    return max(buckets.values(), default=0.0)


def _peak_concurrency(results: Sequence[RequestResult]) -> int:
    events = []
    for r in results:
        if r.success:
            events.append((r.start_s, 1))
            events.append((r.start_s + r.latency_s, -1))
    peak = current = 0
    for _, delta in sorted(events):
        current += delta
        peak = max(peak, current)
    return peak


def summarize(results: Sequence[RequestResult], duration_s: float, slo: SLO) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    statuses: dict[str, int] = {}
    for r in results:
        if not r.success:
            key = str(r.status or "error")
            statuses[key] = statuses.get(key, 0) + 1
    summary: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "success_rate": len(ok) / len(results) if results else 0.0,
        "failures_by_status": statuses,
        "first_errors": sorted({r.error for r in results if not r.success and r.error})[:3],
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "max_output_tokens_per_s": _peak_output_rate(ok),
        "max_concurrent_requests": _peak_concurrency(ok),
        "ttft_ms": _stats_ms([r.ttft_s for r in ok]),
        "tpot_ms": _stats_ms([t for r in ok if (t := r.tpot_s) is not None]),
        "itl_ms": _stats_ms([gap for r in ok for gap in r.itl_s]),
        "e2el_ms": _stats_ms([r.latency_s for r in ok]),
    }
    if not slo.empty:
        good = sum(1 for r in ok if slo.met_by(r))
        summary["slo"] = {k: v * 1000 for k, v in dataclasses.asdict(slo).items() if v is not None}
        summary["request_goodput"] = good / duration_s
        summary["slo_attainment"] = good / len(results) if results else 0.0
    return summary


def report(outcome: RunOutcome, cfg: BenchConfig) -> dict[str, Any]:
    class_slos = dict(cfg.class_slos)
    out = {"url": outcome.url, "model": outcome.model, **summarize(outcome.results, outcome.duration_s, cfg.slo)}
    classes = sorted({r.qos_class for r in outcome.results if r.qos_class})
    if classes:
        out["per_class"] = {
            c: summarize(
                [r for r in outcome.results if r.qos_class == c], outcome.duration_s, class_slos.get(c, cfg.slo)
            )
            for c in classes
        }
    if any(r.repeat for r in outcome.results):
        out["per_origin"] = {
            name: summarize([r for r in outcome.results if r.repeat is repeat], outcome.duration_s, cfg.slo)
            for name, repeat in (("first", False), ("repeat", True))
        }
    answers = sorted({r.cache for r in outcome.results if r.cache})
    if answers:
        out["per_cache"] = {
            a: summarize([r for r in outcome.results if r.cache == a], outcome.duration_s, cfg.slo) for a in answers
        }
        hit, miss = out["per_cache"].get("hit"), out["per_cache"].get("miss")
        if hit and miss and hit["completed"] and miss["completed"]:
            out["cache_speedup"] = {
                key: miss[key]["p50"] / max(hit[key]["p50"], 1e-9) for key in ("ttft_ms", "e2el_ms")
            }
    return out


def format_table(rep: dict[str, Any], *, title: str) -> str:
    lines = [f"{'=' * 20} {title} {'=' * 20}"]
    rows = [
        ("Successful requests", f"{rep['completed']} ({rep['success_rate']:.1%})"),
        ("Failed requests", f"{rep['failed']} {rep['failures_by_status'] or ''}".rstrip()),
        ("Benchmark duration (s)", f"{rep['duration_s']:.2f}"),
        ("Total input tokens", f"{rep['total_input_tokens']}"),
        ("Total generated tokens", f"{rep['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{rep['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{rep['output_throughput']:.1f}"),
        ("Peak output token throughput (tok/s)", f"{rep['max_output_tokens_per_s']:.1f}"),
        ("Peak concurrent requests", f"{rep['max_concurrent_requests']}"),
        ("Total token throughput (tok/s)", f"{rep['total_token_throughput']:.1f}"),
    ]
    if "request_goodput" in rep:
        rows.append(("Request goodput (req/s)", f"{rep['request_goodput']:.2f}"))
        rows.append(("SLO attainment", f"{rep['slo_attainment']:.1%}"))
    lines += [f"{k:<40}{v:>16}" for k, v in rows]
    lines += [f"  error: {e}" for e in rep.get("first_errors", [])]
    header = f"{'(ms)':<8}" + "".join(f"{c:>10}" for c in ("mean", "p50", "p90", "p95", "p99"))
    lines.append(header)
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2EL")):
        s = rep[key]
        lines.append(f"{name:<8}" + "".join(f"{s[c]:>10.2f}" for c in ("mean", "p50", "p90", "p95", "p99")))
    return "\n".join(lines)


def plot(outcomes: Sequence[tuple[RunOutcome, str]], path: str) -> None:
    """CDFs of TTFT, TPOT, ITL and E2EL, one line per target (and per class where there are classes)."""
    import matplotlib  # noqa: PLC0415  (only when a plot is asked for)

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415

    fig, axes = pyplot.subplots(2, 2, figsize=(11, 8))
    panels = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E latency", "e2el"))
    for ax, (title, key) in zip(axes.flat, panels, strict=True):
        for outcome, label in outcomes:
            groups: dict[str, list[RequestResult]] = {label: [r for r in outcome.results if r.success]}
            classes = sorted({r.qos_class for r in outcome.results if r.qos_class})
            for c in classes if len(classes) > 1 else ():
                groups[f"{label} [{c}]"] = [r for r in outcome.results if r.success and r.qos_class == c]
            for name, rs in groups.items():
                values = _values(rs, key)
                if not values:
                    continue
                xs = np.sort(np.asarray(values)) * 1000.0
                ys = np.arange(1, len(xs) + 1) / len(xs)
                ax.plot(xs, ys, label=name)
        ax.set_title(f"{title} (CDF)")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def _values(results: Sequence[RequestResult], key: str) -> list[float]:
    if key == "ttft":
        return [r.ttft_s for r in results]
    if key == "tpot":
        return [t for r in results if (t := r.tpot_s) is not None]
    if key == "itl":
        return [g for r in results for g in r.itl_s]
    return [r.latency_s for r in results]


# ------------------------------------------------------------------------------------------------
# Command line


def _parse_pairs(text: str | None, what: str) -> list[tuple[str, str]]:
    if not text:
        return []
    pairs = []
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"{what}: expected name=value[,name=value...], got {item!r}")
        pairs.append((name.strip(), value.strip()))
    return pairs


def _parse_slo(text: str | None) -> SLO:
    """`ttft:500 tpot:50 e2el:2000` (ms), vLLM's --goodput syntax; also accepts commas."""
    if not text:
        return SLO()
    values: dict[str, float] = {}
    for item in text.replace(",", " ").split():
        key, _, ms = item.partition(":")
        if key not in ("ttft", "tpot", "e2el"):
            raise argparse.ArgumentTypeError(f"--goodput: unknown metric {key!r}; use ttft, tpot, e2el")
        values[f"{key}_s"] = float(ms) / 1000.0
    return SLO(**values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fleetlm-dev bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="base URL of the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--compare-url", default=None, help="a second server, run with the same requests")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--model", default=None, help="model id (default: the first from /v1/models)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--num-warmups", type=int, default=0)
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 bursty")
    p.add_argument("--max-concurrency", type=int, default=None, help="client-side cap on requests in flight")
    p.add_argument("--dataset", choices=("random", "shared-prefix"), default="random")
    p.add_argument(
        "--prompt-format",
        choices=("token-ids", "text"),
        default=None,
        help="token-id prompts give exact lengths (completions only); default token-ids for completions",
    )
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    dists = ("fixed", "uniform", "normal", "lognormal", "exponential")
    p.add_argument("--input-dist", choices=dists, default="fixed")
    p.add_argument("--output-dist", choices=dists, default="fixed")
    p.add_argument("--range-ratio", type=float, default=0.5, help="spread of uniform/normal/lognormal lengths")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens in each shared prefix")
    p.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes")
    p.add_argument("--token-id-range", default="10:250", help="token-id prompts draw ids from [low:high)")
    p.add_argument(
        "--repeat-fraction",
        type=float,
        default=0.0,
        help="share of requests that exactly repeat an earlier one (response-cache benchmark)",
    )
    p.add_argument("--class-mix", default=None, help="QoS traffic mix, e.g. interactive=0.7,batch=0.3")
    p.add_argument("--class-keys", default=None, help="API key per class, e.g. interactive=KEY1,batch=KEY2")
    p.add_argument("--class-header", action="store_true", help=f"send each request's class in {QOS_HEADER}")
    p.add_argument("--api-key", default=None, help="bearer key for requests without a class")
    p.add_argument("--goodput", default=None, help="SLOs in ms, e.g. 'ttft:500 tpot:50 e2el:5000'")
    p.add_argument(
        "--class-goodput",
        action="append",
        default=[],
        help="per-class SLOs, e.g. 'interactive=ttft:200 tpot:30' (repeatable)",
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (lengths vary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    p.add_argument("--output-json", default=None, help="also write the JSON results to this file")
    p.add_argument("--plot", default=None, help="write latency CDFs to this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def configs_from_args(args: argparse.Namespace) -> tuple[BenchConfig, DatasetConfig]:
    low, _, high = args.token_id_range.partition(":")
    prompt_format: Literal["token-ids", "text"] = args.prompt_format or (
        "token-ids" if args.endpoint == "completions" else "text"
    )
    mix = [(name, float(w)) for name, w in _parse_pairs(args.class_mix, "--class-mix")]
    class_slos = []
    for item in args.class_goodput:
        name, _, slo_text = item.partition("=")
        class_slos.append((name.strip(), _parse_slo(slo_text)))
    ds = DatasetConfig(
        kind=args.dataset,
        prompt_format=prompt_format,
        input_len=args.input_len,
        output_len=args.output_len,
        input_dist=args.input_dist,
        output_dist=args.output_dist,
        range_ratio=args.range_ratio,
        prefix_len=args.prefix_len,
        num_prefixes=args.num_prefixes,
        token_id_low=int(low),
        token_id_high=int(high),
        class_mix=tuple(mix),
        repeat_fraction=args.repeat_fraction,
    )
    if not 0.0 <= ds.repeat_fraction < 1.0:
        raise ValueError("--repeat-fraction must be in [0, 1)")
    cfg = BenchConfig(
        url=args.url,
        endpoint=args.endpoint,
        model=args.model,
        num_prompts=args.num_prompts,
        num_warmups=args.num_warmups,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        timeout_s=args.timeout,
        ignore_eos=not args.no_ignore_eos,
        temperature=args.temperature,
        class_keys=tuple(_parse_pairs(args.class_keys, "--class-keys")),
        class_header=args.class_header,
        api_key=args.api_key,
        slo=_parse_slo(args.goodput),
        class_slos=tuple(class_slos),
        progress=not args.no_progress,
    )
    return cfg, ds


async def run(cfg: BenchConfig, ds: DatasetConfig, *, compare_url: str | None = None) -> list[tuple[RunOutcome, str]]:
    """Run the same requests (and warmups) against one or two targets, one after the other."""
    specs = build_dataset(ds, num=cfg.num_prompts + cfg.num_warmups, seed=cfg.seed)
    warmups, measured = specs[: cfg.num_warmups], specs[cfg.num_warmups :]
    outcomes = []
    for label, url in (("A", cfg.url), ("B", compare_url)):
        if url is None:
            continue
        target = dataclasses.replace(cfg, url=url)
        outcome = await run_target(target, measured, warmups=warmups, label=f"{label} {url}")
        outcomes.append((outcome, f"{label}: {url}"))
    return outcomes


def _print_tables(result: dict[str, Any], labels: list[str]) -> None:
    """The human-readable form of `result`: a table per target and per class, origin and cache outcome."""
    for rep, label in zip(result["targets"], labels, strict=True):
        print(format_table(rep, title=label))
        for group in ("per_class", "per_origin", "per_cache"):
            for name, sub in rep.get(group, {}).items():
                print(format_table(sub, title=f"{label} {group[4:]}={name}"))
        if speedup := rep.get("cache_speedup"):
            print(
                f"{label}: cache hit vs miss, median TTFT {speedup['ttft_ms']:.1f}x, "
                f"median E2EL {speedup['e2el_ms']:.1f}x lower"
            )
    if "ratio_output_throughput_a_over_b" in result:
        print(f"output throughput A/B: {result['ratio_output_throughput_a_over_b']:.3f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, ds = configs_from_args(args)
    except (argparse.ArgumentTypeError, ValueError) as error:
        print(f"bench serve: error: {error}", file=sys.stderr)
        return 2
    if cfg.num_prompts < 1:
        print("bench serve: error: --num-prompts must be >= 1", file=sys.stderr)
        return 2
    try:
        outcomes = asyncio.run(run(cfg, ds, compare_url=args.compare_url))
    except (aiohttp.ClientError, RuntimeError, OSError) as error:
        print(f"bench serve: error: {error}", file=sys.stderr)
        return 1
    reports = [report(outcome, cfg) for outcome, _ in outcomes]
    result: dict[str, Any] = {"targets": reports}
    if len(reports) == 2 and reports[1]["output_throughput"]:
        result["ratio_output_throughput_a_over_b"] = reports[0]["output_throughput"] / reports[1]["output_throughput"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_tables(result, [label for _, label in outcomes])
    if args.output_json:
        with open(args.output_json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    if args.plot:
        plot(outcomes, args.plot)
    return 0 if all(rep["completed"] for rep in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
