"""How many replicas: up fast, down slowly, never down on missing data.

Demand is measured in batch slots (sequences that must run at once): Little's law on the arrival rate and
the mean service time, at least what is running now, plus the waiting backlog spread over a drain time.
Because a fuller batch is a slower batch (TPOT ~ 1 + b/h), concurrency grows faster than 1/N when
replicas go away; the policy takes that slowdown out ("work", independent of the fleet size) and projects
it onto any other fleet size. Both need the engine's h, fitted from the windows (`costcurve`), and the
batch the service time was measured at, the window's average rather than one scrape of the gauge. The
fleet is sized so batches run `target_occupancy` full; the band of occupancies narrows for small batch
limits, whose batches swing relatively more (Poisson).

Up: as soon as the demand would fill the fleet (pods still starting included) past `scale_up_occupancy`,
or the SLO is missed under load, to the size the demand asks for, several replicas at once (capped per
step). Down: one replica per tick, only when every tick of the scale-down stabilization window had
complete data, no queue, no starting pods, no shedding and latency headroom, the window's *average* work
would fill one replica fewer at most `scale_down_occupancy`, and no tick of it would have scaled that
smaller fleet up. Averaging (KubeAI's moving average) keeps noise from stepping a steady fleet down; the
band between the thresholds keeps it from stepping back up. Pure: `now` is a parameter; no clock, no
I/O, never imports collect/act/handlers.
"""

from __future__ import annotations

import dataclasses
import math

from fleetlm_operator.policy import slo
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import startup as startup_mod
from fleetlm_operator.policy import state as state_mod
from fleetlm_operator.policy import window as window_mod


@dataclasses.dataclass(frozen=True, slots=True)
class Demand:
    """What the fleet must carry now, in batch slots."""

    slots: float  # concurrency + backlog drain, over the whole fleet
    concurrency_slots: float
    backlog_slots: float
    running_per_pod: float  # the batch per pod behind `concurrency_slots` (gauge, or Little's time average)
    basis: str  # how it was estimated, for the reasons


@dataclasses.dataclass(frozen=True, slots=True)
class ReplicaDecision:
    replicas: int
    recommendation: int | None  # what this tick's data asked for (None: not recorded)
    wanted: int | None  # replicas at target occupancy for the demand, unclamped
    reasons: tuple[str, ...]
    recommendations: tuple[state_mod.Recommendation, ...]
    history_start_s: float
    surge: state_mod.Surge | None = None  # the run of scale-ups whose pods may still go back early


