"""EngineCore: the synchronous engine. `step()` is schedule -> execute -> update, and the bookkeeping.

It owns the scheduler (what runs), the model runner (how it runs) and the per-request detokenizers (text
and stop strings), and turns each step into `RequestOutput`s and one `EngineStats`. It is not
thread-safe: exactly one thread calls it (the `AsyncEngine` worker, or a test). It never sleeps, never
touches asyncio and knows nothing of HTTP.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence

import torch

from fleetlm_runtime.caches import kv_budget, kv_manager
from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import detokenizer, outputs, runner, scheduler, validate
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import loader

logger = logging.getLogger(__name__)

RequestStatus = request_mod.RequestStatus


class EngineCore:
    def __init__(
        self,
        config: config_mod.EngineConfig,
        *,
        loaded: loader.LoadedModel | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        load_seconds = 0.0  # a model handed in was loaded by someone else
        if loaded is None:
            started = time.perf_counter()
            loaded = loader.load(
                config.model, dtype=config.dtype, device=config.device, max_model_len=config.max_model_len
            )
            load_seconds = time.perf_counter() - started
        self.config = config
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        if config.max_model_len is not None and config.max_model_len > loaded.max_model_len:
            raise request_mod.InvalidParameterError(
                "max_model_len", f"{config.max_model_len} exceeds this model's context of {loaded.max_model_len} tokens"
            )
        self.max_model_len = config.max_model_len or loaded.max_model_len
        block_size = config.kv_block_size
        # The runner sizes the pool (it measures the model and, on a GPU, the memory) and allocates it now.
        self.runner = runner.ModelRunner(
            loaded=loaded,
            max_model_len=self.max_model_len,
            budget=kv_budget.KVBudget(
                block_size=block_size,
                memory_bytes=config.kv_cache_memory,
                max_kv_tokens=config.max_kv_tokens,
                gpu_memory_utilization=config.gpu_memory_utilization,
                max_useful_tokens=config.max_batch_size * self.max_model_len,
            ),
            max_batch_tokens=config.max_batch_tokens,
            seed=config.seed,
            fast_path=config.fast_path,
        )
        # Built beside the rest of start-up, and joined before this returns: ready means ready, and the
        # memory it takes (about 20 MiB) is there before anyone takes a baseline.
        preparing = self.runner.prepare_grammars() if config.prepare_grammars else None
        cache_tokens = config.prefix_cache_max_tokens
        self.scheduler = scheduler.Scheduler(
            limits=scheduler.SchedulerLimits(
                max_batch_size=config.max_batch_size, max_batch_tokens=config.max_batch_tokens
            ),
            kv=kv_manager.KVCacheManager(
                num_blocks=self.runner.num_blocks + 1,  # with the null block
                block_size=block_size,
                enable_caching=cache_tokens != 0,
                max_cached_blocks=cache_tokens // block_size if cache_tokens else None,
            ),
            policy=config.scheduling_policy,
            clock=clock,
            aging_s=config.priority_aging_s,
            enable_preemption=config.enable_preemption,
        )
        self.clock = clock  # arrival times of requests made here (tests drive it with a fake one)
        self._detokenizers: dict[str, detokenizer.IncrementalDetokenizer] = {}
        # Fixed once loaded: what a client validates requests against (it may live in another process).
        self.info = outputs.EngineInfo(
            model_id=loaded.model_id,
            max_model_len=self.max_model_len,
            vocab_size=loaded.vocab_size,
            eos_token_ids=loaded.eos_token_ids,
            kv_capacity_tokens=self.scheduler.kv.capacity_tokens,
            forward_name=self.runner.forward_name,
            kv_block_size=block_size,
            kv_num_blocks=self.runner.num_blocks,
            kv_pool_bytes=self.runner.pool_bytes,
            kv_budget_source=self.runner.budget_source,
            weight_bytes=sum(
                t.numel() * t.element_size() for t in (*loaded.model.parameters(), *loaded.model.buffers())
            ),
            load_seconds=load_seconds,
        )
        if preparing is not None:
            preparing.join()

    # ----------------------------------------------------------------------------------------------
    # Requests

    def make_request(
        self,
        *,
        req_id: str,
        prompt_token_ids: Sequence[int],
        sampling_params: request_mod.SamplingParams,
        arrival_time_s: float | None = None,
        qos_class: str = "default",
        priority: int = 0,
        weight: float = 1.0,
        tenant: str = "",
    ) -> request_mod.Request:
        """Validate against the model and the KV capacity (`validate.make_request`); any thread may call it."""
        return validate.make_request(
            self.info,
            req_id=req_id,
            prompt_token_ids=prompt_token_ids,
            sampling_params=sampling_params,
            arrival_time_s=self.clock() if arrival_time_s is None else arrival_time_s,
            qos_class=qos_class,
            priority=priority,
            weight=weight,
            tenant=tenant,
        )

    def add_request(self, req: request_mod.Request) -> None:
        if req.sampling_params.constraint is not None:  # compiled now: a refused schema ends this request alone
            self.runner.prepare_grammar(req.sampling_params.constraint)
        self.scheduler.add_request(req)
        params = req.sampling_params
        if params.detokenize:
            self._detokenizers[req.req_id] = detokenizer.IncrementalDetokenizer(
                self.tokenizer,
                prompt_token_ids=req.prompt_token_ids,
                stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output,
            )

    def abort_requests(
        self,
        req_ids: Iterable[str],
        *,
        status: RequestStatus = RequestStatus.FINISHED_ABORTED,
        error: str | None = None,
    ) -> list[outputs.RequestOutput]:
        """End requests now and free their KV blocks at once (and the runner's state for them)."""
        finished = self.scheduler.finish_requests(req_ids, status)
        self._free_finished()
        return [self._final_output(req, error=error) for req in finished]

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def update_limits(self, *, max_batch_size: int | None = None, max_batch_tokens: int | None = None) -> None:
        """Takes effect at the next step. Raises InvalidParameterError (naming the field) if invalid."""
        current = self.scheduler.limits
        self.scheduler.update_limits(
            scheduler.SchedulerLimits(
                max_batch_size=current.max_batch_size if max_batch_size is None else max_batch_size,
                max_batch_tokens=current.max_batch_tokens if max_batch_tokens is None else max_batch_tokens,
            )
        )

    @property
    def limits(self) -> scheduler.SchedulerLimits:
        return self.scheduler.limits

    @property
    def kv_usage(self) -> float:
        return self.scheduler.kv.usage

    # ----------------------------------------------------------------------------------------------
    # The step

    def step(self) -> tuple[list[outputs.RequestOutput], outputs.EngineStats | None]:
        """Run one iteration. Returns the outputs of every request that produced a token or finished,
        and the step's stats (None when there was nothing to run)."""
        started = time.perf_counter()
        sched_out = self.scheduler.schedule()
        if not sched_out.req_ids:
            if sched_out.finished_req_ids:
                self.runner.free(sched_out.finished_req_ids, sched_out.preempted_req_ids)
            return [], None
        try:
            runner_out = self.runner.execute(sched_out)
        except Exception as exc:  # a bug or OOM must fail these requests, not kill the engine
            logger.exception("engine step failed; failing the %d requests in it", sched_out.num_reqs)
            # Blocks indexed in this step may not have been written: start the prefix cache afresh rather
            # than let later prompts share KV that is missing.
            self.scheduler.kv.reset_prefix_cache()
            failed = self.abort_requests(
                sched_out.req_ids, status=RequestStatus.FINISHED_ERROR, error=f"engine step failed: {exc}"
            )
            self.runner.last_model_s = 0.0
            return failed, self._make_stats(sched_out, started)
        self._attribute(sched_out, time.perf_counter() - started)
        updated = self.scheduler.update_from_output(sched_out, runner_out)
        request_outputs = self._make_outputs(updated)
        if runner_out.logprobs is not None or runner_out.prompt_logprobs:
            _attach_logprobs(request_outputs, runner_out)
        self._free_finished()
        return request_outputs, self._make_stats(sched_out, started)

    def _attribute(self, sched_out: outputs.SchedulerOutput, step_s: float) -> None:
        """The usage ledger's engine-seconds: this step's time so far (schedule and model), split by each
        request's share of the step's tokens. Done before the update, so a request finishing now has its
        last step counted in its FINISHED event."""
        per_token = step_s / len(sched_out.input_token_ids)
        requests = self.scheduler.requests
        for req_id, count in zip(sched_out.req_ids, sched_out.num_scheduled_tokens, strict=True):
            requests[req_id].engine_seconds += per_token * count

    def _make_outputs(self, updated: list[request_mod.Request]) -> list[outputs.RequestOutput]:
        # Runs once per token of every running request: kept flat, with locals for the lookups.
        detokenizers = self._detokenizers
        make = outputs.RequestOutput
        running = RequestStatus.RUNNING
        made: list[outputs.RequestOutput] = []
        stopped: list[request_mod.Request] = []
        for req in updated:
            token = req.output_token_ids[-1]
            finished = req.status is not running
            finish_reason = req.status.finish_reason if finished else None
            text = ""
            detok = detokenizers.get(req.req_id)
            if detok is not None:
                text, stop = detok.step(token, finished=finished)
                if stop is not None and not finished:
                    stopped.append(req)
                    req.stop_reason = stop
                    finished = True
                    finish_reason = request_mod.FinishReason.STOP
                if finished:
                    del detokenizers[req.req_id]
            made.append(
                make(  # positional, in RequestOutput's field order: this is the per-token hot path
                    req.req_id,
                    [token],
                    text,
                    finished,
                    finish_reason,
                    req.stop_reason,
                    len(req.prompt_token_ids),
                    len(req.output_token_ids),
                )
            )
        if stopped:
            # Stop strings end requests after the token-level update; release them like any other finish.
            stop_reasons = {req.req_id: req.stop_reason for req in stopped}
            for req in self.scheduler.finish_requests(stop_reasons, RequestStatus.FINISHED_STOPPED):
                req.stop_reason = stop_reasons[req.req_id]
        return made

    def _final_output(self, req: request_mod.Request, *, error: str | None = None) -> outputs.RequestOutput:
        detok = self._detokenizers.pop(req.req_id, None)
        return outputs.RequestOutput(
            req_id=req.req_id,
            new_token_ids=[],
            text=detok.flush() if detok is not None else "",
            finished=True,
            finish_reason=req.status.finish_reason,
            stop_reason=req.stop_reason,
            num_prompt_tokens=len(req.prompt_token_ids),
            num_output_tokens=len(req.output_token_ids),
            error=error,
        )

    def _free_finished(self) -> None:
        # The scheduler has released the blocks; drop the runner's state now rather than at the next
        # schedule(), so an idle engine holds nothing either.
        finished = self.scheduler.take_finished_req_ids()
        if finished:
            self.runner.free(finished)

    def _make_stats(self, sched_out: outputs.SchedulerOutput, started: float) -> outputs.EngineStats:
        sched = self.scheduler
        events, itls = sched.take_events()
        preemptions, prefix_queries, prefix_hits = sched.take_step_counters()
        kv = sched.kv
        return outputs.EngineStats(
            now_s=self.clock(),
            step_duration_s=time.perf_counter() - started,
            model_duration_s=self.runner.last_model_s,
            batch_size=len(sched_out.req_ids),
            num_tokens=len(sched_out.input_token_ids),
            num_prefill_tokens=sched_out.num_prefill_tokens,
            num_decode_tokens=len(sched_out.input_token_ids) - sched_out.num_prefill_tokens,
            num_running=len(sched.running),
            num_waiting=len(sched.waiting),
            running_by_class=dict(sched.running_by_class),
            waiting_by_class=dict(sched.waiting_by_class),
            kv_usage=kv.usage,
            num_kv_tokens_reserved=kv.num_used_tokens,
            kv_capacity_tokens=kv.capacity_tokens,
            max_batch_size=sched.limits.max_batch_size,
            max_batch_tokens=sched.limits.max_batch_tokens,
            events=tuple(events),
            inter_token_latencies_s=tuple(itls),
            num_preemptions=preemptions,
            prefix_cache_queries=prefix_queries,
            prefix_cache_hits=prefix_hits,
            prefix_cache_tokens=kv.pool.num_cached_blocks * kv.block_size,
            kv_blocks_total=kv.num_blocks,
            kv_blocks_used=kv.num_used_blocks,
            grammar_compile_s=self.runner.take_grammar_compile_seconds(),
        )

    def close(self) -> None:
        self.runner.close()


def _attach_logprobs(made: list[outputs.RequestOutput], runner_out: outputs.RunnerOutput) -> None:
    """Give each output the logprobs of its token, for the requests that asked (off the common path)."""
    entries = runner_out.logprobs or [None] * len(runner_out.req_ids)
    by_req = {r: lp for r, lp in zip(runner_out.req_ids, entries, strict=True) if lp is not None}
    prompt = runner_out.prompt_logprobs
    for out in made:
        entry = by_req.get(out.req_id)
        if entry is not None:
            out.logprobs = [entry]
        if prompt and out.req_id in prompt:
            out.prompt_logprobs = prompt[out.req_id]
