"""Prometheus text from a runtime pod -> PodSample: names from the contract, missing stays missing, partial
series are flagged, NaN is absent, and two parsed scrapes make a window."""

from __future__ import annotations

import pytest

from fleetlm_operator.collect import parse
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import window
from fleetlm_runtime import contract

C = contract


def exposition(
    *,
    ttft_counts: tuple[int, int, int] = (3, 8, 10),
    finished: int = 10,
    waiting: str = "2",
    drop: frozenset[str] = frozenset(),
    extra: str = "",
) -> str:
    """A runtime-like /metrics body for classes `chat` and `batch`; `drop` leaves whole families out."""
    le1, le2, total = ttft_counts
    families = {
        C.NUM_REQUESTS_RUNNING: f"""# TYPE {C.NUM_REQUESTS_RUNNING} gauge
{C.NUM_REQUESTS_RUNNING}{{model="m",qos_class="chat"}} 5
{C.NUM_REQUESTS_RUNNING}{{model="m",qos_class="batch"}} 3
""",
        C.NUM_REQUESTS_WAITING: f"""# TYPE {C.NUM_REQUESTS_WAITING} gauge
{C.NUM_REQUESTS_WAITING}{{model="m",qos_class="chat"}} {waiting}
{C.NUM_REQUESTS_WAITING}{{model="m",qos_class="batch"}} 0
""",
        C.KV_CACHE_USAGE_PERC: f"""# TYPE {C.KV_CACHE_USAGE_PERC} gauge
{C.KV_CACHE_USAGE_PERC}{{model="m"}} 0.25
""",
        C.REQUEST_SUCCESS: f"""# TYPE {C.sample_name(C.REQUEST_SUCCESS)} counter
{C.sample_name(C.REQUEST_SUCCESS)}{{finished_reason="stop",model="m",qos_class="chat"}} {finished - 1}
{C.sample_name(C.REQUEST_SUCCESS)}{{finished_reason="length",model="m",qos_class="chat"}} 1
{C.sample_name(C.REQUEST_SUCCESS)}{{finished_reason="stop",model="m",qos_class="batch"}} 4
""",
        C.REQUESTS_REJECTED: f"""# TYPE {C.sample_name(C.REQUESTS_REJECTED)} counter
{C.sample_name(C.REQUESTS_REJECTED)}{{model="m",qos_class="batch",reason="{C.REJECT_QUEUE_FULL}"}} 4
{C.sample_name(C.REQUESTS_REJECTED)}{{model="m",qos_class="batch",reason="{C.REJECT_SHED_SLO}"}} 2
{C.sample_name(C.REQUESTS_REJECTED)}{{model="m",qos_class="batch",reason="{C.REJECT_SHED_TUNER}"}} 1
{C.sample_name(C.REQUESTS_REJECTED)}{{model="m",qos_class="batch",reason="{C.REJECT_INVALID}"}} 100
""",
        C.TIME_TO_FIRST_TOKEN_SECONDS: f"""# TYPE {C.TIME_TO_FIRST_TOKEN_SECONDS} histogram
{C.TIME_TO_FIRST_TOKEN_SECONDS}_bucket{{le="0.25",model="m",qos_class="chat"}} {le1}
{C.TIME_TO_FIRST_TOKEN_SECONDS}_bucket{{le="0.5",model="m",qos_class="chat"}} {le2}
{C.TIME_TO_FIRST_TOKEN_SECONDS}_bucket{{le="+Inf",model="m",qos_class="chat"}} {total}
{C.TIME_TO_FIRST_TOKEN_SECONDS}_count{{model="m",qos_class="chat"}} {total}
{C.TIME_TO_FIRST_TOKEN_SECONDS}_sum{{model="m",qos_class="chat"}} 3.5
""",
        # Declared, nothing observed yet: a real zero, not a missing family.
        C.REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS: f"""# TYPE {C.REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS} histogram
""",
        C.REQUEST_INFERENCE_TIME_SECONDS: f"""# TYPE {C.REQUEST_INFERENCE_TIME_SECONDS} histogram
""",
        C.CONFIG_INFO: f"""# TYPE {C.CONFIG_INFO} gauge
{C.CONFIG_INFO}{{max_batch_size="64",max_batch_tokens="4096",model="m"}} 1
""",
    }
    return "".join(text for name, text in families.items() if name not in drop) + extra