def estimate_demand(
    window: window_mod.ObservedWindow,
    *,
    tuning: spec_mod.Tuning,
    shed_classes: tuple[str, ...] = (),
    include_shed: bool = False,
    beyond_swing: bool = False,
) -> Demand | None:
    """Batch slots the fleet needs; None when the window cannot say (no pods, no queue gauges).

    Arrivals x service (Little) rests on the whole window; the running gauge, one instant, is a floor under
    it (it is current where the window's finishes lag what runs). `beyond_swing` counts only the part of the
    gauge clear of its swing (`gauge_floor`): the estimate to scale up on, where one scrape's full batch
    must not buy pods. Without it the gauge counts as read: the higher estimate, which a scale-down must
    clear.

    Pods expected but not scraped are taken to carry as much as the average scraped pod; pods scraped
    without a baseline (just started) are not: the arrivals were counted on the pods that took them.
    Refusals of classes being shed are not load the fleet carries; `include_shed` counts them (as the
    clients send them, retries included, so on the high side) to ask whether the fleet could take the
    classes back.
    """
    running = window.num_running
    waiting = window.num_waiting
    sampled = window.num_pods_sampled
    if running is None or waiting is None or sampled == 0:
        return None
    unseen = max(0, window.num_pods_expected - sampled)
    scale_unseen = 1.0 + unseen / sampled
    service_s = window.mean_service_s
    basis = "running"
    concurrency = running * scale_unseen
    # The batch the slowdown is taken out at must be the one the service time was measured at. With
    # the gauge as the concurrency that is the gauge itself; with arrivals x service it is the window's
    # time-averaged running batch (finishes x service), not one instant of the gauge: paired with a
    # dip of that gauge (it swings by a quarter per scrape on a busy CPU engine) `work` jumps up, and
    # the fleet scales up on noise. Under overload finishes, not arrivals, say how full batches ran.
    per_pod = running / sampled
    if window.arrival_per_s is not None and service_s is not None and window.num_pods_with_delta > 0:
        carried = window.num_pods_with_delta
        refused_shed = sum(
            window.classes[name].rejected_per_s or 0.0 for name in shed_classes if name in window.classes
        )
        # Refused requests come back (clients retry a 429): count each once, not once per attempt.
        refused_other = max(0.0, (window.rejected_per_s or 0.0) - refused_shed)
        retried = refused_other * (1.0 - 1.0 / tuning.refusal_attempts)
        arrival = window.arrival_per_s - retried - (0.0 if include_shed else refused_shed)
        arrival = max(0.0, arrival) * (carried + unseen) / carried
        little = arrival * service_s
        floor = (gauge_floor(running, tuning=tuning) if beyond_swing else running) * scale_unseen
        if little > floor:
            concurrency, basis = little, f"arrivals {arrival:.2f}/s x service {service_s:.2f}s"
            averaged = window.mean_running_per_pod
            per_pod = averaged if averaged is not None and averaged > 0 else per_pod
        else:
            concurrency = floor
            beyond = f", {floor:.0f} beyond its swing" if beyond_swing else ""
            basis = f"running {running:.0f}{beyond} (>= arrivals {arrival:.2f}/s x service {service_s:.2f}s)"
    # Each waiting request needs a slot for one service time; spreading the backlog over the drain
    # time asks for more replicas the deeper the queue, and none once it is gone.
    queued = waiting * scale_unseen
    backlog = queued * service_s / tuning.backlog_drain_s if service_s is not None else queued
    return Demand(
        slots=concurrency + backlog,
        concurrency_slots=concurrency,
        backlog_slots=backlog,
        running_per_pod=per_pod,
        basis=basis,
    )


def gauge_floor(running: float, *, tuning: spec_mod.Tuning) -> float:
    """The least mean concurrency one reading of the running gauge vouches for: k - z sqrt(k).

    The gauge is one instant of a count that swings about like a Poisson variable around its mean (M/G/inf
    on the fleet's sum): at 1.8 sequences in flight on average one scrape reads a full batch of 4 about one
    time in nine, and on a CPU engine whose requests take 30 ms that is the reading a scrape happens to
    catch. As a floor under Little's estimate (which rests on the whole window) it counts only where it
    stands clear of that swing, i.e. where the window's finishes lag what is running (requests longer than
    those that finished, a step under way); within the swing the window's estimate stands.
    """
    if running <= 0:
        return 0.0
    return max(0.0, running - tuning.fluctuation_z * math.sqrt(running))


def work(demand: Demand, *, tuning: spec_mod.Tuning) -> float:
    """The demand with the batch slowdown taken out: C / (1 + b/h) + backlog, for fleet concurrency C
    measured with batches of b sequences running.

    With service time proportional to 1 + b/h, per-pod concurrency on N' pods solves c' = q (1 + c'/h)
    for q = work / N', whatever fleet carried it: the figure moves between fleet sizes.
    """
    return (
        demand.concurrency_slots / (1.0 + demand.running_per_pod / tuning.batch_half_cost_seqs) + demand.backlog_slots
    )


def occupancy_on(work_slots: float, *, replicas: int, max_batch_size: int, tuning: spec_mod.Tuning) -> float:
    """How full batches of `max_batch_size` would run if `replicas` pods carried this work (inf: never settle)."""
    if replicas <= 0:
        return math.inf if work_slots > 0 else 0.0
    half = tuning.batch_half_cost_seqs
    per_pod = work_slots / replicas
    if per_pod >= half:
        return math.inf
    return per_pod / (1.0 - per_pod / half) / max_batch_size


