"""Iteration-level scheduling: which requests run in the next step, and with how many tokens.

There is no prefill or decode *phase* (vLLM v1's idea): every request has `num_computed_tokens`, and a
step gives it `num_tokens - num_computed_tokens` more, capped by the step's token budget. A request
whose prompt does not fit the budget is therefore prefilled in chunks over several steps while the
others keep decoding. Each step runs in three passes:

1. decodes: every running request that needs exactly one token gets it first, so a long prefill can
   never stall streams that are already flowing;
2. partial prefills: running requests part-way through their prompt get what is left of the budget;
3. admission: waiting requests, in queue order, join while there is budget, a free sequence slot
   (`max_batch_size`) and KV capacity for their worst case (prompt + max_tokens).

`update_from_output` appends sampled tokens and applies the token-level stop rules (stop token ids,
EOS, max_tokens); stop *strings* need text and are applied by the engine core through
`finish_requests`. This module is pure Python: it must never import torch, the tokenizer or the server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fleetlm_runtime.caches import kv_manager
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
        kv_capacity_tokens: int,
        policy: queues.SchedulingPolicy = "priority",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._limits = limits
        self.kv = kv_manager.KVCacheManager(capacity_tokens=kv_capacity_tokens)
        self.waiting = queues.create_queue(policy)
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
        """Requests that released KV since the last call (or schedule()); their runner slots can go."""
        finished, self._finished_req_ids = self._finished_req_ids, []
        return finished

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
            # It could never be admitted; refuse now instead of blocking the queue forever.
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
        del self.requests[req.req_id]
        if self.kv.free(req.req_id):
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
            )
        )

    # ----------------------------------------------------------------------------------------------
    # The step

    def schedule(self) -> outputs.SchedulerOutput:
        out = outputs.SchedulerOutput.make_empty(self._finished_req_ids)
        self._finished_req_ids = []
        budget = self._limits.max_batch_tokens
        budget = self._schedule_decodes(out, budget)
        budget = self._schedule_partial_prefills(out, budget)
        self._admit_waiting(out, budget)
        return out

    def _schedule_decodes(self, out: outputs.SchedulerOutput, budget: int) -> int:
        # The hot path: with a full batch this loop is most of the scheduler's time, so it stays flat.
        req_ids, input_ids = out.req_ids, out.input_token_ids
        for req in self.running:
            if budget <= 0:
                break
            num_computed = req.num_computed_tokens
            if len(req.prompt_token_ids) + len(req.output_token_ids) - num_computed != 1:
                continue  # still prefilling: pass 2
            req_ids.append(req.req_id)
            input_ids.append(req.output_token_ids[-1] if req.output_token_ids else req.prompt_token_ids[-1])
            out.num_computed_tokens.append(num_computed)
            req.num_computed_tokens = num_computed + 1
            budget -= 1
        num_decodes = len(req_ids)
        out.num_scheduled_tokens.extend([1] * num_decodes)
        out.do_sample.extend([True] * num_decodes)
        return budget

    def _schedule_partial_prefills(self, out: outputs.SchedulerOutput, budget: int) -> int:
        for req in self.running:
            if budget <= 0:
                break
            remaining = req.num_tokens - req.num_computed_tokens
            if remaining > 1:
                budget -= self._schedule_chunk(out, req, min(remaining, budget))
        return budget

    def _admit_waiting(self, out: outputs.SchedulerOutput, budget: int) -> None:
        now: float | None = None
        while budget > 0 and self.waiting and len(self.running) < self._limits.max_batch_size:
            req = self.waiting.peek()
            # Strict queue order: a request that does not fit blocks those behind it, so a large request
            # is not starved by a stream of small ones.
            if not self.kv.allocate(req.req_id, req.kv_reservation):
                break
            self.waiting.pop()
            _bump(self.waiting_by_class, req.qos_class, -1)
            _bump(self.running_by_class, req.qos_class, 1)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if now is None:
                now = self._clock()
            if req.scheduled_time_s is None:
                req.scheduled_time_s = now
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
            out.new_reqs.append(
                outputs.NewRequestData(
                    req_id=req.req_id,
                    prompt_token_ids=req.prompt_token_ids,
                    sampling_params=req.sampling_params,
                    max_num_tokens=req.kv_reservation,
                )
            )
            budget -= self._schedule_chunk(out, req, min(req.num_tokens - req.num_computed_tokens, budget))

    def _schedule_chunk(self, out: outputs.SchedulerOutput, req: request_mod.Request, num_tokens: int) -> int:
        start = req.num_computed_tokens
        end = start + num_tokens
        num_prompt = len(req.prompt_token_ids)
        if end <= num_prompt:
            out.input_token_ids.extend(req.prompt_token_ids[start:end])
        else:  # only after a recompute (preemption): the chunk runs into the generated tokens
            out.input_token_ids.extend((req.prompt_token_ids + req.output_token_ids)[start:end])
        out.num_prefill_tokens += max(0, min(end, num_prompt) - start)
        out.req_ids.append(req.req_id)
        out.num_scheduled_tokens.append(num_tokens)
        out.num_computed_tokens.append(start)
        out.do_sample.append(end == req.num_tokens)
        req.num_computed_tokens = end
        return num_tokens

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
