"""The engine's cost curve (TPOT against the running batch) is fitted from windows and replaces the assumed one.

A compute-bound engine (a small model on CPU, prefill sharing the steps) has a half-cost batch h far
below the spec's prior of 48. With the prior, a fleet near saturation projects one pod fewer as fine,
steps down past what it needs, and swings back up; with the fitted h it holds.
"""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from fleetlm_dev.policy_inputs import MakeSpec, MakeWindow
from fleetlm_operator.policy import costcurve, decide, replicas, state, window
from fleetlm_operator.policy import spec as spec_mod

# TPOT = 0.7 ms + 0.0875 ms x batch: h = 8 (what the CPU engine benchmark of the tiny model gives).
TPOT0_S = 0.0007
SLOPE_S = 0.0000875
SERVICE_TOKENS = 160  # output tokens per request: service time = tokens x TPOT


def engine_window(make_window: MakeWindow, *, pods: int, batch: float, end_s: float) -> window.ObservedWindow:
    """A window of a fleet whose pods each run `batch` sequences on that engine, in steady state."""
    tpot = TPOT0_S + SLOPE_S * batch
    return make_window(
        pods=pods,
        running_per_pod=batch,
        service_s=SERVICE_TOKENS * tpot,
        tpot_mean_s=tpot,
        tpot_quantile_s=1.5 * tpot,
        ttft_quantile_s=0.05,
        end_s=end_s,
    )


def fitted_sums(spec: spec_mod.PolicySpec, make_window: MakeWindow, batches: list[float]) -> state.CostSums:
    sums = state.CostSums()
    for i, batch in enumerate(batches):
        sums = costcurve.observe(
            sums, engine_window(make_window, pods=4, batch=batch, end_s=15.0 * i), tuning=spec.tuning, now=15.0 * i
        )
    return sums