def projected_occupancy(demand: Demand, *, replicas: int, max_batch_size: int, tuning: spec_mod.Tuning) -> float:
    """How full the batches would run if `replicas` pods carried this demand."""
    return occupancy_on(work(demand, tuning=tuning), replicas=replicas, max_batch_size=max_batch_size, tuning=tuning)


@dataclasses.dataclass(frozen=True, slots=True)
class Band:
    """Occupancy thresholds for one batch limit."""

    target: float
    up: float
    down: float


def band(*, max_batch_size: int, tuning: spec_mod.Tuning) -> Band:
    """The occupancy band, narrowed for small batches so Poisson swings of the batch rarely hit the limit.

    The largest u with u B + z sqrt(u B) <= B is u = ((sqrt(z^2 + 4B) - z) / 2)^2 / B; the tuning's
    thresholds scale down with it when it is below the nominal target.
    """
    z = tuning.fluctuation_z
    root = (math.sqrt(z * z + 4.0 * max_batch_size) - z) / 2.0
    fits = root * root / max_batch_size
    scale = min(1.0, fits / tuning.target_occupancy)
    return Band(
        target=tuning.target_occupancy * scale,
        up=tuning.scale_up_occupancy * scale,
        down=tuning.scale_down_occupancy * scale,
    )


def replicas_for(work_slots: float, *, max_batch_size: int, tuning: spec_mod.Tuning) -> float:
    """Replicas (fractional) whose batches would run exactly at the band's target with this work."""
    slots = band(max_batch_size=max_batch_size, tuning=tuning).target * max_batch_size
    return work_slots * (1.0 + slots / tuning.batch_half_cost_seqs) / slots


def wanted_replicas(demand: Demand, *, max_batch_size: int, tuning: spec_mod.Tuning) -> int:
    """The fewest replicas whose batches would run at most the band's target full."""
    return max(
        0, math.ceil(replicas_for(work(demand, tuning=tuning), max_batch_size=max_batch_size, tuning=tuning) - 1e-9)
    )


def decide_replicas(  # noqa: PLR0911 - the named steps in order; each return is the step that decided
    policy_input: spec_mod.PolicyInput,
    window: window_mod.ObservedWindow,
    *,
    demand: Demand | None,
    assessment: slo.SLOAssessment,
    max_batch_size: int,
    recommendations: tuple[state_mod.Recommendation, ...],
    history_start_s: float | None,
    shedding: bool,
    now: float,
    loading: startup_mod.Loading | None = None,
    surge: state_mod.Surge | None = None,
    demand_up: Demand | None = None,
) -> ReplicaDecision:
    """Bounds first, then hold on missing data, then up (fast), else down (slowly) or hold; each step below.

    `demand`: the estimate a scale-down must clear (and the work recorded for it); `demand_up`: the one to
    scale up on (`estimate_demand(beyond_swing=True)`: one scrape's swing of the gauge buys no pods); None:
    `demand` for both. Each direction acts on the estimate that is conservative for it.
    """
    spec = policy_input.spec
    if loading is None:
        loading = startup_mod.Loading(
            on_the_way=policy_input.starting_replicas, stuck=0, oldest_s=None, limit_s=math.inf
        )
    tick = _tick(policy_input, recommendations=recommendations, history_start_s=history_start_s, now=now, surge=surge)
    bounded = _outside_bounds(tick)
    if bounded is not None:
        return bounded
    if demand is None:
        why = window.reason or "queue gauges absent"
        return tick.result(
            tick.current,
            tick.current,
            None,
            None,
            f"replicas: hold {tick.current}, no usable metrics ({why}); never scale down on missing data",
        )
    sizing = _size(policy_input, window, demand, demand_up or demand, loading=loading, max_batch_size=max_batch_size)
    up = _scale_up(tick, sizing, assessment)
    if up is not None:
        return up
    blockers = _scale_down_blockers(
        window, policy_input.starting_replicas, shedding=shedding, assessment=assessment, sizing=sizing
    )
    if blockers:
        # A tick that could not justify a scale-down records no work, which blocks scale-down until it has
        # left the stabilization window.
        return tick.result(
            tick.current,
            tick.current,
            sizing.wanted,
            None,
            f"replicas: hold {tick.current}: {sizing.text}; no scale-down: {', '.join(blockers)}",
        )
    floor = max(spec.min_replicas, 1)
    rec = max(floor, min(tick.current, sizing.wanted))
    if tick.current <= floor:
        return tick.result(
            tick.current,
            rec,
            sizing.wanted,
            sizing.work_slots,
            f"replicas: hold {tick.current} at min {floor}: {sizing.text}",
        )
    released = _release_surge(tick, sizing, rec=rec, floor=floor)
    if released is not None:
        return released
    return _scale_down(tick, sizing, rec=rec, assessment=assessment)


