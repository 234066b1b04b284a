"""A real `fleetlm-runtime` process (engine core in its child) under a load that needs 3x its KV pool:
every request completes with the text greedy `generate()` gives, /ready polled every 100 ms never flips,
and neither process's resident memory grows by 2% after warm-up. The 2,000-request version is
`fleetlm-dev bench overload`; this one runs 200."""

from __future__ import annotations

import pytest

from fleetlm_dev import bench_overload


@pytest.mark.slow
def test_overload_completes_every_request_with_ready_and_memory_flat() -> None:
    result = bench_overload.run(bench_overload.Spec(requests=200, concurrency=32, checks=50))
    assert result["load_over_pool"] >= 3.0 - 1e-9
    assert result["completed"] == 200 and result["errors"] == 0, result["first_errors"]
    assert result["greedy_checked"] == 50 and result["greedy_mismatches"] == []
    # Polled every 100 ms for the whole load (a quiet machine serves the 200 requests in about a second).
    polls_due = result["seconds"] / bench_overload.READY_INTERVAL_S
    assert result["ready_polls"] >= max(3, 0.5 * polls_due), (result["ready_polls"], result["seconds"])
    assert result["ready_not_ready"] == 0, result["ready_first_failures"]
    for name, memory in result["memory"].items():
        assert memory["growth_pct"] < bench_overload.MAX_GROWTH_PCT, (name, memory)
    assert result["server_exit_code"] == 0  # drained and exited cleanly after the load
    assert all(bench_overload.verdicts(result).values())


def test_the_pool_is_a_third_of_the_worst_case() -> None:
    workload = bench_overload.Workload(prompts=[[1] * 10, [2] * 30], max_tokens=[20, 40])
    worst, pool = bench_overload.pool_tokens_for(workload, concurrency=4, load_factor=3.0)
    assert worst == 4 * 50 and pool == 66


def test_growth_is_measured_from_the_warm_up_sample() -> None:
    samples = [(0.0, 0, 80), (1.0, 10, 100), (2.0, 50, 104), (3.0, 100, 101)]
    growth, peak, warm = bench_overload.growth_pct(samples, warm_done=10)
    assert warm == 100 and growth == pytest.approx(1.0) and peak == pytest.approx(4.0)
