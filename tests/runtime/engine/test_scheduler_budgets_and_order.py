"""The scheduler alone, vLLM style: hand-made requests, hand-written RunnerOutput, no torch, no model."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fleetlm_runtime.caches import kv_manager
from fleetlm_runtime.engine import outputs, scheduler
from fleetlm_runtime.engine import request as request_mod

EOS = 0
Status = request_mod.RequestStatus


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(
    *,
    max_batch_size: int = 4,
    max_batch_tokens: int = 16,
    kv: int = 10_000,
    block_size: int = 1,
    policy: str = "fcfs",
    prefix_cache: bool = False,
) -> scheduler.Scheduler:
    return scheduler.Scheduler(
        limits=scheduler.SchedulerLimits(max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens),
        kv=kv_manager.KVCacheManager(
            num_blocks=kv // block_size + 1, block_size=block_size, enable_caching=prefix_cache
        ),
        policy=policy,  # type: ignore[arg-type]
        clock=Clock(),
    )


def make_request(
    req_id: str, *, prompt_len: int = 4, max_tokens: int = 8, priority: int = 0, arrival: float = 0.0
) -> request_mod.Request:
    return request_mod.resolve_request(
        req_id=req_id,
        prompt_token_ids=[1 + i % 50 for i in range(prompt_len)],
        sampling_params=request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0),
        max_model_len=4096,
        vocab_size=100,
        eos_token_ids=frozenset({EOS}),
        arrival_time_s=arrival,
        priority=priority,
    )


def sample(sched_out: outputs.SchedulerOutput, token: int = 7) -> outputs.RunnerOutput:
    """What a runner returns: one token for every request whose step reached the end of its tokens."""
    ids = [r for r, s in zip(sched_out.req_ids, sched_out.do_sample, strict=True) if s]
    return outputs.RunnerOutput(req_ids=ids, sampled_token_ids=[token] * len(ids))


def step(sched: scheduler.Scheduler, token: int = 7) -> outputs.SchedulerOutput:
    out = sched.schedule()
    sched.update_from_output(out, sample(out, token))
    return out


def test_new_requests_prefill_then_decode_one_token_per_step() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", prompt_len=5))
    first = step(sched)
    assert (first.req_ids, first.num_scheduled_tokens, first.do_sample) == (["a"], [5], [True])
    assert first.num_prefill_tokens == 5 and [n.req_id for n in first.new_reqs] == ["a"]
    second = step(sched)
    assert (second.req_ids, second.num_scheduled_tokens, second.num_computed_tokens) == (["a"], [1], [5])
    assert second.input_token_ids == [7] and second.new_reqs == []


def test_a_long_prompt_is_chunked_while_running_requests_keep_decoding() -> None:
    sched = make_scheduler(max_batch_tokens=8)
    sched.add_request(make_request("short", prompt_len=3, max_tokens=50))
    step(sched)
    sched.add_request(make_request("long", prompt_len=20))
    chunks = []
    for _ in range(3):
        out = step(sched)
        # The decode is scheduled first, every step; the long prompt gets what is left of the budget.
        assert out.req_ids[0] == "short" and out.num_scheduled_tokens[0] == 1
        assert out.total_num_tokens <= 8
        chunks.append(
            dict(zip(out.req_ids, zip(out.num_scheduled_tokens, out.do_sample, strict=True), strict=True))["long"]
        )
    assert chunks == [(7, False), (7, False), (6, True)]
    assert sched.requests["long"].num_output_tokens == 1


def test_max_batch_size_caps_running_and_the_rest_wait() -> None:
    sched = make_scheduler(max_batch_size=2, max_batch_tokens=64)
    for name in "abc":
        sched.add_request(make_request(name))
    out = step(sched)
    assert out.req_ids == ["a", "b"] and sched.num_waiting == 1
    assert sched.running_by_class == {"default": 2} and sched.waiting_by_class == {"default": 1}


def test_token_budget_is_never_exceeded() -> None:
    sched = make_scheduler(max_batch_size=8, max_batch_tokens=10)
    for i in range(6):
        sched.add_request(make_request(f"r{i}", prompt_len=7, max_tokens=5))
    while sched.has_unfinished_requests():
        out = step(sched)
        assert 0 < out.total_num_tokens <= 10
        assert out.total_num_tokens == sum(out.num_scheduled_tokens)


def test_the_pool_runs_sequences_by_the_tokens_they_hold_not_their_worst_case() -> None:
    # 1024 tokens in blocks of 16. Each request may grow to 30 + 226 = 256 tokens: reserving that would run
    # 4 at once. They stop after 10 tokens (40 tokens, 3 blocks, held), so the pool runs about 1024 / 40.
    sched = make_scheduler(max_batch_size=64, max_batch_tokens=4096, kv=1024, block_size=16)
    for i in range(64):
        sched.add_request(make_request(f"r{i}", prompt_len=30, max_tokens=226))
    peak = 0
    finished = 0
    while sched.has_unfinished_requests():
        out = sched.schedule()
        assert sched.kv.num_used_blocks <= 64
        peak = max(peak, sched.num_running)
        ids = [r for r, s in zip(out.req_ids, out.do_sample, strict=True) if s]
        tokens = [EOS if len(sched.requests[r].output_token_ids) == 9 else 7 for r in ids]
        updated = sched.update_from_output(out, outputs.RunnerOutput(req_ids=ids, sampled_token_ids=tokens))
        finished += sum(r.status is Status.FINISHED_STOPPED for r in updated)
    assert finished == 64 and sched.kv.num_used_blocks == 0
    assert peak >= 20  # N / average held length, not N / max length (4)


def test_a_full_pool_preempts_the_newest_request_which_recomputes_and_completes() -> None:
    sched = make_scheduler(max_batch_size=8, max_batch_tokens=64, kv=32, block_size=4)  # 8 blocks
    for name in "abc":
        sched.add_request(make_request(name, prompt_len=8, max_tokens=8))  # 2 blocks each, up to 4
    first = step(sched)
    assert first.req_ids == ["a", "b", "c"] and sched.kv.num_used_blocks == 6
    preempted: list[str] = []
    while sched.has_unfinished_requests():
        out = step(sched)
        preempted += out.preempted_req_ids
        assert set(out.preempted_req_ids) <= set(out.finished_req_ids)
        assert not set(out.preempted_req_ids) & set(out.req_ids)  # taken back from this step
    assert preempted[0] == "c"  # the most recently admitted gives its blocks back
    assert sched.kv.num_used_blocks == 0


def test_a_prefix_hit_shares_blocks_and_schedules_only_the_rest() -> None:
    sched = make_scheduler(max_batch_tokens=256, kv=256, block_size=16, prefix_cache=True)
    sched.add_request(make_request("a", prompt_len=40, max_tokens=4))
    first = step(sched)
    assert first.num_scheduled_tokens == [40]
    sched.add_request(make_request("b", prompt_len=40, max_tokens=4))  # the same prompt
    out = step(sched)
    i = out.req_ids.index("b")
    assert out.num_computed_tokens[i] == 32 and out.num_scheduled_tokens[i] == 8  # two blocks hit
    assert out.num_prefill_tokens == 8
    (new,) = out.new_reqs
    shared = sched.kv.block_ids("a")[:2]
    assert list(new.block_ids[:2]) == shared  # the same blocks, not copies
    assert all(sched.kv.pool.ref_cnt[b] == 2 for b in shared)
    assert sched.take_step_counters()[1:] == (80, 32)


def test_a_request_that_could_never_fit_is_refused_at_once() -> None:
    sched = make_scheduler(kv=10)
    with pytest.raises(request_mod.InvalidParameterError) as info:
        sched.add_request(make_request("big", prompt_len=4, max_tokens=8))
    assert info.value.param == "max_tokens"


def test_stop_token_and_max_tokens_end_requests_with_their_reasons() -> None:
    sched = make_scheduler(max_batch_tokens=64)
    sched.add_request(make_request("eos", max_tokens=5))
    sched.add_request(make_request("length", max_tokens=2))
    out = sched.schedule()
    updated = sched.update_from_output(out, outputs.RunnerOutput(req_ids=["eos", "length"], sampled_token_ids=[9, 9]))
    assert [r.status for r in updated] == [Status.RUNNING, Status.RUNNING]
    out = sched.schedule()
    updated = sched.update_from_output(out, outputs.RunnerOutput(req_ids=["eos", "length"], sampled_token_ids=[EOS, 9]))
    assert [(r.status, r.stop_reason) for r in updated] == [
        (Status.FINISHED_STOPPED, EOS),
        (Status.FINISHED_LENGTH, None),
    ]
    assert not sched.has_unfinished_requests() and sched.kv.num_used_blocks == 0


def test_abort_frees_waiting_and_running_requests_and_late_aborts_are_ignored() -> None:
    sched = make_scheduler(max_batch_size=1, max_batch_tokens=64)
    sched.add_request(make_request("running"))
    sched.add_request(make_request("waiting"))
    step(sched)
    finished = sched.finish_requests(["running", "waiting", "unknown"], Status.FINISHED_ABORTED)
    assert {r.req_id for r in finished} == {"running", "waiting"}
    assert all(r.status.finish_reason is request_mod.FinishReason.ABORT for r in finished)
    assert sched.kv.num_used_blocks == 0 and sched.num_running == 0 and sched.num_waiting == 0
    assert sched.take_finished_req_ids() == ["running"]  # only it held KV in the runner
    assert sched.finish_requests(["running"], Status.FINISHED_ABORTED) == []


def test_a_token_for_a_request_aborted_during_the_step_is_dropped() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a"))
    out = sched.schedule()
    sched.finish_requests(["a"], Status.FINISHED_ABORTED)
    assert sched.update_from_output(out, sample(out)) == []


@pytest.mark.parametrize(
    ("policy", "expected"),
    [("fcfs", ["low", "high", "mid"]), ("priority", ["high", "mid", "low"])],
)
def test_queue_policy_orders_admission(policy: str, expected: list[str]) -> None:
    sched = make_scheduler(max_batch_size=1, max_batch_tokens=64, policy=policy)
    sched.add_request(make_request("low", priority=5, arrival=1.0, max_tokens=1))
    sched.add_request(make_request("high", priority=0, arrival=2.0, max_tokens=1))
    sched.add_request(make_request("mid", priority=1, arrival=3.0, max_tokens=1))
    admitted = [step(sched).req_ids[0] for _ in range(3)]
    assert admitted == expected


def test_limits_change_live_and_lowering_them_preempts_nobody() -> None:
    sched = make_scheduler(max_batch_size=4, max_batch_tokens=64)
    for name in "abcd":
        sched.add_request(make_request(name, max_tokens=20))
    step(sched)
    sched.update_limits(scheduler.SchedulerLimits(max_batch_size=2, max_batch_tokens=2))
    out = step(sched)
    assert out.total_num_tokens == 2 and sched.num_running == 4  # budget binds, nobody is evicted
    sched.add_request(make_request("e"))
    for _ in range(4):
        step(sched)
    assert "e" in {r.req_id for r in sched.waiting}  # running > max_batch_size: no admission


@pytest.mark.parametrize(
    ("size", "tokens", "param"),
    [(0, 16, "max_batch_size"), (4, 0, "max_batch_tokens"), (8, 4, "max_batch_tokens")],
)
def test_invalid_limits_name_the_parameter(size: int, tokens: int, param: str) -> None:
    with pytest.raises(request_mod.InvalidParameterError) as info:
        scheduler.SchedulerLimits(max_batch_size=size, max_batch_tokens=tokens)
    assert info.value.param == param


def test_events_record_queue_first_token_and_finish_times() -> None:
    sched = make_scheduler()
    clock = sched._clock
    assert isinstance(clock, Clock)
    sched.add_request(make_request("a", max_tokens=2, arrival=100.0))
    clock.now = 101.0
    step(sched)
    clock.now = 102.5
    step(sched)
    events, itls = sched.take_events()
    kinds = [(e.kind.value, e.time_s) for e in events]
    assert kinds == [("scheduled", 101.0), ("first_token", 101.0), ("finished", 102.5)]
    assert itls == [1.5]
    finished = events[-1]
    assert (finished.num_output_tokens, finished.finish_reason) == (2, request_mod.FinishReason.LENGTH)


def test_scheduling_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import fleetlm_runtime.engine.scheduler, fleetlm_runtime.engine.queues, "
        "fleetlm_runtime.caches.kv_manager, fleetlm_runtime.caches.block_pool, "
        "fleetlm_runtime.caches.kv_budget; assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": ":".join(sys.path)})