@dataclasses.dataclass(frozen=True, slots=True)
class _Tick:
    """Where the fleet stands for one decision, and how to record its outcome."""

    spec: spec_mod.PolicySpec
    current: int
    now: float
    history: tuple[state_mod.Recommendation, ...]  # the recommendations still inside the longest window
    start_s: float  # since when the history covers the fleet
    surge: state_mod.Surge | None  # the surge still under way, if any

    def result(
        self, replicas: int, rec: int | None, wanted: int | None, work_slots: float | None, *reasons: str
    ) -> ReplicaDecision:
        recorded = self.history
        if rec is not None:
            recorded = (*self.history, state_mod.Recommendation(at_s=self.now, replicas=rec, work=work_slots))
        kept = self.surge
        if replicas > self.current:
            # A scale-up starts a surge, or extends the one under way (keeping its base).
            base = min(self.current, self.surge.base) if self.surge is not None else self.current
            kept = state_mod.Surge(at_s=self.now, base=base, work=work_slots if work_slots is not None else 0.0)
        elif kept is not None and replicas <= kept.base:
            kept = None
        return ReplicaDecision(
            replicas, rec, wanted, reasons, recorded[-state_mod.MAX_RECOMMENDATIONS :], self.start_s, kept
        )


def _tick(
    policy_input: spec_mod.PolicyInput,
    *,
    recommendations: tuple[state_mod.Recommendation, ...],
    history_start_s: float | None,
    now: float,
    surge: state_mod.Surge | None,
) -> _Tick:
    spec = policy_input.spec
    current = policy_input.current_replicas
    horizon_s = max(spec.scale_up_stabilization_s, spec.scale_down_stabilization_s) + spec.interval_s
    history = tuple(r for r in recommendations if r.at_s >= now - horizon_s)[-state_mod.MAX_RECOMMENDATIONS :]
    # A surge lasts while its pods are still above the base and younger than the scale-down window; after
    # that the ordinary scale-down rule governs them.
    if surge is not None and (current <= surge.base or now - surge.at_s >= spec.scale_down_stabilization_s):
        surge = None
    return _Tick(
        spec=spec,
        current=current,
        now=now,
        history=history,
        start_s=now if history_start_s is None else min(history_start_s, now),
        surge=surge,
    )