def test_a_full_scrape_reads_every_field() -> None:
    sample = parse.parse_pod_metrics(exposition(), pod="p0", scraped_at_s=100.0)
    assert sample.pod == "p0"
    assert sample.scraped_at_s == 100.0
    assert sample.running_by_class == {"chat": 5.0, "batch": 3.0}
    assert sample.waiting_by_class == {"chat": 2.0, "batch": 0.0}
    assert sample.kv_usage == 0.25
    assert sample.finished_by_class == {"chat": 10.0, "batch": 4.0}  # summed over finish reasons
    assert sample.rejected_by_class == {"batch": 7.0}  # overload refusals only, not invalid requests
    ttft = sample.ttft_by_class["chat"]
    assert ttft.bounds == (0.25, 0.5)
    assert ttft.cumulative == (3.0, 8.0)
    assert ttft.count == 10.0
    assert sample.tpot_by_class == {}
    assert sample.applied == {"max_batch_size": "64", "max_batch_tokens": "4096"}
    # No GPU on this pod: absent, and named, but not a required field.
    assert sample.gpu_utilization is None
    assert sample.missing == frozenset({"gpu_utilization"})
    assert not (sample.missing & window.REQUIRED_FIELDS)


@pytest.mark.parametrize(
    ("family", "field"),
    [
        (C.TIME_TO_FIRST_TOKEN_SECONDS, "ttft"),
        (C.REQUEST_TIME_PER_OUTPUT_TOKEN_SECONDS, "tpot"),
        (C.NUM_REQUESTS_WAITING, "waiting"),
        (C.NUM_REQUESTS_RUNNING, "running"),
        (C.KV_CACHE_USAGE_PERC, "kv_usage"),
        (C.REQUEST_SUCCESS, "finished"),
    ],
)
def test_a_missing_family_is_named_and_never_zero(family: str, field: str) -> None:
    sample = parse.parse_pod_metrics(exposition(drop=frozenset({family})), pod="p0", scraped_at_s=1.0)
    assert field in sample.missing
    assert field in window.REQUIRED_FIELDS


def test_nan_gauge_is_absent_not_zero() -> None:
    text = (
        exposition(drop=frozenset({C.KV_CACHE_USAGE_PERC}))
        + f"""# TYPE {C.KV_CACHE_USAGE_PERC} gauge
{C.KV_CACHE_USAGE_PERC}{{model="m"}} NaN
"""
    )
    sample = parse.parse_pod_metrics(text, pod="p0", scraped_at_s=1.0)
    assert sample.kv_usage is None
    assert "kv_usage" in sample.missing


def test_a_histogram_without_its_inf_bucket_is_partial() -> None:
    broken = f"""# TYPE {C.TIME_TO_FIRST_TOKEN_SECONDS} histogram
{C.TIME_TO_FIRST_TOKEN_SECONDS}_bucket{{le="0.25",model="m",qos_class="chat"}} 3
{C.TIME_TO_FIRST_TOKEN_SECONDS}_count{{model="m",qos_class="chat"}} 3
"""
    sample = parse.parse_pod_metrics(
        exposition(drop=frozenset({C.TIME_TO_FIRST_TOKEN_SECONDS}), extra=broken), pod="p0", scraped_at_s=1.0
    )
    assert "ttft" in sample.missing
    assert "chat" not in sample.ttft_by_class


def test_gpu_utilization_is_averaged_over_the_pods_gpus() -> None:
    gpus = f"""# TYPE {C.GPU_UTILIZATION_RATIO} gauge
{C.GPU_UTILIZATION_RATIO}{{gpu="0",model="m"}} 0.5
{C.GPU_UTILIZATION_RATIO}{{gpu="1",model="m"}} 1.0
"""
    sample = parse.parse_pod_metrics(exposition(extra=gpus), pod="p0", scraped_at_s=1.0)
    assert sample.gpu_utilization == pytest.approx(0.75)
    assert sample.missing == frozenset()


