"""Batch limits (max_batch_size, max_batch_tokens): shrink on a latency miss the queue does not explain,
grow with headroom and a queue; damped and bounded.

The law is AIMD with hysteresis. A TPOT miss (attainment at the target) while the queue is short means
the running batch itself is too slow per token: both limits shrink multiplicatively. max_batch_size grows
by a step while requests queue or batches run near the size the replica rule aims for, KV cache has room,
and the TPOT predicted for a *full* larger batch (step time = fixed + per-sequence part) stays under a
share of the target: a bigger batch is the cheaper answer before more replicas. A TTFT miss with a short
queue and TPOT headroom grows the per-step token budget (faster chunked prefill). One change per
cooldown, no growth for a while after a shrink, nothing outside the spec's bounds, no growth on
incomplete data. Pure: no clock (`now` is a parameter), no I/O, never imports collect/act/handlers.
"""

from __future__ import annotations

import dataclasses
import math

from fleetlm_operator.policy import spec as spec_mod
from fleetlm_operator.policy import window as window_mod


@dataclasses.dataclass(frozen=True, slots=True)
class BatchLimits:
    max_batch_size: int
    max_batch_tokens: int


@dataclasses.dataclass(frozen=True, slots=True)
class BatchDecision:
    limits: BatchLimits
    direction: int  # +1 grew, -1 shrank, 0 held
    reasons: tuple[str, ...]


def initial_limits(batching: spec_mod.BatchingBounds) -> BatchLimits:
    return BatchLimits(max_batch_size=batching.max_batch_size, max_batch_tokens=batching.max_batch_tokens)


def clamp(limits: BatchLimits, batching: spec_mod.BatchingBounds) -> BatchLimits:
    """Within the spec's bounds, and with a token budget that covers one token per running sequence."""
    size = min(batching.max_max_batch_size, max(batching.min_max_batch_size, limits.max_batch_size))
    tokens = min(batching.max_max_batch_tokens, max(batching.min_max_batch_tokens, limits.max_batch_tokens, size))
    return BatchLimits(max_batch_size=size, max_batch_tokens=tokens)