def _outside_bounds(tick: _Tick) -> ReplicaDecision | None:
    """Autoscaling off, a count outside the spec's bounds, or a parked service: decided without metrics."""
    spec, current = tick.spec, tick.current
    low, high = spec.min_replicas, spec.max_replicas
    if not spec.autoscaling:
        return tick.result(current, None, None, None, f"replicas: autoscaling off, {current} as set through /scale")
    if current < low:
        return tick.result(low, None, None, None, f"replicas: {current} -> {low}, below spec min {low}")
    if current > high:
        return tick.result(high, None, None, None, f"replicas: {current} -> {high}, above spec max {high}")
    if current == 0:
        return tick.result(
            0, None, None, None, "replicas: 0, the service is parked (min 0); the tuner does not scale up from 0"
        )
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class _Sizing:
    """The demand projected onto the fleet as it is, pods on their way included."""

    work_slots: float  # the demand's work, recorded with the recommendation
    wanted: int  # replicas at the band's target for the whole demand
    ask: int  # replicas the demand asks for with the backlog weighed by who can drain it
    limits: Band
    max_batch_size: int
    tuning: spec_mod.Tuning
    load_now: float  # occupancy of the counted replicas
    on_the_way: int  # pods loading, counted as capacity
    unmeasured: int  # pods ready but not measured over a window yet
    waiting: float  # requests waiting per pod
    text: str  # the demand, for the reasons


def _size(
    policy_input: spec_mod.PolicyInput,
    window: window_mod.ObservedWindow,
    demand: Demand,
    demand_up: Demand,
    *,
    loading: startup_mod.Loading,
    max_batch_size: int,
) -> _Sizing:
    spec = policy_input.spec
    tuning = spec.tuning
    current = policy_input.current_replicas
    on_the_way, stuck = loading.on_the_way, loading.stuck
    # Projected onto every pod asked for, those still loading included: their capacity is on its way.
    # While some load, or have just turned ready and were not measured over a window yet, the backlog is
    # theirs to drain, so only the arrival rate (demand they will not serve) may ask for more; pods
    # loading for too long are not counted at all. Replicas for a backlog help only if they arrive while
    # it lasts: with start-ups longer than the drain time the backlog counts in proportion.
    just_ready = sum(
        1 for p in policy_input.started if p.ready_for_s is not None and p.ready_for_s < 2 * spec.interval_s
    )
    unmeasured = max(0, window.num_pods_sampled - window.num_pods_with_delta, just_ready)
    backlog_weight = 1.0
    if on_the_way or unmeasured:
        backlog_weight = 0.0
    elif loading.startup_s is not None and loading.startup_s > tuning.backlog_drain_s:
        backlog_weight = tuning.backlog_drain_s / loading.startup_s
    backlog = demand_up.backlog_slots * backlog_weight
    sizing = dataclasses.replace(demand_up, slots=demand_up.concurrency_slots + backlog, backlog_slots=backlog)
    counted = current - stuck
    load_now = occupancy_on(work(sizing, tuning=tuning), replicas=counted, max_batch_size=max_batch_size, tuning=tuning)
    loading_txt = []
    if on_the_way:
        loading_txt.append(f"{on_the_way} loading, backlog left to them")
    elif unmeasured:
        loading_txt.append(f"{unmeasured} just ready, backlog left to them")
    if stuck:
        loading_txt.append(f"{stuck} loading > {loading.limit_s:.0f}s, not counted")
    if demand_up.concurrency_slots < demand.concurrency_slots:
        loading_txt.append(f"the gauge as read, {demand.concurrency_slots:.0f} slots, for scale-down")
    return _Sizing(
        work_slots=work(demand, tuning=tuning),
        wanted=wanted_replicas(demand, max_batch_size=max_batch_size, tuning=tuning),
        ask=wanted_replicas(sizing, max_batch_size=max_batch_size, tuning=tuning) + stuck,
        limits=band(max_batch_size=max_batch_size, tuning=tuning),
        max_batch_size=max_batch_size,
        tuning=tuning,
        load_now=load_now,
        on_the_way=on_the_way,
        unmeasured=unmeasured,
        waiting=window.waiting_per_pod or 0.0,
        text=(
            f"demand {sizing.slots:.0f} slots ({demand_up.basis}; backlog {sizing.backlog_slots:.0f}) fills "
            f"{max_batch_size}-seq batches {load_now:.0%} on {counted} replicas"
            + (f" ({'; '.join(loading_txt)})" if loading_txt else "")
        ),
    )


