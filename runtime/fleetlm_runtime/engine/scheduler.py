"""Iteration-level scheduling: which requests run in the next step, and with how many tokens.

There is no prefill or decode *phase* (vLLM v1's idea): every request has `num_computed_tokens`, and a
step gives it `num_tokens - num_computed_tokens` more, capped by the step's token budget. A request
whose prompt does not fit the budget is therefore prefilled in chunks over several steps while the
others keep decoding. Each step runs in three passes:

1. decodes: every running request that needs exactly one token gets it first, so a long prefill can
   never stall streams that are already flowing;
2. partial prefills: running requests part-way through their prompt get what is left of the budget;
3. admission: waiting requests, in queue order (priority policy: by priority, then fair shares of the
   classes by weight and of tenants within a class, see `queues.PriorityQueue`), join while there is
   budget, a free sequence slot (`max_batch_size`) and room in the KV pool for the tokens they compute
   now (not their worst case: `caches/kv_manager.py` hands out fixed-size blocks as tokens are
   computed). With the prefix cache, an admitted request starts with `num_computed_tokens` at its
   longest cached prefix (whole blocks), whose blocks it shares with their other holders, so only the
   rest is prefilled.

Every running request that needs a new block and finds the pool full makes room by preemption (recompute,
vLLM's rule): the lowest-priority running request (priority policy), and among equals the most recently
admitted, gives back its blocks, `num_computed_tokens` goes back to 0 and it returns to the head of its
class, keeping its generated tokens, which are prefilled again with the prompt when it is readmitted. A
step that preempted admits nobody. With the priority policy, the head of the queue may also preempt
running requests of a strictly lower priority when the batch or the pool is full (the lowest first,
never one whose aged priority is already better than the head's, and nobody unless the head then fits).

`update_from_output` appends sampled tokens and applies the token-level stop rules (stop token ids,
EOS, max_tokens); stop *strings* need text and are applied by the engine core through
`finish_requests`. This module is pure Python: it must never import torch, the tokenizer or the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fleetlm_runtime.caches import kv_manager
from fleetlm_runtime.caches import prefix_cache as prefix_cache_mod
from fleetlm_runtime.engine import outputs, queues
from fleetlm_runtime.engine import request as request_mod

RequestStatus = request_mod.RequestStatus


@dataclass(frozen=True, slots=True)
class SchedulerLimits:
    """Batch limits; the operator may change them live (`Scheduler.update_limits`)."""

    max_batch_size: int  # sequences that hold a batch slot (running) at once
    max_batch_tokens: int  # tokens processed per step, prefill chunks and decodes together

    def __post_init__(self) -> None:
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 1:
            raise request_mod.InvalidParameterError(
                "max_batch_size", f"must be an integer >= 1, got {self.max_batch_size!r}"
            )
        if not isinstance(self.max_batch_tokens, int) or self.max_batch_tokens < 1:
            raise request_mod.InvalidParameterError(
                "max_batch_tokens", f"must be an integer >= 1, got {self.max_batch_tokens!r}"
            )
        # Every running sequence must be able to decode in every step (vLLM enforces the same rule).
        if self.max_batch_tokens < self.max_batch_size:
            raise request_mod.InvalidParameterError(
                "max_batch_tokens",
                f"must be >= max_batch_size ({self.max_batch_size}), got {self.max_batch_tokens}",
            )


class Scheduler:
    def __init__(
        self,
        *,
        limits: SchedulerLimits,
        kv: kv_manager.KVCacheManager,
        policy: queues.SchedulingPolicy = "priority",
        clock: Callable[[], float] = time.monotonic,
        aging_s: float | None = None,
        enable_preemption: bool = True,
    ) -> None:
        self._limits = limits
        self.kv = kv
        self.waiting = queues.create_queue(policy, clock=clock, aging_s=aging_s)
        self._by_priority = isinstance(self.waiting, queues.PriorityQueue)
        # The fair queue's counters (priority policy): charged at first admission, settled at the end.
        self._fair = self.waiting if isinstance(self.waiting, queues.PriorityQueue) else None
        self._preemption = enable_preemption and self._by_priority
        self._admit_seq = 0
        self._num_preemptions = 0  # since the last take_step_counters()
        self._prefix_queries = 0
        self._prefix_hits = 0
        self.running: list[request_mod.Request] = []  # admission order
        self.requests: dict[str, request_mod.Request] = {}  # every unfinished request, waiting or running
        self._clock = clock
        self._finished_req_ids: list[str] = []  # left since the last schedule(); the runner frees them
        self._events: list[outputs.RequestEvent] = []
        self._itls: list[float] = []
        self.running_by_class: dict[str, int] = {}
        self.waiting_by_class: dict[str, int] = {}

    # ----------------------------------------------------------------------------------------------
    # Limits and queries

    @property
    def limits(self) -> SchedulerLimits:
        return self._limits

    def update_limits(self, limits: SchedulerLimits) -> None:
        """Applied from the next schedule(). Lowering max_batch_size preempts nobody: running requests
        finish, and admission waits until the batch is below the new limit."""
        self._limits = limits

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def take_finished_req_ids(self) -> list[str]:
        """Requests that released KV since the last call (or schedule()); the runner drops their state."""
        finished, self._finished_req_ids = self._finished_req_ids, []
        return finished

    def take_step_counters(self) -> tuple[int, int, int]:
        """(preemptions, prefix-cache query tokens, prefix-cache hit tokens) since the previous call."""
        counters = (self._num_preemptions, self._prefix_queries, self._prefix_hits)
        self._num_preemptions = self._prefix_queries = self._prefix_hits = 0
        return counters

    def take_events(self) -> tuple[list[outputs.RequestEvent], list[float]]:
        """Events and inter-token latencies recorded since the previous call."""
        events, itls = self._events, self._itls
        self._events, self._itls = [], []
        return events, itls

    # ----------------------------------------------------------------------------------------------
    # Requests in and out

    def add_request(self, req: request_mod.Request) -> None:
        if req.req_id in self.requests:
            raise ValueError(f"request id {req.req_id!r} is already in the engine")
        if req.kv_reservation > self.kv.capacity_tokens:
            # It could never finish, even alone in the pool; refuse now instead of blocking the queue.
            raise request_mod.InvalidParameterError(
                "max_tokens",
                f"prompt + max_tokens = {req.kv_reservation} tokens exceeds the engine's KV capacity of "
                f"{self.kv.capacity_tokens} tokens",
            )
        req.status = RequestStatus.WAITING
        self.requests[req.req_id] = req
        self.waiting.add(req)
        _bump(self.waiting_by_class, req.qos_class, 1)

    def finish_requests(self, req_ids: Iterable[str], status: RequestStatus) -> list[request_mod.Request]:
        """End requests from outside the step (abort, stop string, error); frees their KV at once.

        Unknown or already finished ids are ignored, so a late abort after a natural finish is harmless.
        """
        if not status.is_finished:
            raise ValueError(f"{status!r} is not a finished status")
        wanted = {req_id for req_id in req_ids if req_id in self.requests}
        if not wanted:
            return []
        now = self._clock()
        finished = self.waiting.remove_many(wanted)
        for req in finished:
            _bump(self.waiting_by_class, req.qos_class, -1)
        running = [req for req in self.running if req.req_id in wanted]
        if running:
            self.running = [req for req in self.running if req.req_id not in wanted]
            for req in running:
                _bump(self.running_by_class, req.qos_class, -1)
            finished.extend(running)
        for req in finished:
            req.status = status
            self._release(req, now)
        return finished

    def _release(self, req: request_mod.Request, now: float) -> None:
        req.finished_time_s = now
        if self._fair is not None and req.scheduled_time_s is not None:
            self._fair.charge(req, 0, len(req.output_token_ids) - req.max_tokens)
        del self.requests[req.req_id]
        # A preempted request may still have state parked in the runner (its sampling stream).
        if self.kv.free(req.req_id) or req.num_preemptions:
            self._finished_req_ids.append(req.req_id)
        self._events.append(
            outputs.RequestEvent(
                kind=outputs.EventKind.FINISHED,
                req_id=req.req_id,
                qos_class=req.qos_class,
                time_s=now,
                arrival_time_s=req.arrival_time_s,
                finish_reason=req.status.finish_reason,
                num_prompt_tokens=req.num_prompt_tokens,
                num_output_tokens=req.num_output_tokens,
                scheduled_time_s=req.scheduled_time_s,
                first_token_time_s=req.first_token_time_s,
                tenant=req.tenant,
                num_cached_tokens=req.num_cached_tokens,
                engine_seconds=req.engine_seconds,
            )
        )

    # ----------------------------------------------------------------------------------------------
    # The step

    def schedule(self) -> outputs.SchedulerOutput:
        out = outputs.SchedulerOutput.make_empty(self._finished_req_ids)
        self._finished_req_ids = []
        if self._preemption and self.waiting and self.running:
            self._maybe_preempt(out)
        # Decodes go straight into the output; chunks are decisions (request -> tokens) written after the
        # passes. A request preempted for blocks later in the step is taken back out of either.
        scheduled: dict[request_mod.Request, int] = {}
        preempted_before = len(out.preempted_req_ids)
        budget = self._limits.max_batch_tokens
        budget = self._schedule_decodes(out, scheduled, budget)
        budget = self._schedule_partial_prefills(out, scheduled, budget)
        if self.kv.enable_caching and scheduled:
            self._cache_partial_prefills(scheduled)
        new_reqs: list[request_mod.Request] = []
        # No admission in a step that had to preempt for blocks (vLLM): the pool is full right now.
        if len(out.preempted_req_ids) == preempted_before:
            self._admit_waiting(scheduled, new_reqs, budget)
        self._make_output(out, scheduled, new_reqs)
        return out

    def _maybe_preempt(self, out: outputs.SchedulerOutput) -> None:
        """Priority policy: make room for the head of the queue when the batch or the pool is full, by
        preempting running requests of a strictly lower priority; nothing is preempted unless it fits."""
        waiting = self.waiting
        assert isinstance(waiting, queues.PriorityQueue)
        head = waiting.peek()
        kv = self.kv
        free_slots = self._limits.max_batch_size - len(self.running)
        free_kv = kv.num_free_blocks
        # Blocks for its first step (prefix hits ignored: a conservative estimate).
        need_kv = kv.blocks_needed(min(head.num_tokens, self._limits.max_batch_tokens))
        if free_slots >= 1 and free_kv >= need_kv:
            return
        head_class = head.priority
        if not any(req.priority > head_class for req in self.running):
            return  # the common full batch of one class: nothing to preempt, checked without sorting
        now = self._clock()
        head_priority = waiting.effective_priority(head, now)
        victims: list[request_mod.Request] = []
        # Lowest priority first; among equals the most recently admitted (sorted() is stable).
        for req in sorted(reversed(self.running), key=lambda r: -r.priority):
            if req.priority <= head.priority:
                break
            if waiting.effective_priority(req, now) <= head_priority:
                continue  # aged past the head: preempting it would trade one starvation for another
            victims.append(req)
            free_slots += 1
            free_kv += kv.num_blocks_held(req.req_id)
            if free_slots >= 1 and free_kv >= need_kv:
                break
        if not (free_slots >= 1 and free_kv >= need_kv):
            return  # preempting every candidate would still not make room: preempt nobody
        for req in list(victims):  # spare those the others already make room without (a KV shortfall)
            held = kv.num_blocks_held(req.req_id)
            if free_slots >= 2 and free_kv - held >= need_kv:
                victims.remove(req)
                free_slots -= 1
                free_kv -= held
        for req in victims:
            self._preempt(req, out)

    def _preempt(self, req: request_mod.Request, out: outputs.SchedulerOutput) -> None:
        """Recompute: free its blocks and put it back at the head of its class, keeping its tokens."""
        self.running.remove(req)
        self.kv.free(req.req_id)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        _bump(self.running_by_class, req.qos_class, -1)
        _bump(self.waiting_by_class, req.qos_class, 1)
        self.waiting.prepend(req)
        out.finished_req_ids.append(req.req_id)
        out.preempted_req_ids.append(req.req_id)
        if any(req_id == req.req_id for req_id, _ in out.new_block_ids):
            out.new_block_ids[:] = [entry for entry in out.new_block_ids if entry[0] != req.req_id]
        self._num_preemptions += 1

    def _victim(self) -> request_mod.Request:
        """Who gives up its blocks when the pool is full: the lowest priority (priority policy), and among
        equals the most recently admitted (vLLM's choice: it has the least work to redo)."""
        if self._by_priority:
            return max(self.running, key=lambda r: (r.priority, r.admit_seq))
        return self.running[-1]

    def _allocate(
        self,
        req: request_mod.Request,
        num_tokens: int,
        out: outputs.SchedulerOutput,
        scheduled: dict[request_mod.Request, int],
    ) -> tuple[bool, int]:
        """Blocks for `num_tokens` more of a running request, preempting until they fit. Returns whether
        `req` got them (False: it was the victim itself) and the tokens given back by scheduled victims."""
        returned = 0
        while (blocks := self.kv.allocate_slots(req, num_tokens)) is None:
            victim = self._victim()
            returned += scheduled.pop(victim, 0) + _unschedule_decode(out, victim)
            self._preempt(victim, out)
            if victim is req:
                return False, returned
        if blocks:
            out.new_block_ids.append((req.req_id, blocks))
        return True, returned

    def _schedule_decodes(
        self, out: outputs.SchedulerOutput, scheduled: dict[request_mod.Request, int], budget: int
    ) -> int:
        # The hot path: with a full batch this loop is most of the scheduler's time, so it stays flat and
        # writes the output directly (a decode preempted later in the step is taken out again).
        block_size = self.kv.block_size
        req_ids, input_ids, computed = out.req_ids, out.input_token_ids, out.num_computed_tokens
        counts, do_sample = out.num_scheduled_tokens, out.do_sample
        running = RequestStatus.RUNNING
        for req in list(self.running):  # a copy: preemption removes from self.running
            if budget <= 0:
                break
            num_computed = req.num_computed_tokens
            output_ids = req.output_token_ids
            if len(req.prompt_token_ids) + len(output_ids) - num_computed != 1 or req.status is not running:
                continue  # still prefilling (pass 2), or preempted earlier in this loop
            if num_computed % block_size == 0:  # its token starts a new block
                ok, returned = self._allocate(req, 1, out, scheduled)
                budget += returned
                if not ok:
                    continue
            req_ids.append(req.req_id)
            input_ids.append(output_ids[-1] if output_ids else req.prompt_token_ids[-1])
            computed.append(num_computed)
            counts.append(1)
            do_sample.append(True)
            req.num_computed_tokens = num_computed + 1
            budget -= 1
        return budget

    def _schedule_partial_prefills(
        self, out: outputs.SchedulerOutput, scheduled: dict[request_mod.Request, int], budget: int
    ) -> int:
        running = RequestStatus.RUNNING
        for req in list(self.running):
            if budget <= 0:
                break
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining <= 1 or req.status is not running:
                continue
            num_tokens = min(remaining, budget)
            ok, returned = self._allocate(req, num_tokens, out, scheduled)
            budget += returned
            if ok:
                scheduled[req] = num_tokens
                budget -= num_tokens
        return budget

    def _cache_partial_prefills(self, scheduled: dict[request_mod.Request, int]) -> None:
        """Index the prompt blocks this step's partial prefills fill, before admission: a waiting request
        with the same prefix is then admitted with them as a hit instead of computing them a second time.

        Safe for the same reason as indexing at admission: every token's KV is written before any
        attention reads the pool in each layer. Done once pass 2 is over, for the requests still scheduled,
        so a request preempted by a later allocation of pass 2 never leaves unwritten blocks indexed
        (admission never preempts). Blocks a prefill reaches only in a *later* step need no explicit wait:
        a prefill leaves part of its prompt for later only when it took all that was left of the step's
        budget, and then nobody is admitted in this step; the next step indexes its next chunk before that
        step's admissions. So a waiting request that shares the prefix waits exactly until it can hit."""
        kv = self.kv
        for req, num_tokens in scheduled.items():
            num_prompt = len(req.prompt_token_ids)
            if req.num_computed_tokens < num_prompt:
                kv.cache_blocks(req, min(req.num_computed_tokens + num_tokens, num_prompt))

    def _admit_waiting(
        self, scheduled: dict[request_mod.Request, int], new_reqs: list[request_mod.Request], budget: int
    ) -> None:
        kv = self.kv
        now: float | None = None
        while budget > 0 and self.waiting and len(self.running) < self._limits.max_batch_size:
            req = self.waiting.peek()
            if kv.enable_caching and req.block_hashes is None:
                req.block_hashes = prefix_cache_mod.block_hashes(req.prompt_token_ids, kv.block_size)
            # Prompt logprobs need the logits of every prompt position: such a request computes its prompt.
            computed = kv.get_computed_blocks(req) if req.sampling_params.prompt_logprobs is None else []
            num_hit = len(computed) * kv.block_size
            num_tokens = min(req.num_tokens - num_hit, budget)
            # Strict queue order: a request that does not fit blocks those behind it, so a large request
            # is not starved by a stream of small ones.
            if kv.allocate_slots(req, num_tokens, computed) is None:
                break
            self.waiting.pop()
            if kv.enable_caching:
                self._prefix_queries += len(req.prompt_token_ids)
                self._prefix_hits += num_hit
                if req.scheduled_time_s is None:  # the ledger's split of the prompt: at first admission
                    req.num_cached_tokens = num_hit
                # Index the blocks this step fills now, not after the step is planned: a request admitted
                # next in this step (n choices of one prompt) then shares them. Safe because every token's
                # KV is written before any attention reads the pool in each layer.
                kv.cache_blocks(req, min(num_hit + num_tokens, len(req.prompt_token_ids)))
            req.num_computed_tokens = num_hit
            _bump(self.waiting_by_class, req.qos_class, -1)
            _bump(self.running_by_class, req.qos_class, 1)
            req.status = RequestStatus.RUNNING
            self._admit_seq += 1
            req.admit_seq = self._admit_seq
            self.running.append(req)
            if now is None:
                now = self._clock()
            if req.scheduled_time_s is None:
                req.scheduled_time_s = now
                if self._fair is not None:  # its whole cost now, the unused part given back at the end
                    self._fair.charge(req, len(req.prompt_token_ids), req.max_tokens)
                self._events.append(
                    outputs.RequestEvent(
                        kind=outputs.EventKind.SCHEDULED,
                        req_id=req.req_id,
                        qos_class=req.qos_class,
                        time_s=now,
                        arrival_time_s=req.arrival_time_s,
                        num_prompt_tokens=req.num_prompt_tokens,
                    )
                )
            new_reqs.append(req)
            scheduled[req] = num_tokens
            budget -= num_tokens

    def _make_output(
        self,
        out: outputs.SchedulerOutput,
        scheduled: dict[request_mod.Request, int],
        new_reqs: list[request_mod.Request],
    ) -> None:
        """Chunks (partial prefills and admissions) after the decodes, in decision order."""
        kv = self.kv
        for req in new_reqs:
            out.new_reqs.append(
                outputs.NewRequestData(
                    req_id=req.req_id,
                    prompt_token_ids=req.prompt_token_ids,
                    sampling_params=req.sampling_params,
                    block_ids=tuple(kv.block_ids(req.req_id)),
                )
            )
        for req, num_tokens in scheduled.items():
            start = req.num_computed_tokens
            end = start + num_tokens
            req.num_computed_tokens = end
            out.req_ids.append(req.req_id)
            out.num_computed_tokens.append(start)
            out.num_scheduled_tokens.append(num_tokens)
            num_prompt = len(req.prompt_token_ids)
            if end <= num_prompt:
                out.input_token_ids.extend(req.prompt_token_ids[start:end])
            else:  # only after a recompute (preemption): the chunk runs into the generated tokens
                out.input_token_ids.extend((req.prompt_token_ids + req.output_token_ids)[start:end])
            out.num_prefill_tokens += max(0, min(end, num_prompt) - start)
            out.do_sample.append(end == req.num_tokens)

    def update_from_output(
        self, sched_out: outputs.SchedulerOutput, runner_out: outputs.RunnerOutput
    ) -> list[request_mod.Request]:
        """Append the sampled tokens and apply token-level stops. Returns the requests that got a token,
        in batch order; those that finished have a finished status and have already released their KV."""
        now = self._clock()
        requests = self.requests
        updated: list[request_mod.Request] = []
        any_finished = False
        itls = self._itls
        for req_id, token_id in zip(runner_out.req_ids, runner_out.sampled_token_ids, strict=True):
            req = requests.get(req_id)
            if req is None:  # aborted while the step ran
                continue
            output_ids = req.output_token_ids
            output_ids.append(token_id)
            last = req.last_token_time_s
            if last is None:
                req.first_token_time_s = now
                self._events.append(
                    outputs.RequestEvent(
                        kind=outputs.EventKind.FIRST_TOKEN,
                        req_id=req_id,
                        qos_class=req.qos_class,
                        time_s=now,
                        arrival_time_s=req.arrival_time_s,
                        num_prompt_tokens=req.num_prompt_tokens,
                    )
                )
            else:
                itls.append(now - last)
            req.last_token_time_s = now
            if token_id in req.stop_token_ids:
                req.status = RequestStatus.FINISHED_STOPPED
                req.stop_reason = token_id
                any_finished = True
            elif len(output_ids) >= req.max_tokens:
                req.status = RequestStatus.FINISHED_LENGTH
                any_finished = True
            updated.append(req)
        if any_finished:
            self._remove_finished_running(now)
        return updated

    def _remove_finished_running(self, now: float) -> None:
        still_running: list[request_mod.Request] = []
        for req in self.running:
            if req.status > RequestStatus.PREEMPTED:
                _bump(self.running_by_class, req.qos_class, -1)
                self._release(req, now)
            else:
                still_running.append(req)
        self.running = still_running


def _bump(counts: dict[str, int], key: str, delta: int) -> None:
    value = counts.get(key, 0) + delta
    if value:
        counts[key] = value
    else:
        counts.pop(key, None)


def _unschedule_decode(out: outputs.SchedulerOutput, req: request_mod.Request) -> int:
    """Take a decode scheduled earlier in this step out of the output; returns the tokens it had (0 or 1).
    Decodes come first and hold one token each, so entry i's token is input_token_ids[i]."""
    try:
        i = out.req_ids.index(req.req_id)
    except ValueError:
        return 0
    for values in (out.req_ids, out.input_token_ids, out.num_computed_tokens, out.num_scheduled_tokens, out.do_sample):
        del values[i]
    return 1
