"""The tighter bars of issue #18 (`bars.TIGHT_BARS`), judged on the three profiles the issue names: the default
GPU profile, the built-in CPU profile (cpu-tiny) and a profile calibrated from `fleetlm-dev bench engine`.

Every (profile, routing, bar) triple is a test: the service behind the plain Service (random spread), and
behind FleetLM's router (`spec.router.enabled`, least loaded), two scenarios judged separately. Those the
policy meets assert it; those it does not meet yet are strict xfails with the figure measured, so a change
that makes one hold fails here until it is promoted (and one that breaks a held bar fails as a plain test).
Seed 1 throughout, as `fleetlm-dev simulate`.

Bursts: before the burst release (pods a surge bought go back two clean ticks after the demand that asked for
them has fallen to 75% of it) a burst every 5 minutes held the burst's fleet for good, 2.2-2.5x the oracle;
now 1.5-1.7x (and on the bench-calibrated profile the step's overshoot goes back too: 1.17x -> 1.11x, so
every tight bar holds there), at the price of the next burst's onset being served by the smaller fleet
(attainment 79-86% there; no bar is set on it).
"""

from __future__ import annotations

import functools

import pytest

from fleetlm_dev.sim import bars, calibration, run, workload

SEED = 1


PROFILES = {
    "gpu": calibration.GPU_LIKE,
    "cpu-tiny": calibration.CPU_TINY,
    "measured": calibration.measured_two_core_tiny(),
}

ROUTINGS = {"service": False, "router": True}

# Not met yet, with what seed 1 gives (see the issue note for the full table): none now. Behind the router the
# new pods after a step take the arrivals until they are as full as the old ones, and batches run evenly full.
# Behind the plain Service cpu-tiny's diurnal cost was 1.22x while the batch rule cut the limit on TPOT misses
# of scale-up ticks (44 -> 33 seqs; the fleet then sized on the smaller batch); it leaves those misses to the
# new pods now (`batching.decide_batch_limits(adding_replicas=...)`): 1.10x at 99.05%.
NOT_MET_ROUTED: dict[tuple[str, str], str] = {}
NOT_MET: dict[tuple[str, str], str] = {}
# Recovery after a step behind the Service (2 intervals on gpu and cpu-tiny, 6 with 60 s start-ups on cpu-tiny)
# holds since the tuner sizes each class's queue limit in time (`policy.queuebound`: about one TTFT target of a
# full replica's completions, 5 on gpu and 3 on cpu-tiny instead of 32): the 3 old pods' queues of 32 held the
# first interval the new pods served to 80% (gpu), 86% (cpu-tiny); now the surge past what runs is refused and
# retried elsewhere, and the old pods hold no backlog when the new ones turn ready.


@functools.cache
def _outcome(profile: str, trace: str, routing: str = "service") -> run.Outcome:
    options = run.FleetOptions(router=ROUTINGS[routing])
    return run.simulate(
        workload.TRACES[trace], run.POLICIES["fleetlm"], calib=PROFILES[profile], options=options, seed=SEED
    )


def _cases() -> list[object]:
    cases: list[object] = []
    for routing in ROUTINGS:
        not_met = NOT_MET if routing == "service" else NOT_MET_ROUTED
        for profile in PROFILES:
            for bar in bars.TIGHT_BARS:
                marks: list[pytest.MarkDecorator] = []
                if profile != "gpu" or routing != "service":
                    marks.append(pytest.mark.slow)
                reason = not_met.get((profile, bar.key))
                if reason is not None:
                    marks.append(pytest.mark.xfail(strict=True, reason=f"not met yet: {reason}"))
                cases.append(pytest.param(profile, routing, bar.key, marks=marks, id=f"{profile}-{routing}-{bar.key}"))
    return cases


@pytest.mark.parametrize(("profile", "routing", "key"), _cases())
def test_tight_bar(profile: str, routing: str, key: str) -> None:
    bar = _bar(key)
    verdict = bar.judge(_outcome(profile, bar.trace, routing))
    assert verdict.passed, f"{profile} {routing} {key}: {verdict.value}"


def _bar(key: str) -> bars.Bar:
    return next(bar for bar in bars.TIGHT_BARS if bar.key == key)


@pytest.mark.parametrize(
    ("profile", "routing", "key"),
    [
        pytest.param(
            profile,
            routing,
            key,
            marks=[] if (profile, routing) == ("gpu", "service") else [pytest.mark.slow],
            id=f"{profile}-{routing}-{key}",
        )
        for profile in PROFILES
        for routing in ROUTINGS
        for key in ("steady-changes", "startup60-steady")
    ],
)
def test_zero_replica_changes_at_steady_load(profile: str, routing: str, key: str) -> None:
    # Issue #18 asks for zero replica changes at steady load on the three profiles too (the #8 and #14 bars,
    # whose own tests judge the GPU profile). On cpu-tiny behind the Service the batch rule's token-budget
    # ratchet, cut on every marginal TPOT miss, once made three on the step's plateau.
    bar = next(bar for bar in bars.BARS if bar.key == key)
    verdict = bar.judge(_outcome(profile, bar.trace, routing))
    assert verdict.passed, f"{profile} {routing} {key}: {verdict.value}"


@pytest.fixture(scope="module")
def hpa_diurnal() -> run.Outcome:
    return run.simulate(workload.TRACES["diurnal"], run.POLICIES["hpa"], seed=SEED)


def test_diurnal_meets_99_percent_within_115_percent_of_the_oracle(diurnal_run: run.Outcome) -> None:
    assert diurnal_run.attainment >= bars.TIGHT_ATTAINMENT
    assert diurnal_run.cost_ratio <= bars.TIGHT_COST_RATIO
    # ... without buying it with churn: the day still takes a few dozen changes at most.
    assert diurnal_run.num_changes <= 30


def test_the_interactive_class_meets_99_percent_on_class_mix(class_mix_run: run.Outcome) -> None:
    assert class_mix_run.attainment_by_class["interactive"] >= bars.TIGHT_INTERACTIVE_ATTAINMENT


def test_burst_pods_go_back_between_bursts() -> None:
    outcome = _outcome("gpu", "bursts")
    assert outcome.cost_ratio <= bars.TIGHT_BURSTS_COST_RATIO
    # Between bursts (the first 255 s of every 5 minutes, after the first) the fleet is back near the base
    # load's size, not at the burst's: the oracle needs 3 there and 8 in a burst.
    quiet = [t.replicas for t in outcome.ticks if t.t_s >= 600.0 and 90.0 <= t.t_s % 300.0 < 240.0]
    assert quiet and max(quiet) <= 5
    assert outcome.num_failed < 0.1 * outcome.num_requests


def test_the_queue_depth_baseline_fails_them(hpa_diurnal: run.Outcome) -> None:
    # The bars discriminate: the HPA-style baseline on the same arrivals misses both diurnal bars.
    assert not _bar("tight-diurnal-attainment").judge(hpa_diurnal).passed
    assert not _bar("tight-diurnal-cost").judge(hpa_diurnal).passed


def test_every_tight_bar_is_judged_on_a_trace_the_simulator_has() -> None:
    assert {bar.trace for bar in bars.TIGHT_BARS} <= set(workload.TRACES)
    assert {bar.key for bar in bars.TIGHT_BARS}.isdisjoint(bar.key for bar in bars.BARS)
    assert set(bars.bars_for("step", tight=True)) > set(bars.bars_for("step"))
    assert {key for _, key in (*NOT_MET, *NOT_MET_ROUTED)} <= {bar.key for bar in bars.TIGHT_BARS}
