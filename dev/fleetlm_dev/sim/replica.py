"""One simulated runtime replica: continuous batching with chunked prefill, per-class queues, KV budget.

Event-driven at step granularity but without an event per token: between admissions and completions the
batch is constant, so a run of decode steps is one segment whose length is known. Requests wait in
strict priority order (most urgent class first, FIFO within a class), are admitted at a step boundary
while the batch is under max_batch_size and their prompt + output fit the KV budget, prefill in chunks
of at most max_batch_tokens minus the decoding sequences, then decode one token per step. The replica
keeps cumulative Prometheus-like histograms and counters with the runtime's buckets and hands them out
as `window.PodSample`, so the policy sees what it would see from `/metrics`. Nothing here decides any
tuning; no I/O.
"""

from __future__ import annotations

import bisect
import collections
import heapq
from collections.abc import Callable, Sequence

from fleetlm_dev.sim import calibration
from fleetlm_operator.policy import histogram, window

# The runtime's buckets (fleetlm_runtime.contract, vLLM's); the sim may not import the runtime, so they
# are repeated here and a test holds them equal.
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
TPOT_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
SERVICE_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


class Seq:
    """One request inside the simulator."""

    __slots__ = (
        "arrival_s", "attempts", "cls", "finish_s", "finish_step", "first_s", "output", "prefill_left", "prompt",
        "sched_s",
    )  # fmt: skip

    def __init__(self, arrival_s: float, prompt: int, output: int, cls: int) -> None:
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.output = output
        self.cls = cls
        self.sched_s = -1.0
        self.first_s = -1.0
        self.finish_s = -1.0
        self.prefill_left = prompt
        self.finish_step = 0
        self.attempts = 1


class _Hist:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def snapshot(self) -> histogram.Histogram:
        cumulative: list[float] = []
        running = 0
        for count in self.counts[:-1]:
            running += count
            cumulative.append(float(running))
        return histogram.Histogram(
            bounds=self.bounds, cumulative=tuple(cumulative), count=float(running + self.counts[-1]), sum=self.total
        )


Sink = Callable[[Seq], None]


