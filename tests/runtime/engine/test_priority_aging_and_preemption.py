"""QoS in the scheduler: aging bounds starvation; preemption (recompute) makes room for a higher class,
the preempted request keeps its place, and its output stays exactly what it would have been."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fleetlm_runtime.caches import kv_manager
from fleetlm_runtime.engine import core, outputs, scheduler
from fleetlm_runtime.engine import request as request_mod

Status = request_mod.RequestStatus


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(
    *, max_batch_size: int = 2, max_batch_tokens: int = 64, kv: int = 10_000, aging_s: float | None = 1.0
) -> scheduler.Scheduler:
    return scheduler.Scheduler(
        limits=scheduler.SchedulerLimits(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens),
        kv=kv_manager.KVCacheManager(num_blocks=kv + 1, block_size=1),  # blocks of one token: counts are tokens
        policy="priority",
        clock=Clock(),
        aging_s=aging_s,
    )


def make_request(
    req_id: str, *, priority: int, arrival: float, prompt_len: int = 4, max_tokens: int = 4
) -> request_mod.Request:
    return request_mod.resolve_request(
        req_id=req_id,
        prompt_token_ids=[1 + i % 50 for i in range(prompt_len)],
        sampling_params=request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        max_model_len=4096,
        vocab_size=100,
        eos_token_ids=frozenset({0}),
        arrival_time_s=arrival,
        priority=priority,
    )


def step(sched: scheduler.Scheduler) -> outputs.SchedulerOutput:
    out = sched.schedule()
    ids = [r for r, s in zip(out.req_ids, out.do_sample, strict=True) if s]
    sched.update_from_output(out, outputs.RunnerOutput(req_ids=ids, sampled_token_ids=[7] * len(ids)))
    return out


def _run_low_behind_high_stream(aging_s: float | None, max_steps: int = 400) -> tuple[int | None, float]:
    """One slot; a high-priority request arrives every step (each needs 2 steps, so the high queue only
    grows), a low one waits. Returns the step the low one got in, and the latest arrival (relative to
    the low one's) among the high requests admitted before it."""
    sched = make_scheduler(max_batch_size=1, max_batch_tokens=16, aging_s=aging_s)
    clock = sched._clock
    assert isinstance(clock, Clock)
    start = clock.now
    sched.add_request(make_request("low", priority=2, arrival=start, max_tokens=2))
    latest_high = 0.0
    for n in range(max_steps):
        sched.add_request(make_request(f"high{n}", priority=0, arrival=clock.now, max_tokens=2))
        out = step(sched)
        if "low" in out.req_ids:
            return n, latest_high
        for new in out.new_reqs:
            latest_high = max(latest_high, sched.requests[new.req_id].arrival_time_s - start)
        clock.now += 0.1
    return None, latest_high


def test_without_aging_a_steady_high_stream_starves_the_low_class() -> None:
    assert _run_low_behind_high_stream(aging_s=None)[0] is None


def test_aging_admits_the_low_class_within_a_bounded_time() -> None:
    # Two priority levels at one level per second of waiting: the low request goes ahead of every high
    # request that arrived more than 2 s after it. The high backlog ages too, so in this overload it
    # waits about 4 s (40 steps) in all, and it is admitted however long the stream goes on.
    steps, latest_high = _run_low_behind_high_stream(aging_s=1.0)
    assert steps is not None
    assert 20 <= steps <= 50
    assert latest_high <= 2.0 + 0.1 + 1e-9


def test_a_higher_class_preempts_the_lowest_most_recent_running_request_which_keeps_its_place() -> None:
    sched = make_scheduler(max_batch_size=3, aging_s=None)
    sched.add_request(make_request("low-a", priority=2, arrival=1.0, max_tokens=8))
    sched.add_request(make_request("low-c", priority=2, arrival=2.0, max_tokens=8))
    sched.add_request(make_request("mid", priority=1, arrival=3.0, max_tokens=8))
    step(sched)
    step(sched)
    assert [r.req_id for r in sched.running] == ["mid", "low-a", "low-c"]
    # A low request with an earlier arrival stamp queues; the preempted one must still come back first.
    sched.add_request(make_request("low-b", priority=2, arrival=0.5, max_tokens=8))
    sched.add_request(make_request("high", priority=0, arrival=4.0, max_tokens=8))
    out = step(sched)
    assert out.preempted_req_ids == ["low-c"]
    assert "low-c" in out.finished_req_ids  # the runner frees its slot
    assert [r.req_id for r in sched.running] == ["mid", "low-a", "high"]
    low_c = sched.requests["low-c"]
    assert low_c.status is Status.PREEMPTED
    assert low_c.num_computed_tokens == 0
    assert low_c.output_token_ids == [7, 7]  # generated tokens are kept
    assert sched.kv.num_blocks_held("low-c") == 0
    assert sched.take_step_counters()[0] == 1
    assert sched.waiting.peek().req_id == "low-c"
    assert sched.waiting_by_class == {"default": 2}
    # When room comes back it re-prefills prompt + generated tokens in one go, then decodes on.
    sched.finish_requests(["mid"], Status.FINISHED_ABORTED)
    out = step(sched)
    assert [n.req_id for n in out.new_reqs] == ["low-c"]
    i = out.req_ids.index("low-c")
    assert out.num_scheduled_tokens[i] == 4 + 2
    assert low_c.output_token_ids == [7, 7, 7]


def test_preemption_also_frees_kv_and_only_when_it_makes_room() -> None:
    sched = make_scheduler(max_batch_size=8, kv=24, aging_s=None)
    sched.add_request(make_request("low", priority=2, arrival=1.0, prompt_len=10, max_tokens=10))
    sched.add_request(make_request("low2", priority=2, arrival=1.0, prompt_len=5, max_tokens=5))
    step(sched)
    assert sched.kv.num_free_blocks == 9  # the prompts' tokens are held, not prompt + max_tokens
    # Needs 15 tokens: preempting the most recent (5) is not enough, the older one (10) is, alone.
    sched.add_request(make_request("high", priority=0, arrival=2.0, prompt_len=15, max_tokens=9))
    out = step(sched)
    assert out.preempted_req_ids == ["low"]
    assert [r.req_id for r in sched.running] == ["low2", "high"]
    # Room only preempting an equal priority could make: preempting low2 alone would not help, so
    # nobody is preempted.
    sched.add_request(make_request("peer", priority=0, arrival=3.0, prompt_len=15, max_tokens=9))
    out = step(sched)
    assert out.preempted_req_ids == []
    assert [r.req_id for r in sched.running] == ["low2", "high"]


def test_an_aged_request_is_not_preempted_by_a_fresh_higher_one() -> None:
    sched = make_scheduler(max_batch_size=1, aging_s=1.0)
    clock = sched._clock
    assert isinstance(clock, Clock)
    sched.add_request(make_request("low", priority=2, arrival=clock.now - 10.0, max_tokens=8))
    step(sched)
    sched.add_request(make_request("high", priority=0, arrival=clock.now, max_tokens=8))
    out = step(sched)
    assert out.preempted_req_ids == []
    assert [r.req_id for r in sched.running] == ["low"]


@pytest.mark.parametrize("victim", ["low-a", "low-b"])
def test_preempted_requests_output_equals_an_unpreempted_run(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
    victim: str,
) -> None:
    # low-a is greedy, low-b samples with a seed; the one admitted last is preempted.
    engine = make_core(max_batch_size=2, max_batch_tokens=64, priority_aging_s=None)
    prompts = {"low-a": list(range(3, 40)), "low-b": list(range(50, 70)), "high": list(range(90, 130))}
    seeded = request_mod.SamplingParams(max_tokens=24, temperature=0.9, seed=1234, ignore_eos=True)
    greedy = request_mod.SamplingParams(max_tokens=24, temperature=0.0)
    params = {"low-a": greedy, "low-b": seeded, "high": greedy}
    priority = {"low-a": 2, "low-b": 2, "high": 0}
    tokens: dict[str, list[int]] = {k: [] for k in prompts}
    preemptions = 0

    def add(req_id: str) -> None:
        engine.add_request(
            engine.make_request(
                req_id=req_id,
                prompt_token_ids=prompts[req_id],
                sampling_params=params[req_id],
                priority=priority[req_id],
            )
        )

    add("low-b" if victim == "low-a" else "low-a")
    add(victim)
    steps = 0
    while engine.has_unfinished_requests():
        if steps == 5:
            add("high")
        outs, stats = engine.step()
        if steps == 5:
            assert engine.scheduler.requests[victim].status is Status.PREEMPTED
        steps += 1
        if stats is not None:
            preemptions += stats.num_preemptions
        for out in outs:
            tokens[out.req_id].extend(out.new_token_ids)
    assert preemptions == 1
    assert tokens["low-a"] == generate_greedy(reference_model, prompts["low-a"], 24)
    assert tokens["high"] == generate_greedy(reference_model, prompts["high"], 24)
    # The seeded sampled request continues its random stream where it stopped.
    alone = make_core(max_batch_size=2, max_batch_tokens=64)
    alone.add_request(alone.make_request(req_id="x", prompt_token_ids=prompts["low-b"], sampling_params=seeded))
    reference: list[int] = []
    while alone.has_unfinished_requests():
        for out in alone.step()[0]:
            reference.extend(out.new_token_ids)
    assert tokens["low-b"] == reference
    assert engine.runner.num_requests == 0
    assert not engine.runner._parked