def _scale_up(tick: _Tick, sizing: _Sizing, assessment: slo.SLOAssessment) -> ReplicaDecision | None:
    """Up when the demand would fill the fleet past the band, or the SLO is missed under load; capped per
    step and held for the scale-up stabilization. None: no reason to scale up."""
    spec, current, tuning = tick.spec, tick.current, sizing.tuning
    if sizing.load_now > sizing.limits.up:
        why_up = f"{sizing.text} > {sizing.limits.up:.0%}"
    elif (
        assessment.met is False
        and sizing.on_the_way == 0
        and sizing.unmeasured == 0  # a miss from before the new pods served says nothing of the fleet they make
        and (sizing.waiting > tuning.short_queue_per_pod or sizing.load_now >= sizing.limits.target)
    ):
        why_up = f"SLO missed under load ({assessment.detail}); {sizing.text}"
    else:
        return None
    up = max(sizing.ask, current + 1)
    high = spec.max_replicas
    cap = max(math.ceil(current * tuning.max_scale_up_factor), current + tuning.max_scale_up_min_step)
    rec = min(high, up, cap)
    wanted, work_slots = sizing.wanted, sizing.work_slots
    if rec <= current:
        return tick.result(current, current, wanted, work_slots, f"replicas: hold {current} at spec max; {why_up}")
    in_window = [r.replicas for r in tick.history if r.at_s > tick.now - spec.scale_up_stabilization_s]
    target = min([*in_window, rec])
    if target <= current:
        return tick.result(
            current,
            rec,
            wanted,
            work_slots,
            f"replicas: hold {current}, scale-up to {rec} waits for {spec.scale_up_stabilization_s:.0f}s "
            f"stabilization; {why_up}",
        )
    capped = " (step cap)" if rec == cap and cap < min(high, up) else ""
    return tick.result(target, rec, wanted, work_slots, f"replicas: scale up {current} -> {target}{capped}: {why_up}")


def _scale_down_blockers(
    window: window_mod.ObservedWindow,
    starting: int,
    *,
    shedding: bool,
    assessment: slo.SLOAssessment,
    sizing: _Sizing,
) -> list[str]:
    """Why this tick may not scale down (empty: it may)."""
    blockers: list[str] = []
    if not window.complete:
        blockers.append(f"incomplete metrics ({window.reason})")
    if starting:
        blockers.append(f"{starting} pods starting")
    if shedding:
        blockers.append("shedding")
    if not assessment.headroom:
        blockers.append(f"no latency headroom ({assessment.detail})")
    if sizing.waiting > sizing.tuning.short_queue_per_pod:
        blockers.append(f"{sizing.waiting:.1f} waiting/pod")
    return blockers