class Replica:
    __slots__ = (
        "_busy_at_scrape_s",
        "_scraped_at_s",
        "busy_s",
        "calib",
        "class_names",
        "created_s",
        "decoding",
        "finished",
        "kv_used",
        "max_batch_size",
        "max_batch_tokens",
        "name",
        "next_s",
        "now",
        "num_waiting",
        "plan_prefill_tokens",
        "plan_steps",
        "prefilling",
        "queue_limits",
        "ready_s",
        "rejected",
        "running_by_class",
        "service",
        "sink",
        "step",
        "step_dt",
        "tpot",
        "ttft",
        "waiting",
    )

    def __init__(
        self,
        name: str,
        *,
        calib: calibration.Calibration,
        class_names: tuple[str, ...],
        max_batch_size: int,
        max_batch_tokens: int,
        created_s: float,
        ready_s: float,
        sink: Sink,
        queue_limit: int | None = None,
    ) -> None:
        self.name = name
        # Per class, like the runtime's qos.classes[].queueLimit; None: unbounded. Live tuning may move them.
        self.queue_limits: list[int | None] = [queue_limit] * len(class_names)
        self.calib = calib
        self.class_names = class_names
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max(max_batch_tokens, max_batch_size)
        self.created_s = created_s
        self.ready_s = ready_s
        self.sink = sink
        self.waiting: list[collections.deque[Seq]] = [collections.deque() for _ in class_names]
        self.num_waiting = 0
        self.prefilling: collections.deque[Seq] = collections.deque()
        self.decoding: list[tuple[int, int, Seq]] = []  # heap of (finish_step, tie, seq)
        self.running_by_class = [0] * len(class_names)
        self.kv_used = 0
        self.step = 0
        self.now = ready_s
        self.next_s: float | None = None  # end of the planned step(s); None while idle
        self.step_dt = 0.0
        self.plan_steps = 0
        self.plan_prefill_tokens = 0
        self.busy_s = 0.0
        self._busy_at_scrape_s = 0.0
        self._scraped_at_s = ready_s
        self.ttft = [_Hist(TTFT_BUCKETS_S) for _ in class_names]
        self.tpot = [_Hist(TPOT_BUCKETS_S) for _ in class_names]
        self.service = [_Hist(SERVICE_BUCKETS_S) for _ in class_names]
        self.finished = [0] * len(class_names)
        self.rejected = [0] * len(class_names)

    # --------------------------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return self.num_waiting + len(self.prefilling) + len(self.decoding)

    @property
    def idle(self) -> bool:
        return self.next_s is None and self.num_waiting == 0

    def advance_to(self, t: float) -> None:
        """Run every step that ends by `t`; afterwards the replica is idle or mid-step past `t`."""
        while self.next_s is not None and self.next_s <= t:
            self._commit()
            self._boundary()

    def submit(self, seq: Seq, t: float) -> bool:
        """A request arrives at `t` (call `advance_to(t)` first); False: refused, its class's queue is full (429)."""
        limit = self.queue_limits[seq.cls]
        if limit is not None and len(self.waiting[seq.cls]) >= limit:
            self.rejected[seq.cls] += 1
            return False
        self.waiting[seq.cls].append(seq)
        self.num_waiting += 1
        if self.next_s is None:
            self.now = t
            self._boundary()
        elif self.plan_steps > 1 and self._has_room(seq):
            self._split(t)
        return True

    def reject(self, seq: Seq) -> None:
        self.rejected[seq.cls] += 1

    def set_queue_limits(self, limits: Sequence[int | None]) -> None:
        """Live tuning of the per-class queue limits: arrivals from now on see them; a queue already longer
        keeps what it holds (the runtime refuses new requests past the limit, it drops none it took)."""
        if len(limits) != len(self.class_names):
            raise ValueError(f"queue limits: {len(limits)} given for {len(self.class_names)} classes")
        self.queue_limits = list(limits)

    def set_limits(self, max_batch_size: int, max_batch_tokens: int, t: float) -> None:
        """Live tuning: applies from the next step boundary (call `advance_to(t)` first)."""
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max(max_batch_tokens, max_batch_size)
        if self.next_s is not None and self.plan_steps > 1 and self.num_waiting:
            head = self._head()
            if head is not None and self._has_room(head):
                self._split(t)

    def scrape(self, t: float) -> window.PodSample:
        """What `/metrics` would say at `t` (call `advance_to(t)` first)."""
        names = self.class_names
        span_s = t - self._scraped_at_s
        gpu = (self.busy_s - self._busy_at_scrape_s) / span_s if span_s > 0 else None
        self._busy_at_scrape_s = self.busy_s
        self._scraped_at_s = t
        return window.PodSample(
            pod=self.name,
            scraped_at_s=t,
            running_by_class={n: float(self.running_by_class[i]) for i, n in enumerate(names)},
            waiting_by_class={n: float(len(self.waiting[i])) for i, n in enumerate(names)},
            kv_usage=self.kv_used / self.calib.kv_capacity_tokens,
            gpu_utilization=None if gpu is None else min(1.0, gpu),
            ttft_by_class={n: self.ttft[i].snapshot() for i, n in enumerate(names)},
            tpot_by_class={n: self.tpot[i].snapshot() for i, n in enumerate(names)},
            service_by_class={n: self.service[i].snapshot() for i, n in enumerate(names)},
            finished_by_class={n: float(self.finished[i]) for i, n in enumerate(names)},
            rejected_by_class={n: float(self.rejected[i]) for i, n in enumerate(names)},
            # The runtime's start-up gauges: the process start and the ready time, from which a new
            # pod's first scrape counts (nothing was served before it), as in the cluster.
            started_at_s=self.created_s,
            ready_at_s=self.ready_s,
        )

    # --------------------------------------------------------------------------------------------

    def _head(self) -> Seq | None:
        for queue in self.waiting:
            if queue:
                return queue[0]
        return None

    def _has_room(self, seq: Seq) -> bool:
        running = len(self.prefilling) + len(self.decoding)
        return running < self.max_batch_size and self.kv_used + seq.prompt + seq.output <= self.calib.kv_capacity_tokens

    def _split(self, t: float) -> None:
        """Cut a multi-step decode segment at the first step boundary after `t`, so admission can happen."""
        dt = self.step_dt
        done = int((t - self.now) / dt)
        if done > 0:
            self.step += done
            self.now += done * dt
            self.busy_s += done * dt
        self.plan_steps = 1
        self.next_s = self.now + dt

    def _commit(self) -> None:
        steps = self.plan_steps
        assert self.next_s is not None
        self.step += steps
        self.busy_s += steps * self.step_dt
        self.now = self.next_s
        now = self.now
        tokens = self.plan_prefill_tokens
        while tokens > 0 and self.prefilling:
            seq = self.prefilling[0]
            used = min(tokens, seq.prefill_left)
            seq.prefill_left -= used
            tokens -= used
            if seq.prefill_left:
                break
            self.prefilling.popleft()
            seq.first_s = now
            self.ttft[seq.cls].observe(now - seq.arrival_s)
            if seq.output <= 1:
                self._complete(seq)
            else:
                seq.finish_step = self.step + seq.output - 1
                heapq.heappush(self.decoding, (seq.finish_step, id(seq), seq))
        decoding = self.decoding
        while decoding and decoding[0][0] <= self.step:
            self._complete(heapq.heappop(decoding)[2])

    def _complete(self, seq: Seq) -> None:
        now = self.now
        seq.finish_s = now
        cls = seq.cls
        self.kv_used -= seq.prompt + seq.output
        self.running_by_class[cls] -= 1
        self.finished[cls] += 1
        if seq.output > 1:
            self.tpot[cls].observe((now - seq.first_s) / (seq.output - 1))
        self.service[cls].observe(now - seq.sched_s)
        self.sink(seq)

    def _boundary(self) -> None:
        """At a step boundary: admit what fits, then plan the next step (or run of decode steps)."""
        now = self.now
        if self.num_waiting:
            limit = self.max_batch_size
            capacity = self.calib.kv_capacity_tokens
            running = len(self.prefilling) + len(self.decoding)
            for queue in self.waiting:
                while queue and running < limit:
                    seq = queue[0]
                    need = seq.prompt + seq.output
                    if self.kv_used + need > capacity and running:
                        break
                    queue.popleft()
                    self.num_waiting -= 1
                    seq.sched_s = now
                    self.kv_used += need
                    self.running_by_class[seq.cls] += 1
                    self.prefilling.append(seq)
                    running += 1
                if running >= limit or queue:
                    break  # strict priority: a blocked urgent class is not overtaken
        step = self.calib.step
        num_decoding = len(self.decoding)
        if self.prefilling:
            pending = 0
            for seq in self.prefilling:
                pending += seq.prefill_left
            chunk = min(pending, max(1, self.max_batch_tokens - num_decoding))
            self.plan_prefill_tokens = chunk
            self.plan_steps = 1
            self.step_dt = step.step_s(num_decoding + len(self.prefilling), num_decoding + chunk)
            self.next_s = now + self.step_dt
        elif num_decoding:
            self.plan_prefill_tokens = 0
            self.plan_steps = max(1, self.decoding[0][0] - self.step)
            self.step_dt = step.step_s(num_decoding, num_decoding)
            self.next_s = now + self.plan_steps * self.step_dt
        else:
            self.plan_prefill_tokens = 0
            self.plan_steps = 0
            self.next_s = None
