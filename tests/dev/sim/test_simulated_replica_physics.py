"""The simulated replica behaves like a continuous-batching engine: larger batches mean slower tokens but
more throughput; buckets mirror the runtime's; the calibration can be fitted from measured steps."""

from __future__ import annotations

import math

import pytest

from fleetlm_dev.sim import calibration, replica
from fleetlm_runtime import contract


def run_replica(max_batch_size: int, *, requests: int = 400) -> tuple[float, float]:
    """Saturate one replica; return (mean TPOT, completions per second)."""
    done: list[replica.Seq] = []
    pod = replica.Replica(
        "r",
        calib=calibration.GPU_LIKE,
        class_names=("default",),
        max_batch_size=max_batch_size,
        max_batch_tokens=4096,
        created_s=0.0,
        ready_s=0.0,
        sink=done.append,
    )
    for _ in range(requests):
        pod.submit(replica.Seq(0.0, 128, 64, 0), 0.0)
    pod.advance_to(math.inf)
    assert len(done) == requests
    tpot = sum((s.finish_s - s.first_s) / (s.output - 1) for s in done) / len(done)
    return tpot, requests / max(s.finish_s for s in done)


def test_bigger_batches_trade_tpot_for_throughput() -> None:
    small_tpot, small_rate = run_replica(16)
    big_tpot, big_rate = run_replica(128)
    assert big_tpot > small_tpot
    assert big_rate > 1.5 * small_rate


def test_decode_step_matches_the_calibration() -> None:
    step = calibration.GPU_LIKE.step
    tpot, _ = run_replica(16)
    # 400 requests in batches of 16; each decode step carries 16 sequences (prefill steps add a little).
    assert tpot == pytest.approx(step.decode_step_s(16), rel=0.15)


def test_queue_limit_refuses_past_the_limit() -> None:
    pod = replica.Replica(
        "r",
        calib=calibration.GPU_LIKE,
        class_names=("default",),
        max_batch_size=1,
        max_batch_tokens=512,
        created_s=0.0,
        ready_s=0.0,
        sink=lambda seq: None,
        queue_limit=2,
    )
    accepted = [pod.submit(replica.Seq(0.0, 16, 16, 0), 0.0) for _ in range(5)]
    assert accepted == [True, True, True, False, False]  # one admitted at once, two waiting, the rest 429
    assert pod.rejected == [2]


def test_the_tuners_queue_limits_apply_to_arrivals_from_then_on() -> None:
    pod = replica.Replica(
        "r",
        calib=calibration.GPU_LIKE,
        class_names=("interactive", "batch"),
        max_batch_size=1,
        max_batch_tokens=512,
        created_s=0.0,
        ready_s=0.0,
        sink=lambda seq: None,
        queue_limit=32,
    )
    assert [pod.submit(replica.Seq(0.0, 16, 16, 0), 0.0) for _ in range(4)] == [True] * 4  # 1 running, 3 waiting
    pod.set_queue_limits([2, None])
    # The queue already past the new limit keeps what it holds; new arrivals of that class are refused.
    assert pod.submit(replica.Seq(0.0, 16, 16, 0), 0.0) is False
    assert pod.num_waiting == 3
    assert all(pod.submit(replica.Seq(0.0, 16, 16, 1), 0.0) for _ in range(40))  # unbounded class
    with pytest.raises(ValueError, match="2 classes"):
        pod.set_queue_limits([2])


def test_sim_buckets_mirror_the_runtime_contract() -> None:
    assert replica.TTFT_BUCKETS_S == contract.TTFT_BUCKETS_S
    assert replica.TPOT_BUCKETS_S == contract.ITL_BUCKETS_S
    assert replica.SERVICE_BUCKETS_S == contract.REQUEST_LATENCY_BUCKETS_S


def test_step_time_fit_recovers_the_coefficients() -> None:
    truth = calibration.StepTime(base_s=0.012, per_seq_s=0.0004, per_token_s=0.00003)
    points = [(seqs, tokens, truth.step_s(seqs, tokens)) for seqs in (1, 8, 32, 64) for tokens in (seqs, seqs + 512)]
    fitted = calibration.StepTime.fit(points)
    assert fitted.base_s == pytest.approx(truth.base_s, rel=1e-6)
    assert fitted.per_seq_s == pytest.approx(truth.per_seq_s, rel=1e-6)
    assert fitted.per_token_s == pytest.approx(truth.per_token_s, rel=1e-6)


def test_step_time_from_bench_serve_figures() -> None:
    # TPOT at fixed concurrencies and a prefill speed, as `fleetlm-dev bench serve` prints them.
    fitted = calibration.StepTime.from_benchmark([(1, 0.0154), (32, 0.0262), (64, 0.0374)], prefill_tokens_per_s=20_000)
    assert fitted.per_token_s == pytest.approx(0.00005)
    assert fitted.decode_step_s(32) == pytest.approx(0.0262, rel=0.02)
