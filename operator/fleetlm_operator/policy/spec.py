"""The tuning policy's own view of an `LLMService`: the numbers the control law reads, and its constants.

This module decides nothing. It holds small frozen values so the policy does not depend on the CRD
models (`api/`); the handler maps `LLMService.spec` onto `PolicySpec` and the cluster's replica
counts onto `PolicyInput`. It must never import pydantic models, kopf, a Kubernetes client or anything
that does I/O, and it reads no clock and no environment.
"""

from __future__ import annotations

import dataclasses
import math

# The class every request belongs to when the spec names none (the runtime config's default class; the
# ConfigMap builder renders it under this name).
DEFAULT_CLASS_NAME = "default"


@dataclasses.dataclass(frozen=True, slots=True)
class ClassSpec:
    """One QoS class as the policy sees it. Unset targets fall back to `SLOTargets`."""

    name: str
    priority: int = 0  # lower runs sooner; among sheddable classes the highest number is shed first
    sheddable: bool = False
    ttft_s: float | None = None
    tpot_s: float | None = None
    queue_limit: int | None = None  # the class's own per-replica queue limit (spec queueLimit): a cap on the tuner's


@dataclasses.dataclass(frozen=True, slots=True)
class SLOTargets:
    """Latency targets at a percentile; `attainment_target` is the fraction of requests that must meet them."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    percentile: float = 95.0
    attainment_target: float | None = None  # None: percentile / 100

    def __post_init__(self) -> None:
        if not 0.0 < self.percentile < 100.0:
            raise ValueError(f"percentile must lie strictly between 0 and 100, got {self.percentile}")
        for name, value in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")
        if self.attainment_target is not None and not 0.0 < self.attainment_target <= 1.0:
            raise ValueError(f"attainment_target must lie in (0, 1], got {self.attainment_target}")

    @property
    def quantile(self) -> float:
        return self.percentile / 100.0

    @property
    def target_attainment(self) -> float:
        return self.quantile if self.attainment_target is None else self.attainment_target


@dataclasses.dataclass(frozen=True, slots=True)
class BatchingBounds:
    """Where the batch limits start and the bounds the tuner may move them within."""

    max_batch_size: int = 32
    max_batch_tokens: int = 8192
    min_max_batch_size: int = 1
    max_max_batch_size: int = 1024
    min_max_batch_tokens: int = 16
    max_max_batch_tokens: int = 131072
    autotune: bool = True

    def __post_init__(self) -> None:
        if not self.min_max_batch_size <= self.max_batch_size <= self.max_max_batch_size:
            raise ValueError("max_batch_size must lie within its bounds")
        if not self.min_max_batch_tokens <= self.max_batch_tokens <= self.max_max_batch_tokens:
            raise ValueError("max_batch_tokens must lie within its bounds")
        if self.min_max_batch_size < 1:
            raise ValueError("batch size bounds must be at least 1")


@dataclasses.dataclass(frozen=True, slots=True)
class Tuning:
    """Constants of the control law. Defaults follow the anchors (reference notes §11), documented per field."""

    # Replicas are sized so the running batch fills `target_occupancy` of max_batch_size (KubeAI sizes on
    # in-flight requests per replica; llm-d holds a dead band). Scale up above `scale_up_occupancy`;
    # scale down only when the fleet with one replica fewer would stay under `scale_down_occupancy`.
    target_occupancy: float = 0.7
    scale_up_occupancy: float = 0.85
    scale_down_occupancy: float = 0.6
    # With random routing a pod's running batch is about Poisson around its mean (M/G/inf), so small batch
    # limits need relatively more room: the occupancy targets shrink until target*B + z*sqrt(target*B)
    # fits in B (z = 3 keeps a full batch, hence queueing, rare).
    fluctuation_z: float = 3.0
    # Fewer replicas means bigger batches, slower tokens and longer service, so concurrency grows faster
    # than 1/N. The step time is taken as fixed + per-sequence cost, TPOT(b) ~ 1 + b / h, with h the batch
    # at which the per-sequence part equals the fixed part (memory-bound decode; 30-100 on vLLM-like
    # engines). Projections of concurrency to another fleet size and of TPOT to a larger batch use it.
    # This is the prior: once the windows seen pin the engine's own TPOT-vs-batch line (`costcurve`),
    # the fitted h replaces it. A compute-bound engine (small model on CPU, long prompts whose prefill
    # shares the steps) has a far smaller h, and a wrong h makes the "work" change with the fleet size:
    # projections onto fewer pods come out too low (scale-down past the need) and from an overloaded
    # fleet too high (scale-up overshoot), a limit cycle.
    batch_half_cost_seqs: float = 48.0
    # The fit: windows weigh half after `cost_fit_half_life_s` (the cost line moves only with the model,
    # the hardware or the request mix); it is used once it rests on `cost_fit_min_windows` windows and
    # its slope is `cost_fit_z` standard errors above zero (the batch varied enough to see it).
    cost_fit_half_life_s: float = 1800.0
    cost_fit_min_windows: float = 8.0
    cost_fit_z: float = 3.0
    # Waiting requests are drained within this many seconds of service time: W * service_s / drain_s
    # extra batch slots. Large backlogs therefore ask for several replicas at once.
    backlog_drain_s: float = 20.0
    # A queue this short per pod is "short": latency misses with it are the batch's fault, not load.
    short_queue_per_pod: float = 2.0
    # Burst release: pods a run of scale-ups added may go back before the scale-down stabilization window
    # has passed once `release_intervals` clean ticks after the latest scale-up (complete data, no queue,
    # no starting pods, latency headroom) all show work at most `release_drop` of the work that asked for
    # it (the demand that bought them is gone, not noise), which fewer pods carry at the band's target;
    # never below the fleet before the run. The window guards a fleet against noise at steady load; pods
    # bought for a burst that is over only cost money, and a burst every few minutes would otherwise hold
    # the burst's fleet for good (the 300 s window never sees a quiet 300 s).
    release_intervals: int = 2
    release_drop: float = 0.75
    # Cap on one scale-up: max(current * factor, current + min_step), as AIBrix/HPA cap a step.
    max_scale_up_factor: float = 4.0
    max_scale_up_min_step: int = 4
    # A refused request (429, queue full) comes back: the openai client and our load tools retry it
    # (Retry-After, twice by default), so the rejection counter counts each refused request up to this
    # many times. Refusals are counted as new demand at 1/attempts; counting every attempt asks for
    # twice or three times the replicas a step needs. Clients that do not retry are then under-counted,
    # and the next tick once the new pods are ready asks for the rest.
    refusal_attempts: float = 3.0
    # Queue bound in time (`queuebound`): a class's per-replica queue limit is its TTFT target times what a
    # full replica completes per second, at least `queue_bound_min`; it moves only when the new figure is
    # more than `queue_bound_band` times (or less than 1/band of) the one in force, so service-time noise
    # does not push a new runtime config every tick.
    queue_bound_min: int = 2
    queue_bound_band: float = 1.5
    # Start-up: pods not ready yet are capacity on its way for `startup_stuck_factor` x the learnt start-up
    # time (creation -> Ready of this service's own pods, smoothed with weight `startup_smoothing` per new
    # pod); `startup_prior_s` stands in until a pod of the service has been seen starting. While pods load,
    # only demand they will not serve (the arrival rate, not the backlog they will drain) scales up again.
    startup_prior_s: float = 300.0
    startup_stuck_factor: float = 2.0
    startup_smoothing: float = 0.3
    # Scale-down needs latency headroom: attainment within `headroom_miss_share` of the misses the SLO
    # allows (95% target -> at least 99%), the TTFT quantile and the (exact) mean TPOT at most these
    # fractions of their targets.
    headroom_miss_share: float = 0.2
    scale_down_ttft_headroom: float = 0.8
    scale_down_tpot_headroom: float = 0.9
    # Latency figures from fewer requests than this are too noisy to act on alone.
    min_requests_for_latency: int = 20
    # Batch limits: multiplicative decrease on a TPOT miss with a short queue; increase by a step (a
    # fraction of the initial limit, at most 1.5x) while the TPOT predicted at the larger full batch has
    # headroom and there is a queue; one change per cooldown; no growth for a while after a decrease.
    batch_shrink_factor: float = 0.75
    batch_grow_fraction: float = 0.25
    # Grow only while the mean TPOT predicted at the running batch the replica rule sizes for under the new
    # limit (the band's target, not a full batch: full batches are the rare swing the band leaves room
    # for) stays <= this x target. Judged at a full batch (0.8), the limit stopped where the fleet ran its
    # batches ~60% full and the step and diurnal traces settled at 1.2x the oracle's replicas.
    batch_grow_below_tpot: float = 0.7
    batch_grow_occupancy: float = 0.8  # ... and batches run at least this share of target_occupancy
    batch_grow_kv_max: float = 0.85  # and KV-cache usage below this
    batch_cooldown_intervals: int = 2
    batch_regrow_hold_intervals: int = 8
    # Shedding: one class per cooldown; unshed the last shed class once the whole demand (shed classes
    # included) fits `unshed_occupancy` of max replicas and the SLO has been met for `unshed_hold_s`
    # (None: the scale-down stabilization window).
    shed_cooldown_intervals: int = 2
    unshed_occupancy: float = 0.7
    unshed_hold_s: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.scale_down_occupancy < self.target_occupancy < self.scale_up_occupancy:
            raise ValueError("need 0 < scale_down_occupancy < target_occupancy < scale_up_occupancy")
        if self.batch_half_cost_seqs <= 0:
            raise ValueError("batch_half_cost_seqs must be positive")
        if self.cost_fit_half_life_s <= 0 or self.cost_fit_min_windows < 3 or self.cost_fit_z <= 0:
            raise ValueError("cost fit needs a positive half-life and z, and at least 3 windows")
        if not 0 < self.batch_shrink_factor < 1:
            raise ValueError("batch_shrink_factor must lie in (0, 1)")
        if self.release_intervals < 1:
            raise ValueError("release_intervals must be at least 1")
        if not 0 < self.release_drop < 1:
            raise ValueError("release_drop must lie in (0, 1)")
        if self.refusal_attempts < 1:
            raise ValueError("refusal_attempts must be at least 1")
        if self.startup_prior_s <= 0 or self.startup_stuck_factor < 1 or not 0 < self.startup_smoothing <= 1:
            raise ValueError("need startup_prior_s > 0, startup_stuck_factor >= 1, 0 < startup_smoothing <= 1")


@dataclasses.dataclass(frozen=True, slots=True)
class PolicySpec:
    """Everything of the LLMService spec that the tuning law reads."""

    slo: SLOTargets
    min_replicas: int = 1
    max_replicas: int = 1
    batching: BatchingBounds = dataclasses.field(default_factory=BatchingBounds)
    classes: tuple[ClassSpec, ...] = ()
    interval_s: float = 15.0
    scale_up_stabilization_s: float = 0.0
    scale_down_stabilization_s: float = 300.0
    autoscaling: bool = True
    # Advisory mode: decide as usual, but the decision is recorded, not applied, so the state carried to
    # the next tick keeps what is in force (limits, shed classes, last scale) and learns everything else.
    advise: bool = False
    tuning: Tuning = dataclasses.field(default_factory=Tuning)

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(
                f"need 0 <= min_replicas <= max_replicas, max >= 1 (got {self.min_replicas}..{self.max_replicas})"
            )
        if self.interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if self.scale_up_stabilization_s < 0 or self.scale_down_stabilization_s < 0:
            raise ValueError("stabilization windows must not be negative")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique: {names}")

    def class_spec(self, name: str) -> ClassSpec | None:
        for qos_class in self.classes:
            if qos_class.name == name:
                return qos_class
        return None

    def targets_for(self, class_name: str) -> tuple[float | None, float | None]:
        """(ttft_s, tpot_s) for a class: its own targets where set, else the service's."""
        qos_class = self.class_spec(class_name)
        ttft_s = qos_class.ttft_s if qos_class is not None and qos_class.ttft_s is not None else self.slo.ttft_s
        tpot_s = qos_class.tpot_s if qos_class is not None and qos_class.tpot_s is not None else self.slo.tpot_s
        return ttft_s, tpot_s

    def shed_order(self) -> tuple[str, ...]:
        """Sheddable classes, the first to shed first (least urgent: highest priority number)."""
        sheddable = [c for c in self.classes if c.sheddable]
        return tuple(c.name for c in sorted(sheddable, key=lambda c: (-c.priority, c.name)))


@dataclasses.dataclass(frozen=True, slots=True)
class PodStartup:
    """One pod that became ready: creation -> Ready, in seconds."""

    pod: str
    seconds: float
    ready_for_s: float | None = None  # how long ago it turned ready (None: not known)


@dataclasses.dataclass(frozen=True, slots=True)
class PolicyInput:
    """The spec plus what the cluster says about the fleet right now."""

    spec: PolicySpec
    current_replicas: int  # the Deployment's spec.replicas: asked for, ready or not
    ready_replicas: int
    # Ages (now - creation, seconds) of the pods that exist and are not ready yet; None: not known (then
    # every pod asked for and not ready counts as on its way, however long it has been loading).
    loading_ages_s: tuple[float, ...] | None = None
    # Pods seen ready, with how long each took from creation (the start-up time is learnt from these).
    started: tuple[PodStartup, ...] = ()

    def __post_init__(self) -> None:
        if self.current_replicas < 0 or self.ready_replicas < 0:
            raise ValueError("replica counts must not be negative")

    @property
    def starting_replicas(self) -> int:
        """Pods asked for that are not ready yet (starting up, pulling, loading the model)."""
        return max(0, self.current_replicas - self.ready_replicas)