def decide_batch_limits(  # noqa: PLR0911, PLR0912 - a ladder of rules in priority order, each returning with its reason
    spec: spec_mod.PolicySpec,
    window: window_mod.ObservedWindow,
    *,
    current: BatchLimits,
    changed_s: float | None,
    direction: int,
    now: float,
    settling: bool = False,
    adding_replicas: bool = False,
) -> BatchDecision:
    """The batch limits for the next interval, with the numbers that chose them.

    `settling`: pods just turned ready; `adding_replicas`: the replica rule adds pods this tick, enough to
    cure the miss (`pods_relieve_tpot`). Either way a TPOT miss is the fleet's as it was, and the batch
    limits hold.
    """
    batching, tuning = spec.batching, spec.tuning
    if not batching.autotune:
        initial = clamp(initial_limits(batching), batching)
        return BatchDecision(initial, 0, (f"batch: autotune off, limits {_fmt(initial)} from the spec",))
    clamped = clamp(current, batching)
    if clamped != current:
        moved = 1 if clamped.max_batch_size > current.max_batch_size else -1
        return BatchDecision(clamped, moved, (f"batch: {_fmt(current)} -> {_fmt(clamped)} to fit the spec's bounds",))
    if window.num_pods_sampled == 0:
        return BatchDecision(current, 0, (f"batch: hold {_fmt(current)}, no metrics ({window.reason})",))
    if changed_s is not None and now - changed_s < tuning.batch_cooldown_intervals * spec.interval_s:
        return BatchDecision(current, 0, (f"batch: hold {_fmt(current)}, last change {now - changed_s:.0f}s ago",))

    pct = f"p{spec.slo.percentile:g}"
    ttft_target_s, tpot_target_s = spec.slo.ttft_s, spec.slo.tpot_s
    enough = window.num_requests >= tuning.min_requests_for_latency
    ttft_s, tpot_s = window.ttft_quantile_s, window.tpot_quantile_s
    # The vLLM TPOT buckets are as wide as a typical target (0.025-0.05 s), so the quantile is read off
    # coarse steps: a miss is judged by attainment at the target (exact at a bucket bound) and headroom
    # by the exact mean (histogram sum / count).
    tpot_mean_s = window.tpot_mean_s
    target_attainment = spec.slo.target_attainment
    waiting = window.waiting_per_pod
    running = window.running_per_pod
    short_queue = waiting is not None and waiting <= tuning.short_queue_per_pod
    size, tokens = current.max_batch_size, current.max_batch_tokens

    tpot_missed = (
        enough
        and tpot_target_s is not None
        and window.tpot_attainment is not None
        and window.tpot_attainment < target_attainment
    )
    if tpot_missed and short_queue and (settling or adding_replicas):
        # Pods just turned ready (or are loading): the short queue is theirs, and the misses are of the
        # requests that ran on the overloaded fleet before them, not of the batch limit.
        # Or the replica rule adds pods for the load this very window showed: one cure at a time. An
        # overloaded pod's steps are long whatever the limits, and cutting the batch as well leaves the new
        # fleet with a smaller batch than it needs, which it then sizes on: behind a plain Service, cpu-tiny's
        # diurnal run cut 44 -> 33 seqs and 2048 -> 648 tokens on four such windows (each a scale-up tick)
        # and ran 11 pods at the peak where the oracle ran 9, 1.22x its replica-minutes; holding keeps 44
        # seqs and gives 1.10x at 99.05% attainment (seed 1).
        return BatchDecision(
            current,
            0,
            (
                f"batch: hold {_fmt(current)}, TPOT attainment {window.tpot_attainment:.1%} < "
                f"{target_attainment:.0%} "
                + (
                    "is from before the new pods served"
                    if settling
                    else "while the replica rule adds pods for the load"
                ),
            ),
        )
    if tpot_missed and short_queue:
        shrunk, cut = _shrink(spec, window, current, changed_s=changed_s, direction=direction, now=now)
        why = (
            f"TPOT attainment {window.tpot_attainment:.1%} < {target_attainment:.0%} (TPOT {pct} {_secs(tpot_s)}, "
            f"target {tpot_target_s:.3f}s) with a short queue ({waiting:.1f} waiting/pod){cut}"
        )
        if shrunk == current:
            return BatchDecision(current, 0, (f"batch: hold {_fmt(current)}{_hold_why(cut)}; {why}",))
        return BatchDecision(shrunk, -1, (f"batch: shrink {_fmt(current)} -> {_fmt(shrunk)}: {why}",))

    if not window.complete:
        return BatchDecision(
            current, 0, (f"batch: hold {_fmt(current)}, no growth on incomplete metrics ({window.reason})",)
        )
    if (
        direction < 0
        and changed_s is not None
        and now - changed_s < tuning.batch_regrow_hold_intervals * spec.interval_s
    ):
        return BatchDecision(current, 0, (f"batch: hold {_fmt(current)}, shrank {now - changed_s:.0f}s ago",))
    if not enough:
        return BatchDecision(
            current, 0, (f"batch: hold {_fmt(current)}, {window.num_requests} requests are too few to judge latency",)
        )

    grow_limit_s = None if tpot_target_s is None else tuning.batch_grow_below_tpot * tpot_target_s
    tpot_ok = window.tpot_attainment is None or window.tpot_attainment >= target_attainment
    kv_ok = window.kv_usage_max is not None and window.kv_usage_max < tuning.batch_grow_kv_max
    occupancy = running / size if running is not None else None
    # "A queue": requests waiting, or batches running near the occupancy the replica rule sizes for (it
    # would add pods next); a bigger batch is the cheaper answer while TPOT has headroom.
    queued = (waiting is not None and waiting > tuning.short_queue_per_pod) or (
        occupancy is not None and occupancy >= tuning.batch_grow_occupancy * tuning.target_occupancy
    )
    # Headroom is judged where the fleet will run: the replica rule sizes pods so batches run at the
    # occupancy band's target of the limit, and a full batch is the rare Poisson swing the band leaves room
    # for. The step time is a fixed part plus a per-sequence part, TPOT(b) ~ 1 + b/h, so at today's batch b
    # TPOT(b') ~ TPOT (1 + b'/h) / (1 + b/h); the largest running batch b' within the growth limit gives the
    # largest limit B' whose target running batch is b'. A TTFT miss does not stop growth (with a queue
    # behind a full batch, a larger batch is the cure).
    ceiling = batching.max_max_batch_size
    if grow_limit_s is not None:
        if tpot_mean_s is None or running is None or running < 1.0:
            ceiling = size
        else:
            half = tuning.batch_half_cost_seqs
            most_running = half * ((grow_limit_s / tpot_mean_s) * (1.0 + running / half) - 1.0)
            ceiling = min(ceiling, limit_for_running(most_running, tuning=tuning))
    if tpot_ok and kv_ok and queued and ceiling > size:
        step = max(1, math.ceil(batching.max_batch_size * tuning.batch_grow_fraction), size // 2)
        grown = clamp(BatchLimits(max_batch_size=min(size + step, ceiling), max_batch_tokens=tokens), batching)
        tpot_txt = (
            "no TPOT target"
            if grow_limit_s is None or tpot_target_s is None
            else f"mean TPOT {_secs(tpot_mean_s)} at {running:.0f} running/pod predicts <= "
            f"{tuning.batch_grow_below_tpot:g} x {tpot_target_s:.3f}s at the target running batch of up to "
            f"{ceiling} seqs"
        )
        return BatchDecision(
            grown,
            +1,
            (
                f"batch: grow {_fmt(current)} -> {_fmt(grown)}: {tpot_txt}, KV {window.kv_usage_max:.2f}, "
                f"batch {_pct(occupancy)} full, {_num(waiting)} waiting/pod",
            ),
        )
    tpot_headroom = grow_limit_s is None or (tpot_mean_s is not None and tpot_mean_s <= grow_limit_s and tpot_ok)
    ttft_missed = ttft_target_s is not None and ttft_s is not None and ttft_s > ttft_target_s
    if ttft_missed and short_queue and tpot_headroom and tokens < batching.max_max_batch_tokens:
        step = max(1, math.ceil(batching.max_batch_tokens * tuning.batch_grow_fraction))
        grown = clamp(BatchLimits(max_batch_size=size, max_batch_tokens=tokens + step), batching)
        return BatchDecision(
            grown,
            +1,
            (
                f"batch: grow {_fmt(current)} -> {_fmt(grown)}: TTFT {pct} {ttft_s:.3f}s > target "
                f"{ttft_target_s:.3f}s with a short queue and TPOT headroom (faster prefill)",
            ),
        )
    return BatchDecision(
        current,
        0,
        (
            f"batch: hold {_fmt(current)} (TTFT {pct} {_secs(ttft_s)}, TPOT {pct} {_secs(tpot_s)}, "
            f"mean TPOT {_secs(tpot_mean_s)}, "
            f"batch {_pct(occupancy)} full, {_num(waiting)} waiting/pod, KV {_num(window.kv_usage_max)})",
        ),
    )


# A TPOT miss is deep when the window missed more than this many times the requests the SLO allows to miss
# (at a 95% target: under 90% met); a shallower one is within a window's swing at the fleet the replica rule
# sized, and where a smaller size would not bind the batch rule leaves it to the replica rule.
_DEEP_MISS_FACTOR = 2.0
_MARGINAL = "; a marginal miss"


def _shrink(
    spec: spec_mod.PolicySpec,
    window: window_mod.ObservedWindow,
    current: BatchLimits,
    *,
    changed_s: float | None,
    direction: int,
    now: float,
) -> tuple[BatchLimits, str]:
    """The limits after a TPOT miss with a short queue, and what the size's part was (for the reason).

    The token budget, the prefill chunk that rides in every step and stretches it, shrinks on a deep miss
    (more than `_DEEP_MISS_FACTOR` times the misses the SLO allows). A marginal miss where the size would
    not bind changes nothing: the step time is the load per pod's, and a window's attainment a point or
    two under the target is the batch's Poisson swing at the fleet the replica rule sized; the replica
    rule answers a miss under load. Cut on every such window, the budget ratcheted down (cpu-tiny's step
    run: 2048 -> 256 tokens in 45 minutes), each cut stretching prefills over more steps, until at its
    bound the size went too; the steady plateau saw 3 replica changes (11 -> 12 -> 11 -> 13 pods).
    Holding: none, and 1.11x the oracle's replica-minutes where it was 1.13x.

    The batch size shrinks too where that can change the step time: where the window's mean running batch
    reaches the smaller size (it binds), or the token budget was cut less than the regrow hold ago and
    the miss is back (that cut did not cure it), or the budget is at its bound (nothing else to cut).
    Otherwise the running batch is set by the load per pod, not by the limit: a smaller size leaves the
    mean step time as it was and only turns the batch's swings into a queue, and the replica rule, which
    sizes the fleet on the limit, buys pods for it. In the simulator's GPU step, at 11 pods running ~56
    of 85, one window's TPOT dip cut the size to 63, which the fleet could only run with a 12th pod, kept
    for the rest of the trace: 1.19x the oracle's replica-minutes, where cutting the token budget alone
    gives 1.12x at about the same attainment (98.6%).
    """
    batching, tuning = spec.batching, spec.tuning
    size, tokens = current.max_batch_size, current.max_batch_tokens
    smaller = math.floor(size * tuning.batch_shrink_factor)
    cut_tokens = math.floor(tokens * tuning.batch_shrink_factor)
    fewer_tokens = clamp(BatchLimits(max_batch_size=size, max_batch_tokens=cut_tokens), batching)
    mean_running = window.mean_running_per_pod if window.mean_running_per_pod is not None else window.running_per_pod
    recently_cut = (
        direction < 0
        and changed_s is not None
        and now - changed_s < tuning.batch_regrow_hold_intervals * spec.interval_s
    )
    allowed = 1.0 - spec.slo.target_attainment
    deep = window.tpot_attainment is not None and 1.0 - window.tpot_attainment > _DEEP_MISS_FACTOR * allowed
    if mean_running is not None and mean_running >= smaller:
        cut = ""
    elif recently_cut:
        cut = f"; again within {now - changed_s:.0f}s of the last cut" if changed_s is not None else ""
    elif fewer_tokens.max_batch_tokens == tokens:
        cut = "; the token budget is at its bound"
    elif deep:
        return (
            fewer_tokens,
            f"; {_num(mean_running)} running/pod: a smaller size would not bind, the token budget shrinks",
        )
    else:
        return current, f"{_MARGINAL}, {_num(mean_running)} running/pod: a smaller size would not bind"

    return clamp(BatchLimits(max_batch_size=smaller, max_batch_tokens=cut_tokens), batching), cut


def _hold_why(cut: str) -> str:
    return "" if cut.startswith(_MARGINAL) else " at the lower bounds"


def pods_relieve_tpot(
    spec: spec_mod.PolicySpec, window: window_mod.ObservedWindow, *, replicas_now: int, replicas_next: int
) -> bool:
    """Whether the pods the replica rule adds bring the mean TPOT under `scale_down_tpot_headroom` of the
    target, along the cost curve: the running batch per pod falls by replicas_now / replicas_next and a
    step costs t0 (1 + b/h). Batches too slow per token at any load the new fleet gives them (a TPOT many
    times the target) are the batch rule's to cut, pods or not.
    """
    target_s, tpot_mean_s = spec.slo.tpot_s, window.tpot_mean_s
    running = window.mean_running_per_pod if window.mean_running_per_pod is not None else window.running_per_pod
    if replicas_next <= replicas_now or replicas_now <= 0 or target_s is None or tpot_mean_s is None or running is None:
        return False
    half = spec.tuning.batch_half_cost_seqs
    after = running * replicas_now / replicas_next
    predicted_s = tpot_mean_s * (1.0 + after / half) / (1.0 + running / half)
    return predicted_s <= spec.tuning.scale_down_tpot_headroom * target_s


def limit_for_running(running: float, *, tuning: spec_mod.Tuning) -> int:
    """The largest batch limit B whose occupancy-band target (see `replicas.band`) is at most `running`.

    The band's target slots are min(target_occupancy x B, u x B) with u x B + z sqrt(u x B) = B, both
    increasing in B, so the largest B is max(running / target_occupancy, running + z sqrt(running)).
    """
    if running <= 0:
        return 0
    z = tuning.fluctuation_z
    return math.floor(max(running / tuning.target_occupancy, running + z * math.sqrt(running)))


def _fmt(limits: BatchLimits) -> str:
    return f"{limits.max_batch_size} seqs/{limits.max_batch_tokens} tokens"


def _secs(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}s"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