def test_a_varied_batch_pins_the_line(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec()
    sums = fitted_sums(spec, make_window, [10.0 + 5.0 * (i % 12) for i in range(24)])
    fit = costcurve.fit(sums, tuning=spec.tuning)
    assert fit is not None
    assert fit.tpot0_s == pytest.approx(TPOT0_S, rel=0.01)
    assert fit.slope_s == pytest.approx(SLOPE_S, rel=0.01)
    assert fit.half_cost_seqs == pytest.approx(8.0, rel=0.02)
    # ... and it survives a restart with the rest of the state.
    restored = state.TunerState.from_json(state.TunerState(cost=sums).to_json())
    assert restored.cost == sums


def test_a_steady_batch_or_few_windows_keep_the_prior(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec()
    few = fitted_sums(spec, make_window, [10.0, 30.0, 50.0, 70.0])
    assert few.weight < spec.tuning.cost_fit_min_windows
    assert costcurve.fit(few, tuning=spec.tuning) is None
    # Steady load: the batch wobbles a little, TPOT with it plus noise larger than the slope explains.
    wobble = state.CostSums()
    for i in range(40):
        batch = 40.0 + (0.2 if i % 2 else -0.2)
        noisy = dataclasses.replace(
            engine_window(make_window, pods=4, batch=batch, end_s=15.0 * i),
            tpot_mean_s=TPOT0_S + SLOPE_S * 40.0 + (0.0002 if i % 3 == 0 else -0.0001),
        )
        wobble = costcurve.observe(wobble, noisy, tuning=spec.tuning, now=15.0 * i)
    assert costcurve.fit(wobble, tuning=spec.tuning) is None
    decision = decide.decide(
        spec_mod.PolicyInput(spec, 4, 4),
        engine_window(make_window, pods=4, batch=40.0, end_s=600.0),
        state.TunerState(cost=wobble),
        now=600.0,
    )
    assert any(r.startswith("engine: half-cost batch 48 seqs (spec prior") for r in decision.reasons)


def test_incomplete_or_thin_windows_add_no_point(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    spec = make_spec()
    sums = state.CostSums()
    partial = dataclasses.replace(engine_window(make_window, pods=4, batch=30.0, end_s=15.0), complete=False)
    thin = engine_window(make_window, pods=4, batch=30.0, end_s=30.0)
    thin = dataclasses.replace(thin, num_requests=spec.tuning.min_requests_for_latency - 1)
    assert costcurve.observe(sums, partial, tuning=spec.tuning, now=15.0) is sums
    assert costcurve.observe(sums, thin, tuning=spec.tuning, now=30.0) is sums


def _replay(spec: spec_mod.PolicySpec, make_window: MakeWindow, tuner: state.TunerState) -> list[int]:
    """A steady 320 req/s on a fleet of 7 whose engine is the CPU one above: the replicas it runs."""
    half = TPOT0_S / SLOPE_S
    current = 7
    seen = []
    for tick in range(80):
        now = 10_000.0 + tick * spec.interval_s
        # Per pod q = arrivals x tokens x TPOT0 and batch c = q / (1 - q/h), the line's steady state;
        # past the 64-sequence limit there is none: full batches, a queue, first tokens late.
        q = 320.0 / current * SERVICE_TOKENS * TPOT0_S
        batch = q / (1.0 - q / half) if q < half else float("inf")
        if batch <= 64.0:
            observed = engine_window(make_window, pods=current, batch=batch, end_s=now)
        else:
            observed = dataclasses.replace(
                engine_window(make_window, pods=current, batch=64.0, end_s=now),
                num_waiting=30.0 * current,
                ttft_attainment=0.5,
                slo_attainment=0.5,
                ttft_quantile_s=2.0,
            )
        decision = decide.decide(spec_mod.PolicyInput(spec, current, current), observed, tuner, now=now)
        tuner, current = decision.state, decision.replicas
        seen.append(current)
    return seen


def test_the_fitted_curve_stops_a_scale_down_past_saturation(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    # 7 pods run 320 req/s at 64% of the engine's per-sequence capacity (q/h), batch 14; 6 pods at
    # 75% (batch 24); 5 pods at 90%, batch 69: past the 64 limit, a queue. With h = 48 the projection
    # onto 5 reads mild: a tuner that never trusts its fit steps down into the overload, scales back
    # up, and does it again. With the fitted h = 8 the fleet stops at 6 and stays.
    batching = spec_mod.BatchingBounds(max_batch_size=64, max_batch_tokens=4096, autotune=False)
    never_fits = make_spec(batching=batching, tuning=spec_mod.Tuning(cost_fit_min_windows=1e9))
    spec = make_spec(batching=batching)
    sums = dataclasses.replace(
        fitted_sums(spec, make_window, [5.0 + 4.0 * (i % 15) for i in range(30)]), updated_s=10_000.0
    )
    prior = _replay(never_fits, make_window, state.TunerState(cost=sums))
    fitted = _replay(spec, make_window, state.TunerState(cost=sums))
    assert min(prior) == 5
    ups = sum(1 for a, b in itertools.pairwise(prior) if b > a)
    assert ups >= 2  # the limit cycle: down into the overload, up again, down again
    assert min(fitted) == 6
    assert all(b <= a for a, b in itertools.pairwise(fitted))
    assert fitted[-40:] == [6] * 40


def test_a_dip_of_the_running_gauge_does_not_move_the_work(make_spec: MakeSpec, make_window: MakeWindow) -> None:
    # Same arrivals, service times and finishes; the running gauge read at the scrape instant is 40%
    # lower. The batch the slowdown is taken out at is the window's average, so the work is the same.
    spec = make_spec()
    steady = engine_window(make_window, pods=6, batch=50.0, end_s=1000.0)
    dipped = dataclasses.replace(steady, num_running=0.6 * (steady.num_running or 0.0))
    works = []
    for observed in (steady, dipped):
        demand = replicas.estimate_demand(observed, tuning=dataclasses.replace(spec.tuning, batch_half_cost_seqs=8.0))
        assert demand is not None
        works.append(replicas.work(demand, tuning=dataclasses.replace(spec.tuning, batch_half_cost_seqs=8.0)))
    assert works[1] == pytest.approx(works[0], rel=1e-9)