def _release_surge(tick: _Tick, sizing: _Sizing, *, rec: int, floor: int) -> ReplicaDecision | None:
    """Burst release: the ticks since the surge's latest scale-up (that tick itself measured the burst)
    are all clean, and even their peak work would fill fewer pods at most to the band's target if they
    are the fleet from before the surge (a size already in steady use), else at most to the scale-down
    threshold (where the ordinary rule would land too). None: no surge to release.

    Giving those pods back now, not a stabilization window later, is what keeps a burst every few minutes
    from holding the burst's fleet for good. Steady load never triggers it: a scale-up on noise sees about
    the same work afterwards, not `release_drop` of it, and without a recent scale-up there is no surge.
    The cost is the next burst's onset, served by the smaller fleet until new pods are ready: a service
    that cannot afford that sets a longer window's worth of min replicas, or turns release off with a
    release_drop near 0.
    """
    surge, current, tuning, limits = tick.surge, tick.current, sizing.tuning, sizing.limits
    if surge is None:
        return None
    needed = max(1, tuning.release_intervals) - 1
    since = [r for r in tick.history if r.at_s > surge.at_s][-needed:] if needed else []
    works = [sizing.work_slots, *(r.work for r in since if r.work is not None)]
    # Only once the demand has fallen well below what asked for the surge: a scale-up on noise at
    # steady load sees about the same work afterwards, and giving its pod back would cycle.
    if len(works) != needed + 1 or max(works) > tuning.release_drop * surge.work:
        return None
    peak = max(works)
    low_end = max(floor, surge.base)
    fits = [
        n
        for n in range(low_end, current)
        if occupancy_on(peak, replicas=n, max_batch_size=sizing.max_batch_size, tuning=tuning)
        <= (limits.target if n == surge.base else limits.down)
    ]
    if not fits:
        return None
    back = fits[0]
    load = occupancy_on(peak, replicas=back, max_batch_size=sizing.max_batch_size, tuning=tuning)
    return tick.result(
        back,
        rec,
        sizing.wanted,
        sizing.work_slots,
        f"replicas: release {current} -> {back}, the surge since {surge.at_s:.0f}s is over (work "
        f"{peak:.0f} <= {tuning.release_drop:.0%} of its {surge.work:.0f}): "
        f"{back} replicas would run {load:.0%} full at the peak of the {len(since) + 1} clean "
        f"tick(s) since (<= {limits.target if back == surge.base else limits.down:.0%}; "
        f"not below {low_end}); {sizing.text}",
    )


def _scale_down(tick: _Tick, sizing: _Sizing, *, rec: int, assessment: slo.SLOAssessment) -> ReplicaDecision:
    """One replica fewer when the whole scale-down window was clean and its average work would fill the
    smaller fleet at most to the band's lower threshold (and its peak not past the upper); else hold."""
    spec, current, now = tick.spec, tick.current, tick.now
    wanted, work_slots, limits, demand_txt = sizing.wanted, sizing.work_slots, sizing.limits, sizing.text
    covered_s = now - tick.start_s
    if covered_s < spec.scale_down_stabilization_s:
        return tick.result(
            current,
            rec,
            wanted,
            work_slots,
            f"replicas: hold {current}, only {covered_s:.0f}s of history < {spec.scale_down_stabilization_s:.0f}s "
            f"stabilization; {demand_txt}",
        )
    in_window = [r for r in tick.history if r.at_s > now - spec.scale_down_stabilization_s]
    blocked = sum(1 for r in in_window if r.work is None)
    if blocked:
        return tick.result(
            current,
            rec,
            wanted,
            work_slots,
            f"replicas: hold {current}, {blocked} tick(s) of the last {spec.scale_down_stabilization_s:.0f}s could "
            f"not justify a scale-down; {demand_txt}",
        )
    works = [*(r.work for r in in_window if r.work is not None), work_slots]
    fewer = current - 1
    size, tuning = sizing.max_batch_size, sizing.tuning
    mean_load = occupancy_on(sum(works) / len(works), replicas=fewer, max_batch_size=size, tuning=tuning)
    peak_load = occupancy_on(max(works), replicas=fewer, max_batch_size=size, tuning=tuning)
    if mean_load > limits.down or peak_load > limits.up:
        return tick.result(
            current,
            rec,
            wanted,
            work_slots,
            f"replicas: hold {current}: {fewer} replicas would run {mean_load:.0%} full on average over the last "
            f"{spec.scale_down_stabilization_s:.0f}s (scale down at <= {limits.down:.0%}), "
            f"{peak_load:.0%} at peak; {demand_txt}",
        )
    return tick.result(
        fewer,
        rec,
        wanted,
        work_slots,
        f"replicas: scale down {current} -> {fewer} (one step): {fewer} replicas would run {mean_load:.0%} full on "
        f"average over the last {spec.scale_down_stabilization_s:.0f}s, {peak_load:.0%} at peak; {demand_txt}; "
        f"{assessment.detail}",
    )
