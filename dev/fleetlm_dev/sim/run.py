"""Replay a trace against N simulated replicas under a tuning policy; measure what users and budgets see.

The loop is the operator's, with simulated pods: arrivals are routed at random to ready pods (a plain
Service), or, when the simulated service has `spec.router.enabled` (`FleetOptions.router`), to the least
loaded ready pod by the router's own picker (`fleetlm_router.picker.least_loaded` on its in-flight counts: the
sim's prompts share no prefix, so every pick is the router's least-loaded one); every interval each ready pod
is scraped, `window.from_scrapes` turns the two latest scrapes into an `ObservedWindow`, the policy decides,
and the decision is applied: new pods become ready after the start-up delay, removed pods stop taking requests
and drain what they hold, batch limits reach every pod at the next step, shed classes are refused (429) at the
pod. Afterwards the run is scored from the requests' true latencies: SLO attainment overall and per class,
refused requests, replica-minutes (pods that exist, starting and draining included) against the oracle,
replica changes, and the recovery after a step in tuning intervals. Imports only `policy`, the router's pure
`picker`, numpy and the standard library.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from collections.abc import Callable, Mapping

import numpy as np

from fleetlm_dev.sim import calibration, hpa, oracle, replica, workload
from fleetlm_operator.policy import decide, window
from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import state as state_mod
from fleetlm_router import picker


class Policy:
    """A named decision function with the `decide.decide` signature."""

    def __init__(
        self,
        name: str,
        fn: Callable[..., decide.Decision],
    ) -> None:
        self.name = name
        self.fn = fn

    def __call__(
        self,
        policy_input: spec_mod.PolicyInput,
        observed: window.ObservedWindow,
        state: state_mod.TunerState,
        *,
        now: float,
    ) -> decide.Decision:
        return self.fn(policy_input, observed, state, now=now)


POLICIES: dict[str, Policy] = {
    "fleetlm": Policy("fleetlm", decide.decide),
    "hpa": Policy("hpa", hpa.decide),
}


def default_spec(trace: workload.Trace) -> spec_mod.PolicySpec:
    """The LLMService the simulator tunes: chat-like SLO, batching from 32 within 8..256, 15 s interval."""
    return spec_mod.PolicySpec(
        slo=spec_mod.SLOTargets(ttft_s=0.5, tpot_s=0.05, percentile=95.0),
        min_replicas=trace.min_replicas,
        max_replicas=trace.max_replicas,
        batching=spec_mod.BatchingBounds(
            max_batch_size=32,
            max_batch_tokens=2048,
            min_max_batch_size=8,
            max_max_batch_size=256,
            min_max_batch_tokens=256,
            max_max_batch_tokens=8192,
        ),
        classes=tuple(
            spec_mod.ClassSpec(name=c.name, priority=c.priority, sheddable=c.sheddable) for c in trace.classes
        ),
        interval_s=15.0,
        scale_up_stabilization_s=0.0,
        scale_down_stabilization_s=300.0,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class FleetOptions:
    """How the runtime and its clients behave around the tuner."""

    # Per-class queue limit per replica (the runtime's `qos.classes[].queueLimit`): past it, 429 with
    # Retry-After. Unbounded queues behind a random-routing Service trap a backlog in the pods that
    # took it, however fast the fleet grows; a limit keeps it with the clients, who retry anywhere.
    queue_limit: int | None = 32
    retry_after_s: float = 1.0
    max_retries: int = 2  # the openai client's default
    # The service's `spec.router.enabled`: arrivals go through the router (least loaded by its in-flight
    # count, which is exact when all traffic goes through it) instead of the Service's random spread. A
    # router sends arrivals to pods that just turned ready, which a Service does not prefer: after a step
    # the old pods keep full batches and queues while the new ones fill from a random share.
    router: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Tick:
    """One tuning interval as it happened."""

    t_s: float
    offered_per_s: float
    ready: int
    starting: int
    draining: int
    replicas: int  # what the policy asked for
    oracle: int
    max_batch_size: int
    max_batch_tokens: int
    shed: tuple[str, ...]
    complete: bool
    reasons: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """A scored run."""

    trace: str
    policy: str
    interval_s: float
    attainment_target: float
    startup_s: float  # how long a new pod took to become ready in this run
    ticks: tuple[Tick, ...]
    num_requests: int
    num_shed: Mapping[str, int]  # refused because their class was shed (not counted in attainment)
    num_failed: int  # refused (queue full, no endpoint) until the client gave up: counted as misses
    attainment: float  # over all requests not shed
    attainment_by_class: Mapping[str, float]
    replica_minutes: float
    oracle_replica_minutes: float
    num_changes: int
    recovery_intervals: int | None  # step traces: intervals until back at target for good (`recovery_intervals`)
    steady_changes: int | None  # changes within the trace's steady window
    interval_t_s: np.ndarray  # per-interval ground truth, by arrival time
    interval_attainment: np.ndarray
    interval_ttft_s: np.ndarray  # at the SLO percentile
    interval_tpot_s: np.ndarray
    capacity: oracle.Capacity
    ttft_target_s: float | None
    tpot_target_s: float | None
    percentile: float
    router: bool = False  # arrivals went through the router (least loaded), not the Service's random spread

    @property
    def variant(self) -> str:
        """The policy, and the routing when it is the router's: the column this run's verdicts go in."""
        return f"{self.policy}+router" if self.router else self.policy

    @property
    def cost_ratio(self) -> float:
        return self.replica_minutes / self.oracle_replica_minutes if self.oracle_replica_minutes > 0 else math.inf


class _Fleet:
    def __init__(
        self, *, calib: calibration.Calibration, names: tuple[str, ...], sink: replica.Sink, queue_limit: int | None
    ) -> None:
        self.calib = calib
        self.queue_limit = queue_limit
        self.queue_limits: list[int | None] = [queue_limit] * len(names)  # in force now (the tuner may move them)
        self.names = names
        self.sink = sink
        self.ready: list[replica.Replica] = []
        self.starting: list[replica.Replica] = []
        self.draining: list[replica.Replica] = []
        self.pod_seconds = 0.0
        self._serial = 0

    def add(self, *, now: float, ready_s: float, max_batch_size: int, max_batch_tokens: int) -> None:
        self._serial += 1
        pod = replica.Replica(
            f"pod-{self._serial}",
            calib=self.calib,
            class_names=self.names,
            max_batch_size=max_batch_size,
            max_batch_tokens=max_batch_tokens,
            created_s=now,
            ready_s=ready_s,
            sink=self.sink,
            queue_limit=self.queue_limit,
        )
        pod.set_queue_limits(self.queue_limits)
        (self.ready if ready_s <= now else self.starting).append(pod)

    def promote(self, t: float) -> None:
        if self.starting and any(p.ready_s <= t for p in self.starting):
            self.ready.extend(p for p in self.starting if p.ready_s <= t)
            self.starting = [p for p in self.starting if p.ready_s > t]

    def remove(self, count: int, *, now: float) -> None:
        """Like a ReplicaSet scaling down: pods not ready yet go first, then the newest ready ones."""
        while count > 0 and self.starting:
            pod = self.starting.pop()
            self.pod_seconds += now - pod.created_s
            count -= 1
        while count > 0 and len(self.ready) > 0:
            pod = self.ready.pop()
            self.draining.append(pod)
            count -= 1

    def reap(self, now: float) -> None:
        still: list[replica.Replica] = []
        for pod in self.draining:
            pod.advance_to(now)
            if pod.idle:
                self.pod_seconds += max(pod.now, pod.created_s) - pod.created_s
            else:
                still.append(pod)
        self.draining = still

    @property
    def size(self) -> int:
        return len(self.ready) + len(self.starting)


def simulate(
    trace: workload.Trace,
    policy: Policy,
    *,
    calib: calibration.Calibration = calibration.GPU_LIKE,
    spec: spec_mod.PolicySpec | None = None,
    options: FleetOptions = FleetOptions(),
    seed: int = 1,
) -> Outcome:
    spec = spec or default_spec(trace)
    if options.queue_limit is not None:
        # The runtime's class queueLimit is the spec's: a cap on the tuner's time-sized bound too.
        spec = dataclasses.replace(
            spec,
            classes=tuple(
                c if c.queue_limit is not None else dataclasses.replace(c, queue_limit=options.queue_limit)
                for c in spec.classes
            ),
        )
    capacity = oracle.replica_capacity(trace.classes, calib, spec)
    startup_s = trace.startup_for(calib.startup_s)
    arrivals = workload.generate(trace, rate_per_replica=capacity.rate_per_s, seed=seed)
    names = trace.class_names()
    rng = np.random.default_rng(seed + 1)
    route = rng.random(len(arrivals.times_s))
    interval_s = spec.interval_s

    done: list[replica.Seq] = []
    fleet = _Fleet(calib=calib, names=names, sink=done.append, queue_limit=options.queue_limit)
    limits = decide.current_limits(spec, state_mod.TunerState())
    initial = int(
        oracle.replicas_needed(
            trace.load(np.array([0.0])), min_replicas=spec.min_replicas, max_replicas=spec.max_replicas
        )[0]
    )
    for _ in range(initial):
        fleet.add(
            now=-60.0, ready_s=-60.0, max_batch_size=limits.max_batch_size, max_batch_tokens=limits.max_batch_tokens
        )

    state = state_mod.TunerState()
    shed: frozenset[int] = frozenset()
    shed_names: tuple[str, ...] = ()
    failed: list[replica.Seq] = []  # refused until the client gave up (queue full, no endpoint)
    num_shed = [0] * len(names)
    previous: dict[str, window.PodSample] = {}
    ticks: list[Tick] = []
    times = arrivals.times_s
    prompts = arrivals.prompt_tokens
    outputs = arrivals.output_tokens
    classes = arrivals.class_index
    total = len(times)
    index = 0
    num_ticks = int(trace.duration_s // interval_s) + 1
    retries: list[tuple[float, int, replica.Seq]] = []  # (when, tie, request) refused and retried by the client
    retry_rng = np.random.default_rng(seed + 2)
    picks = 0  # the router's tie-break counter

    def refused(seq: replica.Seq, t: float, *, by_shedding: bool) -> None:
        # The openai client retries a 429 (honouring Retry-After) or a refused connection max_retries times.
        if seq.attempts <= options.max_retries:
            seq.attempts += 1
            heapq.heappush(retries, (t + options.retry_after_s, id(seq), seq))
        elif by_shedding:
            num_shed[seq.cls] += 1
        else:
            seq.finish_s = t
            failed.append(seq)

    for k in range(num_ticks + 1):
        tick_s = k * interval_s
        # Arrivals (and clients' retries) up to this tick, routed at random to a ready pod.
        while True:
            next_arrival = float(times[index]) if index < total else math.inf
            next_retry = retries[0][0] if retries else math.inf
            t = min(next_arrival, next_retry)
            if t >= tick_s:
                break
            if next_retry <= next_arrival:
                seq = heapq.heappop(retries)[2]
                pick = float(retry_rng.random())
            else:
                seq = replica.Seq(t, int(prompts[index]), int(outputs[index]), int(classes[index]))
                pick = float(route[index])
                index += 1
            fleet.promote(t)
            ready = fleet.ready
            if not ready:
                refused(seq, t, by_shedding=False)  # no endpoint: connection refused
                continue
            if options.router:
                picks += 1
                pod = _least_loaded(ready, t, tie_break=picks)
            else:
                pod = ready[int(pick * len(ready))]
            if seq.cls in shed:
                pod.reject(seq)
                refused(seq, t, by_shedding=True)
                continue
            pod.advance_to(t)
            if not pod.submit(seq, t):
                refused(seq, t, by_shedding=False)
        if k == num_ticks:
            break
        fleet.promote(tick_s)
        fleet.reap(tick_s)
        current: dict[str, window.PodSample] = {}
        for pod in fleet.ready:
            pod.advance_to(tick_s)
            current[pod.name] = pod.scrape(tick_s)
        observed = window.from_scrapes(
            previous,
            current,
            expected_pods=current.keys(),
            spec=spec,
            now_s=tick_s,
            max_age_s=2 * interval_s,
        )
        previous = current
        before = fleet.size
        if k == 0:
            decision = None  # the first scrape is only a baseline
        else:
            # What the operator reads off the pods: the loading ones' ages, and how long each ready one
            # took from creation (the initial fleet was there before the run, so it says nothing).
            policy_input = spec_mod.PolicyInput(
                spec=spec,
                current_replicas=before,
                ready_replicas=len(fleet.ready),
                loading_ages_s=tuple(tick_s - pod.created_s for pod in fleet.starting),
                started=tuple(
                    spec_mod.PodStartup(pod.name, pod.ready_s - pod.created_s, ready_for_s=tick_s - pod.ready_s)
                    for pod in fleet.ready
                    if pod.created_s >= 0.0
                ),
            )
            decision = policy(
                policy_input,
                observed,
                state,
                now=tick_s,
            )
            state = decision.state
            new_limits = (decision.max_batch_size, decision.max_batch_tokens)
            if new_limits != (limits.max_batch_size, limits.max_batch_tokens):
                limits = dataclasses.replace(limits, max_batch_size=new_limits[0], max_batch_tokens=new_limits[1])
                for pod in (*fleet.ready, *fleet.starting):
                    pod.advance_to(tick_s)
                    pod.set_limits(limits.max_batch_size, limits.max_batch_tokens, tick_s)
            queue_limits = [decision.queue_limits.get(n, options.queue_limit) for n in names]
            if queue_limits != fleet.queue_limits:
                # Pushed with the rest of the live config: pods that start later get it too.
                fleet.queue_limits = queue_limits
                for pod in (*fleet.ready, *fleet.starting):
                    pod.set_queue_limits(queue_limits)
            if decision.replicas > before:
                for _ in range(decision.replicas - before):
                    fleet.add(
                        now=tick_s,
                        ready_s=tick_s + startup_s,
                        max_batch_size=limits.max_batch_size,
                        max_batch_tokens=limits.max_batch_tokens,
                    )
            elif decision.replicas < before:
                fleet.remove(before - decision.replicas, now=tick_s)
            shed_names = decision.shed_classes
            shed = frozenset(names.index(n) for n in shed_names if n in names)
        load_now = float(trace.load(np.array([tick_s]))[0])
        ticks.append(
            Tick(
                t_s=tick_s,
                offered_per_s=load_now * capacity.rate_per_s,
                ready=len(fleet.ready),
                starting=len(fleet.starting),
                draining=len(fleet.draining),
                replicas=fleet.size,
                oracle=int(
                    oracle.replicas_needed(
                        np.array([load_now]), min_replicas=spec.min_replicas, max_replicas=spec.max_replicas
                    )[0]
                ),
                max_batch_size=limits.max_batch_size,
                max_batch_tokens=limits.max_batch_tokens,
                shed=shed_names,
                complete=observed.complete,
                reasons=() if decision is None else decision.reasons,
            )
        )

    end_s = num_ticks * interval_s
    for pod in (*fleet.ready, *fleet.draining):
        pod.advance_to(math.inf)  # let every admitted request finish, so each is scored
    for pod in (*fleet.ready, *fleet.starting):
        fleet.pod_seconds += end_s - pod.created_s
    for pod in fleet.draining:
        fleet.pod_seconds += min(pod.now, end_s) - pod.created_s
    outcome = _score(
        trace,
        policy.name,
        spec=spec,
        capacity=capacity,
        ticks=ticks,
        done=done,
        failed=failed,
        num_shed=num_shed,
        names=names,
        pod_seconds=fleet.pod_seconds,
        end_s=end_s,
        startup_s=startup_s,
    )
    return dataclasses.replace(outcome, router=options.router)


def _score(
    trace: workload.Trace,
    policy_name: str,
    *,
    spec: spec_mod.PolicySpec,
    capacity: oracle.Capacity,
    ticks: list[Tick],
    done: list[replica.Seq],
    failed: list[replica.Seq],
    num_shed: list[int],
    names: tuple[str, ...],
    pod_seconds: float,
    end_s: float,
    startup_s: float,
) -> Outcome:
    interval_s = spec.interval_s
    targets = [spec.targets_for(n) for n in names]
    # Served requests, then those refused until their client gave up: the latter miss by definition.
    everyone = [*done, *failed]
    count = len(everyone)
    cls = np.fromiter((s.cls for s in everyone), dtype=np.int64, count=count)
    arrival = np.fromiter((s.arrival_s for s in everyone), dtype=float, count=count)
    first = np.fromiter((s.first_s for s in everyone), dtype=float, count=count)
    finish = np.fromiter((s.finish_s for s in everyone), dtype=float, count=count)
    output = np.fromiter((s.output for s in everyone), dtype=np.int64, count=count)
    served = np.arange(count) < len(done)
    ttft = np.where(served, first - arrival, np.inf)
    tpot = np.where(served & (output > 1), (finish - first) / np.maximum(output - 1, 1), 0.0)
    met = served.copy()
    for i, (ttft_target, tpot_target) in enumerate(targets):
        mask = cls == i
        if ttft_target is not None:
            met[mask] &= ttft[mask] <= ttft_target
        if tpot_target is not None:
            met[mask] &= tpot[mask] <= tpot_target
    attainment = float(met.sum()) / count if count else 1.0
    by_class = {}
    for i, name in enumerate(names):
        mask = cls == i
        n = int(mask.sum())
        by_class[name] = float(met[mask].sum()) / n if n else 1.0

    # Per tuning interval, by arrival time: of the requests sent in this interval, how many met the SLO.
    # (By finish time the tail of long answers that started late smears a recovery over later intervals.)
    bins = np.floor(arrival / interval_s).astype(np.int64)
    num_bins = math.ceil(end_s / interval_s) + 1
    bins = np.clip(bins, 0, num_bins - 1)
    totals = np.bincount(bins, minlength=num_bins)
    good = np.bincount(bins, weights=met.astype(float), minlength=num_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_interval = np.where(totals > 0, good / np.maximum(totals, 1), np.nan)
    q = spec.slo.percentile
    ttft_q = np.full(num_bins, np.nan)
    tpot_q = np.full(num_bins, np.nan)
    order = np.argsort(bins, kind="stable")
    edges = np.searchsorted(bins[order], np.arange(num_bins + 1))
    for b in range(num_bins):
        members = order[edges[b] : edges[b + 1]]
        members = members[served[members]]
        if len(members):
            ttft_q[b] = np.percentile(ttft[members], q)
            multi = members[output[members] > 1]
            if len(multi):
                tpot_q[b] = np.percentile(tpot[multi], q)

    target = spec.slo.target_attainment
    recovery = None
    steady = None
    if trace.step_at_s is not None:
        first_bin = int(trace.step_at_s // interval_s)
        # The last bin holds only the arrivals of the trace's final instant: not a whole interval.
        recovery = recovery_intervals(good[first_bin : num_bins - 1], totals[first_bin : num_bins - 1], target=target)
    if trace.steady_from_s is not None and trace.steady_to_s is not None:
        steady = _changes(ticks, start_s=trace.steady_from_s, end_s=trace.steady_to_s)

    grid = np.arange(0.0, end_s, 1.0)
    needed = oracle.replicas_needed(trace.load(grid), min_replicas=spec.min_replicas, max_replicas=spec.max_replicas)
    ttft_target, tpot_target = spec.slo.ttft_s, spec.slo.tpot_s
    return Outcome(
        trace=trace.name,
        policy=policy_name,
        interval_s=interval_s,
        attainment_target=target,
        startup_s=startup_s,
        ticks=tuple(ticks),
        num_requests=count + sum(num_shed),
        num_shed={name: num_shed[i] for i, name in enumerate(names)},
        num_failed=len(failed),
        attainment=attainment,
        attainment_by_class=by_class,
        replica_minutes=pod_seconds / 60.0,
        oracle_replica_minutes=float(needed.sum()) / 60.0,
        num_changes=_changes(ticks, start_s=0.0, end_s=end_s),
        recovery_intervals=recovery,
        steady_changes=steady,
        interval_t_s=np.arange(num_bins) * interval_s,
        interval_attainment=per_interval,
        interval_ttft_s=ttft_q,
        interval_tpot_s=tpot_q,
        capacity=capacity,
        ttft_target_s=ttft_target,
        tpot_target_s=tpot_target,
        percentile=q,
    )


def recovery_intervals(good: np.ndarray, totals: np.ndarray, *, target: float) -> int:
    """Intervals the service took to recover from a step: the fewest k such that, counting from the (k+1)-th
    interval of the plateau (the step's own interval is the first), attainment is at target at every point
    of the rest of the plateau, i.e. for every later interval j the requests that arrived from interval
    k+1 through j met the SLO at least `target` of the time. `good`/`totals`: per interval of the plateau,
    requests that met the SLO and requests sent (by arrival time).

    Back at target, and staying there: the interval it comes back is at target on its own (j = k+1), and
    the service from then on never falls below target, over any stretch that starts there. A later dip
    that the service since recovery absorbs (one interval at 94.6% twenty minutes on, at a fleet that
    meets 98% around it) is not the step still being recovered from; a run of poor intervals, at any
    point, pulls the running attainment under target and moves the recovery past it. Counting up to the
    last interval below target anywhere on the plateau instead read such a dip as "91 intervals", a bar
    no fleet sized near the SLO's edge could meet: a fleet meeting 95% exactly (the oracle's sizing) has
    15-second intervals scattered about 95%, some below it. The plateau's length in intervals when it
    never recovers. Applied alike to every policy and routing.
    """
    count = len(totals)
    for start in range(count):
        sent = np.cumsum(totals[start:])
        met = np.cumsum(good[start:])
        judged = sent > 0
        if not judged.any() or np.all(met[judged] >= target * sent[judged] - 1e-9):
            return start
    return count


def _least_loaded(ready: list[replica.Replica], t: float, *, tie_break: int) -> replica.Replica:
    """The router's least-loaded pick at `t`: its in-flight count per pod is what the pod holds (queued,
    prefilling, decoding), since every request reached the pod through it."""
    by_name: dict[str, replica.Replica] = {}
    in_flight: dict[str, int] = {}
    for pod in ready:
        pod.advance_to(t)
        by_name[pod.name] = pod
        in_flight[pod.name] = pod.in_flight
    return by_name[picker.least_loaded(list(by_name), in_flight, tie_break=tie_break)]


def _changes(ticks: list[Tick], *, start_s: float, end_s: float) -> int:
    changes = 0
    for before, after in itertools.pairwise(ticks):
        if start_s <= after.t_s < end_s and after.replicas != before.replicas:
            changes += 1
    return changes
