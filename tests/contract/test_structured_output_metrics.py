"""The structured-output metrics: constrained requests counted by kind (every kind declared at zero from
the start, so a dashboard's rate has a series), and each grammar compile the engine reports observed once."""

from __future__ import annotations

from prometheus_client import parser

from fleetlm_runtime import contract, metrics
from fleetlm_runtime.engine import outputs


def _samples(m: metrics.RuntimeMetrics) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get(contract.LABEL_STRUCTURED_KIND, "")): s.value
        for f in parser.text_string_to_metric_families(m.render().decode())
        for s in f.samples
    }


def test_constrained_requests_and_compile_times_are_counted() -> None:
    m = metrics.RuntimeMetrics(model_name="tiny", max_model_len=64)
    counter = f"{contract.STRUCTURED_REQUESTS}_total"
    before = _samples(m)
    assert all(before[(counter, kind)] == 0 for kind in contract.STRUCTURED_KINDS)
    assert before[(f"{contract.GRAMMAR_COMPILE_SECONDS}_count", "")] == 0
    m.record_structured("json_schema")
    m.record_structured("json_schema")
    m.record_structured("tool_call")
    stats = outputs.EngineStats(
        now_s=1.0, step_duration_s=0.01, model_duration_s=0.005, batch_size=1, num_tokens=1,
        num_prefill_tokens=0, num_decode_tokens=1, num_running=1, num_waiting=0, running_by_class={},
        waiting_by_class={}, kv_usage=0.0, num_kv_tokens_reserved=16, kv_capacity_tokens=64, max_batch_size=8,
        max_batch_tokens=64, grammar_compile_s=(0.004, 0.03),
    )  # fmt: skip
    m.record(stats)
    after = _samples(m)
    assert after[(counter, "json_schema")] == 2 and after[(counter, "tool_call")] == 1
    assert after[(counter, "json_object")] == 0
    assert after[(f"{contract.GRAMMAR_COMPILE_SECONDS}_count", "")] == 2
    assert abs(after[(f"{contract.GRAMMAR_COMPILE_SECONDS}_sum", "")] - 0.034) < 1e-9