def test_unparseable_text_raises() -> None:
    with pytest.raises(parse.MetricsParseError):
        parse.parse_pod_metrics("this is {not prometheus", pod="p0", scraped_at_s=1.0)


def test_two_scrapes_make_a_window() -> None:
    spec = spec_mod.PolicySpec(slo=spec_mod.SLOTargets(ttft_s=0.5, tpot_s=0.05), max_replicas=4)
    before = {
        "p0": parse.parse_pod_metrics(exposition(ttft_counts=(3, 8, 10), finished=10), pod="p0", scraped_at_s=100.0)
    }
    after = {
        "p0": parse.parse_pod_metrics(exposition(ttft_counts=(13, 28, 30), finished=30), pod="p0", scraped_at_s=115.0)
    }
    observed = window.from_scrapes(before, after, expected_pods=["p0"], spec=spec, now_s=115.0, max_age_s=30.0)
    assert observed.complete, observed.reason
    assert observed.num_requests == 20  # the delta, not the total
    # Deltas (10, 20, 20): p95 rank 19 lies in (0.25, 0.5] between 10 and 20.
    assert observed.ttft_quantile_s == pytest.approx(0.25 + 0.25 * 9 / 10)
    assert observed.ttft_attainment == pytest.approx(1.0)
    assert observed.finished_per_s == pytest.approx(20 / 15)
    assert observed.num_waiting == 2.0


def test_the_runtime_exposition_carries_every_required_field() -> None:
    # Contract check against the runtime's own collectors (no torch needed): whatever the window
    # requires, a freshly started runtime already exports.
    from fleetlm_runtime import metrics

    runtime = metrics.RuntimeMetrics(model_name="tiny", max_model_len=128, qos_classes=("chat", "batch"))
    sample = parse.parse_pod_metrics(runtime.render().decode(), pod="p0", scraped_at_s=1.0)
    assert not (sample.missing & window.REQUIRED_FIELDS), sample.missing
    assert set(sample.running_by_class) == {"chat", "batch"}


def test_the_start_up_gauges_say_when_the_pod_started_and_turned_ready() -> None:
    gauges = f"""# TYPE {C.PROCESS_START_TIME_SECONDS} gauge
{C.PROCESS_START_TIME_SECONDS}{{model="m"}} 1700000000.5
# TYPE {C.MODEL_LOADED_TIME_SECONDS} gauge
{C.MODEL_LOADED_TIME_SECONDS}{{model="m"}} 1700000050
# TYPE {C.READY_TIME_SECONDS} gauge
{C.READY_TIME_SECONDS}{{model="m"}} 1700000061.25
"""
    sample = parse.parse_pod_metrics(exposition(extra=gauges), pod="p0", scraped_at_s=1700000100.0)
    assert sample.started_at_s == 1700000000.5
    assert sample.ready_at_s == 1700000061.25
    # Declared but not there yet (still loading): unknown, never 0.
    declared = f"# TYPE {C.READY_TIME_SECONDS} gauge\n"
    loading = parse.parse_pod_metrics(exposition(extra=declared), pod="p0", scraped_at_s=1.0)
    assert loading.ready_at_s is None and loading.started_at_s is None


def test_a_fresh_runtime_reports_its_process_start_and_no_ready_time_yet() -> None:
    from fleetlm_runtime import metrics

    runtime = metrics.RuntimeMetrics(model_name="tiny", max_model_len=128)
    sample = parse.parse_pod_metrics(runtime.render().decode(), pod="p0", scraped_at_s=1.0)
    assert sample.started_at_s is not None and sample.started_at_s > 1e9
    assert sample.ready_at_s is None
    runtime.mark_ready(1_800_000_000.0)
    assert parse.parse_pod_metrics(runtime.render().decode(), pod="p0", scraped_at_s=1.0).ready_at_s == 1.8e9
