"""The fair queue's rules, pure (no engine): picks by class counter over weight then tenant counter,
no credit for idle time, preempted requests keep their place, aborts leave it consistent, and the
counters of two backlogged tenants stay within the stated bound."""

from __future__ import annotations

import random

from fleetlm_runtime.engine import queues
from fleetlm_runtime.engine import request as request_mod


def req(req_id: str, *, tenant: str, qos_class: str = "std", weight: float = 1.0, arrival: float = 0.0,
        prompt: int = 4, max_tokens: int = 4, priority: int = 0) -> request_mod.Request:  # fmt: skip
    return request_mod.resolve_request(
        req_id=req_id,
        prompt_token_ids=[1] * prompt,
        sampling_params=request_mod.SamplingParams(max_tokens=max_tokens),
        max_model_len=4096,
        vocab_size=10,
        eos_token_ids=frozenset(),
        arrival_time_s=arrival,
        qos_class=qos_class,
        priority=priority,
        weight=weight,
        tenant=tenant,
    )


def admit(q: queues.PriorityQueue) -> request_mod.Request:
    """What the scheduler does on a first admission: pop, then charge prompt + max_tokens."""
    r = q.pop()
    q.charge(r, r.num_prompt_tokens, r.max_tokens)
    return r


def test_tenants_alternate_and_classes_follow_their_weights() -> None:
    q = queues.PriorityQueue(clock=lambda: 0.0)
    for i in range(30):
        q.add(req(f"a{i}", tenant="a", arrival=i))
        q.add(req(f"b{i}", tenant="b", arrival=100 + i))  # b arrived later: FIFO would serve a 30 times first
    assert [admit(q).tenant for _ in range(6)] == ["a", "b", "a", "b", "a", "b"]
    q2 = queues.PriorityQueue(clock=lambda: 0.0)
    for i in range(40):
        q2.add(req(f"g{i}", tenant="x", qos_class="gold", weight=3.0, arrival=i))
        q2.add(req(f"s{i}", tenant="y", qos_class="std", weight=1.0, arrival=i))
    picks = [admit(q2).qos_class for _ in range(40)]
    assert picks.count("gold") == 30 and picks.count("std") == 10


def test_a_returning_tenant_gets_no_credit_for_idle_time() -> None:
    q = queues.PriorityQueue(clock=lambda: 0.0)
    for i in range(20):
        q.add(req(f"a{i}", tenant="a", arrival=i))
    for _ in range(10):
        admit(q)  # a alone: its counter grows to 10 * (4 + 2 * 4) = 120
    for i in range(5):
        q.add(req(f"b{i}", tenant="b", arrival=50 + i))  # b returns: lifted to a's 120, not 0
    _, tenants = q.counters()
    assert tenants[0, "std", "b"] == tenants[0, "std", "a"] == 120
    assert [admit(q).tenant for _ in range(4)] == ["a", "b", "a", "b"]  # shares from now on, no burst of b


def test_finishing_early_gives_back_the_unused_output() -> None:
    q = queues.PriorityQueue(clock=lambda: 0.0)
    r = req("r", tenant="a", max_tokens=10)
    q.add(r)
    admit(q)
    q.charge(r, 0, 3 - r.max_tokens)  # the scheduler at its end: 3 tokens generated of 10
    classes, tenants = q.counters()
    assert tenants[0, "std", "a"] == classes[0, "std"] == 4 + 2 * 3


def test_prepend_and_remove_keep_order_and_size() -> None:
    q = queues.PriorityQueue(clock=lambda: 0.0)
    rs = [req(f"a{i}", tenant="a", arrival=i) for i in range(4)]
    for r in rs:
        q.add(r)
    first = q.pop()
    q.prepend(first)  # preempted: back ahead of its tenant's others
    assert q.peek() is first and len(q) == 4
    assert {r.req_id for r in q.remove_many({"a1", "a3", "zz"})} == {"a1", "a3"}
    assert len(q) == 2 and [q.pop().req_id, q.pop().req_id] == ["a0", "a2"] and len(q) == 0


def test_two_backlogged_tenants_stay_within_the_bound() -> None:
    rng = random.Random(7)
    q = queues.PriorityQueue(clock=lambda: 0.0)
    longest_prompt, longest_output = 64, 32
    for i in range(400):
        for tenant in ("a", "b"):
            q.add(req(f"{tenant}{i}", tenant=tenant, arrival=i, prompt=rng.randint(1, longest_prompt),
                      max_tokens=rng.randint(1, longest_output)))  # fmt: skip
    bound = 2 * (q.PROMPT_COST * longest_prompt + q.OUTPUT_COST * longest_output)
    worst = 0.0
    for _ in range(600):
        admit(q)
        _, tenants = q.counters()
        worst = max(worst, abs(tenants.get((0, "std", "a"), 0.0) - tenants.get((0, "std", "b"), 0.0)))
    assert 0 < worst <= bound
