"""Executes one scheduled step on the model (torch + transformers): the KV pool, attention, sampling.

Design (`fleetlm-dev bench engine` prints the figures):

* **One KV pool, allocated at start and never grown.** Per layer one tensor of keys and values,
  `[2, kv_heads, num_blocks, block_size, head_dim]`, sized once from the budget (`caches/kv_budget.py`:
  bytes, a token cap, or on a GPU what is left after the weights and a profiling forward). Block 0 is
  the null block: it stays zero and pads block tables. Nothing on the hot path allocates KV: the
  scheduler hands out block ids (`caches/kv_manager.py`), the runner only indexes.
* **Packed tokens, one forward per step.** Every scheduled token of every request (decodes and prefill
  chunks) goes into a single `[1, T]` row with explicit `position_ids`, so the linear layers see exactly
  the tokens that need computing: no padding, and a prefill chunk costs no more than its tokens.
* **Our attention inside the model's forward** (`engine/forward.py`: the model's own modules, or a lean
  Llama-family path over the same weights). `attend` writes the new keys and values into the pool by
  slot (`block * block_size + offset`, one `index_copy_` per layer), then attends per group: all
  single-token (decode) queries in groups of rows sorted by length, each over its blocks gathered by
  block table (one `index_select` of whole blocks per group and layer, the index built once per step and
  shared by all layers; rows shorter than the group's longest read the null block, masked), one batched
  matmul, softmax, matmul; each prefill chunk in
  its own causal SDPA call over its own new keys, or, when it continues a sequence (a later chunk, a
  prefix-cache hit), over its gathered blocks. Sliding-window layers get their window in the mask.
* **Prefix-cache hits share blocks.** A hit's block table starts with the cached blocks, which other
  requests may hold too: no copy, no prefill of those tokens.
* **Preemption.** A preempted request's state is dropped like a finished one's (its blocks are the
  scheduler's to reuse), but its sampling state is parked until it returns, so a seeded stream continues
  where it stopped.
* **Sampling per batch.** One argmax for greedy batches, vectorised top-k/top-p otherwise
  (`engine/sampling.py`), one `.tolist()` per step.

This module must never decide *what* runs (the scheduler does) nor touch request lifecycles.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from fleetlm_runtime.caches import block_pool, kv_budget
from fleetlm_runtime.engine import forward as forward_mod
from fleetlm_runtime.engine import outputs, sampling
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import errors, loader

if TYPE_CHECKING:  # the grammar library (xgrammar) loads on the first constrained request only
    from fleetlm_runtime.structured import grammar as grammar_mod

logger = logging.getLogger(__name__)

_PROBE_TOKENS = 8
_NULL = block_pool.NULL_BLOCK
# Decode rows per attention group. Rows are sorted by length and each group gathers only as many blocks as
# its longest row holds, so short rows stop paying for the longest one's keys (with lengths spread like a
# serving mix this halves the bytes gathered), and a group's gathered K/V (a few MiB) is still in cache
# when the matmuls read it. Measured on CPU at 32 streams: 4 to 16 are within noise of each other, one
# group of all rows costs about twice as much per layer.
_DECODE_GROUP = 8


class UnsupportedModelError(errors.ModelLoadError):
    pass


@dataclass(slots=True)
class _Chunk:
    """A multi-token span of one request in this step (a prompt chunk)."""

    offset: int  # index of its first token in the packed row
    num_tokens: int
    start: int  # position of its first token
    gather: torch.Tensor | None = None  # [kv_heads * blocks] pool rows of its keys; None: its own keys only
    key_len: int = 0  # keys read through `gather` (whole blocks)
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # by sliding window


@dataclass(slots=True)
class _DecodeGroup:
    """Consecutive decode rows (sorted by length) attended together, over as many blocks as the longest holds."""

    start: int  # first row in the packed row
    rows: int
    num_blocks: int  # blocks read per row
    gather: torch.Tensor | None = None  # [2 * rows * kv_heads * blocks] pool rows, (K or V, row, head, block)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window


@dataclass(slots=True)
class _StepMeta:
    """Everything the attention function needs, computed once per step and shared by all layers."""

    num_decode: int  # single-token queries, packed first
    decode_groups: list[_DecodeGroup]
    decode_lens: torch.Tensor  # [num_decode] valid keys per row, including the new token
    chunks: list[_Chunk]
    write_index: torch.Tensor | None  # [T * kv_heads] token rows of the flat pool; None while discovering


class ModelRunner:
    def __init__(
        self,
        *,
        loaded: loader.LoadedModel,
        max_model_len: int,
        budget: kv_budget.KVBudget,
        max_batch_tokens: int = 512,
        seed: int = 0,
        fast_path: bool = True,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.max_model_len = max_model_len
        self.block_size = budget.block_size
        self._lm_head = self.model.get_output_embeddings()
        self._rng = random.Random(seed)
        self.model.set_attn_implementation(forward_mod.ATTN_IMPLEMENTATION)
        if self.model.config._attn_implementation != forward_mod.ATTN_IMPLEMENTATION:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} does not route attention through transformers' AttentionInterface"
            )
        # Request state.
        self._tables: dict[str, list[int]] = {}  # block tables, as the scheduler sent them
        self._sampling: dict[str, sampling.SamplingState] = {}
        self._num_sampled = 0  # live requests that are not greedy
        self._num_special = 0  # live requests that want logprobs or process logits (the sampler's slow path)
        self._parked: dict[str, sampling.SamplingState] = {}  # preempted requests' sampling streams
        self._grammars: grammar_mod.GrammarCache | None = None  # made on the first constrained request
        # The pool, per layer: keys and values in one tensor [2, kv_heads, num_blocks, block_size, head_dim]
        # (one write and one gather per layer serve both), and two flat views of it.
        self._kv: list[torch.Tensor] = []
        self._kv_rows: list[torch.Tensor] = []  # [2 * kv_heads * num_blocks * block_size, head_dim]: writes
        self._kv_blocks: list[torch.Tensor] = []  # [2 * kv_heads * num_blocks, block_size * head_dim]: gathers
        self.num_blocks = 0  # usable blocks (the null block excluded)
        self.budget_source = ""
        self._kv_heads = 0
        self._head_dim = 0
        self._shapes: list[tuple[int, int, torch.dtype]] = []  # per layer, seen while discovering
        self._meta: _StepMeta | None = None
        self._arange = torch.arange(max(max_model_len, budget.block_size) + budget.block_size, device=self.device)
        self._layers_seen: list[int] | None = None  # attend() records layers while this is a list
        self._reference_hidden: torch.Tensor | None = None
        self.last_model_s = 0.0  # time in the model (forward and output head) during the last step
        self._forward: forward_mod.Forward = forward_mod.ModuleForward(self.model, self.attend)
        self._num_layers = self._check_module_path()
        gpu_free = self._profile_gpu(budget, max_batch_tokens) if self.device.type == "cuda" else None
        self._allocate_pool(budget, gpu_free)
        if fast_path and forward_mod.LlamaForward.supports(self.model) is None:
            self._try_fast_path()

    @property
    def forward_name(self) -> str:
        """Which forward runs: "modules" (the model's own) or "llama-fast"."""
        return self._forward.name

    # ----------------------------------------------------------------------------------------------
    # Public surface

    @property
    def num_requests(self) -> int:
        return len(self._tables)

    @property
    def pool_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._kv)

    @property
    def pool_tensors(self) -> list[torch.Tensor]:
        return list(self._kv)

    @property
    def num_layers(self) -> int:
        return self._num_layers

    def close(self) -> None:
        """Drop the pool. The model keeps the engine's attention implementation: other runners may
        share the model, and outside a runner step it is exactly transformers' SDPA."""
        self._kv, self._kv_rows, self._kv_blocks = [], [], []
        self._tables.clear()
        self._sampling.clear()
        self._parked.clear()

    def execute(self, sched: outputs.SchedulerOutput) -> outputs.RunnerOutput:
        with torch.inference_mode():
            if sched.finished_req_ids:
                self._free(sched.finished_req_ids, preempted=sched.preempted_req_ids)
            for new in sched.new_reqs:
                self._add(new)
            tables = self._tables
            for req_id, block_ids in sched.new_block_ids:
                tables[req_id].extend(block_ids)
            if not sched.req_ids:
                return outputs.RunnerOutput(req_ids=[], sampled_token_ids=[])
            return self._execute(sched)

    def free(self, req_ids: list[str], preempted: list[str] | None = None) -> None:
        """Forget these requests now; unknown ids are ignored. Those also in `preempted` keep their
        sampling state for their return."""
        self._free(req_ids, preempted)

    # ----------------------------------------------------------------------------------------------
    # The step

    # Long on purpose: the step's one pass over the batch fills seven parallel lists that become one packed
    # tensor; split into helpers they would all be passed around, on the per-step hot path.
    def _execute(self, sched: outputs.SchedulerOutput) -> outputs.RunnerOutput:  # noqa: PLR0912, PLR0915
        req_ids = sched.req_ids
        num_reqs = len(req_ids)
        counts = sched.num_scheduled_tokens
        starts = sched.num_computed_tokens
        token_ids = sched.input_token_ids
        tables = self._tables
        states = self._sampling
        bs = self.block_size

        # Single-token sampled entries come first (the scheduler's decode pass): the decode group. The
        # first test is the common all-decode step, answered without a Python loop over the requests.
        do_sample = sched.do_sample
        pure_decode = len(token_ids) == num_reqs and all(do_sample)
        num_decode = num_reqs if pure_decode else _leading_decodes(counts, do_sample)
        # The decode rows go in order of length (see _DECODE_GROUP); the sampled tokens are returned in
        # this order, keyed by request id.
        order = sorted(range(num_decode), key=starts.__getitem__)
        ids = [token_ids[i] for i in order]
        positions = [starts[i] for i in order]
        sample_req_ids = [req_ids[i] for i in order]
        sample_states = [states[r] for r in sample_req_ids]
        slots: list[int] = []
        decode_tables: list[int] = []
        decode_groups: list[_DecodeGroup] = []
        for first in range(0, num_decode, _DECODE_GROUP):
            last = min(first + _DECODE_GROUP, num_decode)
            num_blocks = positions[last - 1] // bs + 1  # sorted: the group's last row is its longest
            decode_groups.append(_DecodeGroup(start=first, rows=last - first, num_blocks=num_blocks))
            for req_id, pos in zip(sample_req_ids[first:last], positions[first:last], strict=True):
                table = tables[req_id]
                slots.append(table[pos // bs] * bs + pos % bs)
                decode_tables += table[:num_blocks]
                if len(table) < num_blocks:
                    decode_tables += [_NULL] * (num_blocks - len(table))

        chunks: list[_Chunk] = []
        chunk_tables: list[int] = []
        sample_index: list[int] | None = None
        prompt_spans: list[tuple[sampling.SamplingState, int, int, int]] = []  # (state, offset, n, start)
        if num_decode < num_reqs:
            sample_index = list(range(num_decode))
            src = num_decode  # read position in token_ids (decode entries hold one token each)
            for i in range(num_decode, num_reqs):
                n, start, req_id = counts[i], starts[i], req_ids[i]
                end = start + n
                table = tables[req_id]
                offset = len(ids)
                chunk = _Chunk(offset=offset, num_tokens=n, start=start)
                chunks.append(chunk)
                ids.extend(token_ids[src : src + n])
                positions.extend(range(start, end))
                _extend_slots(slots, table, start, end, bs)
                if start:  # continues a sequence: attends over its blocks, not only its new keys
                    num_blocks = (end - 1) // bs + 1
                    chunk.key_len = num_blocks * bs
                    chunk_tables += table[:num_blocks]
                src += n
                state = states[req_id]
                if state.prompt_logprobs is not None and start < len(state.prompt_token_ids):
                    prompt_spans.append((state, offset, n, start))
                if do_sample[i]:
                    sample_index.append(offset + n - 1)
                    sample_req_ids.append(req_id)
                    sample_states.append(states[req_id])

        num_tokens = len(ids)
        packed = torch.tensor(ids + positions + slots + decode_tables + chunk_tables, dtype=torch.long)
        packed = packed.to(self.device, non_blocking=True)
        self._meta = self._make_meta(
            packed=packed,
            num_tokens=num_tokens,
            num_decode=num_decode,
            decode_groups=decode_groups,
            chunks=chunks,
        )
        started = time.perf_counter()
        try:
            hidden = self._forward(packed[:num_tokens], packed[num_tokens : 2 * num_tokens])
        finally:
            self._meta = None
        for state, offset, n, start in prompt_spans:  # only requests that asked for prompt logprobs
            state.add_prompt_logprobs(start, self._lm_head(hidden[offset : offset + n]))
        if sample_index is not None:
            hidden = hidden[sample_index]
        logits = self._lm_head(hidden)
        self.last_model_s = time.perf_counter() - started
        tokens, logprobs = sampling.sample(
            logits, sample_states, all_greedy=self._num_sampled == 0, any_special=self._num_special > 0
        )
        result = outputs.RunnerOutput(req_ids=sample_req_ids, sampled_token_ids=tokens, logprobs=logprobs)
        if prompt_spans:
            for req_id, state in zip(sample_req_ids, sample_states, strict=True):
                if state.prompt_logprobs is not None and not state.prompt_logprobs_sent:
                    state.prompt_logprobs_sent = True
                    result.prompt_logprobs[req_id] = state.prompt_logprobs
        return result

    def _make_meta(
        self,
        *,
        packed: torch.Tensor,
        num_tokens: int,
        num_decode: int,
        decode_groups: list[_DecodeGroup],
        chunks: list[_Chunk],
    ) -> _StepMeta:
        positions = packed[num_tokens : 2 * num_tokens]
        at = 3 * num_tokens
        write_index = None
        if self._kv:
            slots = packed[2 * num_tokens : at]
            # Row of (K or V, token t, KV head h) in the flat pool: (kv * kv_heads + h) * rows_per_head +
            # slot; the source is cat(k, v), whose rows are ordered (t, h), t-major, as the projections
            # lay them out in memory.
            write_index = (slots.view(1, -1, 1) + self._head_rows).reshape(-1)
            for group in decode_groups:
                size = group.rows * group.num_blocks
                tables = packed[at : at + size].view(1, group.rows, 1, group.num_blocks)
                group.gather = (tables + self._head_blocks).reshape(-1)  # (K or V, row, KV head, block)
                at += size
            for chunk in chunks:
                if chunk.key_len:
                    num_blocks = chunk.key_len // self.block_size
                    table = packed[at : at + num_blocks]
                    chunk.gather = (table + self._head_blocks.view(-1, 1)).reshape(-1)  # (K or V, KV head, block)
                    at += num_blocks
        return _StepMeta(
            num_decode=num_decode,
            decode_groups=decode_groups,
            decode_lens=positions[:num_decode] + 1,
            chunks=chunks,
            write_index=write_index,
        )

    # ----------------------------------------------------------------------------------------------
    # Attention (called by every layer during our forward)

    def attend(
        self,
        layer: int,
        q: torch.Tensor,  # [T, heads, head_dim]
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,
        *,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Store this step's keys and values for `layer` and attend; returns [T, heads, head_dim]."""
        meta = self._meta
        assert meta is not None, "attend() runs only inside a runner step"
        if self._layers_seen is not None:
            self._layers_seen.append(layer)
            self._shapes.append((k.shape[1], k.shape[2], k.dtype))
        head_dim = k.shape[-1]
        if meta.write_index is not None:
            self._kv_rows[layer].index_copy_(0, meta.write_index, torch.cat((k, v)).view(-1, head_dim))
        if sliding_window is not None and sliding_window >= self.max_model_len:
            sliding_window = None  # a window as long as the context is no window
        parts: list[torch.Tensor] = []
        for group in meta.decode_groups:
            parts.append(self._decode_attention(layer, q, meta, group, scaling=scaling, sliding_window=sliding_window))
        kv_heads = k.shape[1]
        grouped = q.shape[1] != kv_heads
        for chunk in meta.chunks:
            first, last = chunk.offset, chunk.offset + chunk.num_tokens
            if chunk.gather is None:  # a sequence's first chunk: its own keys are all it attends to
                keys = k[first:last].transpose(0, 1).unsqueeze(0)
                values = v[first:last].transpose(0, 1).unsqueeze(0)
            else:
                keys, values = self._kv_blocks[layer].index_select(0, chunk.gather).view(2, 1, kv_heads, -1, head_dim)
            mask = self._chunk_mask(chunk, sliding_window)
            out = F.scaled_dot_product_attention(
                q[first:last].transpose(0, 1).unsqueeze(0),
                keys,
                values,
                attn_mask=mask,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=grouped,
            )
            parts.append(out[0].transpose(0, 1))  # [n, heads, head_dim]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _decode_attention(
        self,
        layer: int,
        q: torch.Tensor,
        meta: _StepMeta,
        group: _DecodeGroup,
        *,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        first, rows, length = group.start, group.rows, group.num_blocks * self.block_size
        heads, head_dim = q.shape[1], q.shape[2]
        kv_heads = self._kv_heads
        assert group.gather is not None, "decodes need the pool"
        # One decode token per row: fold the query heads that share a KV head into the "query length"
        # dimension ([rows * kv_heads, group, head_dim], the order of the gathered blocks), so GQA needs
        # no repeat of K and V, and neither side a transpose.
        q = q[first : first + rows].reshape(rows * kv_heads, heads // kv_heads, head_dim)
        mask = group.masks.get(sliding_window)
        if mask is None:
            # Additive mask, made once per step, group and window and shared by all layers. Keys past a
            # row's length (the rest of its last block, null blocks) are masked.
            keys = self._arange[:length]
            lens = meta.decode_lens[first : first + rows].unsqueeze(1)
            invalid = keys >= lens
            if sliding_window is not None:
                invalid |= keys < lens - sliding_window
            mask = torch.zeros(invalid.shape, dtype=q.dtype, device=q.device).masked_fill_(invalid, float("-inf"))
            mask = mask.repeat_interleave(kv_heads, dim=0).unsqueeze(1)  # [rows * kv_heads, 1, length]
            group.masks[sliding_window] = mask
        keys_view, values_view = (
            self._kv_blocks[layer].index_select(0, group.gather).view(2, rows * kv_heads, length, head_dim)
        )
        # Three batched kernels instead of SDPA: for one query per row (tiny GEMMs, many of them) they
        # are faster on CPU, and the math is the same (softmax(q k^T * scale + mask) v).
        scores = torch.baddbmm(mask, q, keys_view.transpose(1, 2), alpha=scaling)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # fp32 softmax, as eager attention does
        if probs.dtype != values_view.dtype:
            probs = probs.to(values_view.dtype)
        return torch.bmm(probs, values_view).view(rows, heads, head_dim)

    def _chunk_mask(self, chunk: _Chunk, sliding_window: int | None) -> torch.Tensor | None:
        end = chunk.start + chunk.num_tokens
        if chunk.gather is None and (sliding_window is None or sliding_window >= end):
            return None  # its own keys from position 0: SDPA's is_causal
        if sliding_window in chunk.masks:
            return chunk.masks[sliding_window]
        q_pos = self._arange[chunk.start : end].unsqueeze(1)
        keys = self._arange[: chunk.key_len or end]
        mask = keys <= q_pos  # also masks the rest of the last block
        if sliding_window is not None:
            mask &= keys > q_pos - sliding_window
        chunk.masks[sliding_window] = mask
        return mask

    # ----------------------------------------------------------------------------------------------
    # Requests

    def _add(self, new: outputs.NewRequestData) -> None:
        if new.req_id in self._tables:
            raise ValueError(f"request {new.req_id!r} is already in the runner")
        self._tables[new.req_id] = list(new.block_ids)
        state = self._parked.pop(new.req_id, None)
        if state is None:
            state = sampling.SamplingState.from_params(
                new.sampling_params, fallback_rng=self._rng, prompt_token_ids=new.prompt_token_ids
            )
        if new.sampling_params.constraint is not None and state.grammar is None:
            # A parked state keeps its matcher: a preempted request recomputes the tokens it already took.
            state.grammar = self._grammar_cache().matcher(new.sampling_params.constraint)
        self._sampling[new.req_id] = state
        if not state.greedy:
            self._num_sampled += 1
        if state.special:
            self._num_special += 1

    def prepare_grammars(self) -> threading.Thread:
        """Make the grammar cache now and build its tokenizer tables in the background (see EngineConfig)."""
        return self._grammar_cache().prepare()

    def _grammar_cache(self) -> grammar_mod.GrammarCache:
        if self._grammars is None:
            from fleetlm_runtime.structured import grammar  # noqa: PLC0415 - xgrammar loads on first use

            loaded = self.loaded
            self._grammars = grammar.GrammarCache(
                loaded.tokenizer, vocab_size=loaded.vocab_size, stop_token_ids=sorted(loaded.eos_token_ids)
            )
        return self._grammars

    def prepare_grammar(self, constraint: Any) -> None:
        """Compile a request's grammar (or find it cached) before it is scheduled."""
        from fleetlm_runtime.structured import formats  # noqa: PLC0415

        try:
            self._grammar_cache().compile(constraint)
        except Exception as error:  # xgrammar's refusal (RuntimeError and kin), with its reason
            message = f"the schema cannot be compiled: {formats.library_reason(error)}"
            raise request_mod.InvalidParameterError("response_format", message) from None

    def take_grammar_compile_seconds(self) -> tuple[float, ...]:
        """Durations of the grammar compiles since the last call (the engine's stats carry them)."""
        return () if self._grammars is None else self._grammars.take_compile_seconds()

    def _free(self, req_ids: list[str], preempted: list[str] | None = None) -> None:
        for req_id in req_ids:
            if self._tables.pop(req_id, None) is None:
                self._parked.pop(req_id, None)  # a preempted request that ended while waiting
                continue  # never reached the runner (aborted while waiting) or already freed
            state = self._sampling.pop(req_id)
            if preempted and req_id in preempted:
                self._parked[req_id] = state
            if not state.greedy:
                self._num_sampled -= 1
            if state.special:
                self._num_special -= 1

    # ----------------------------------------------------------------------------------------------
    # The pool, sized and allocated once

    def _allocate_pool(self, budget: kv_budget.KVBudget, gpu_free: int | None) -> None:
        kv_heads, head_dim, dtype = self._shapes[0]
        if any(shape != self._shapes[0] for shape in self._shapes):
            raise UnsupportedModelError("layers with different KV head shapes are not supported by the engine")
        bs = self.block_size
        size = kv_budget.plan(
            budget,
            bytes_per_block=kv_budget.block_bytes(
                num_layers=self._num_layers,
                kv_heads=kv_heads,
                head_dim=head_dim,
                block_size=bs,
                dtype_bytes=torch.empty((), dtype=dtype).element_size(),
            ),
            gpu_free_for_kv=gpu_free,
        )
        total = size.num_blocks_with_null
        self._kv_heads, self._head_dim = kv_heads, head_dim
        for _ in range(self._num_layers):
            # zeros, not empty: the pages are touched now, so memory is taken at start (resident size stays
            # flat) and the null block reads as zeros.
            tensor = torch.zeros((2, kv_heads, total, bs, head_dim), dtype=dtype, device=self.device)
            self._kv.append(tensor)
            self._kv_rows.append(tensor.view(2 * kv_heads * total * bs, head_dim))
            self._kv_blocks.append(tensor.view(2 * kv_heads * total, bs * head_dim))
        self.num_blocks, self.budget_source = size.num_blocks, size.source
        heads = torch.arange(2 * kv_heads, device=self.device)  # K's heads, then V's
        self._head_rows = (heads * (total * bs)).view(2, 1, kv_heads)  # [2, 1, kv_heads]: + slot [1, T, 1]
        self._head_blocks = (heads * total).view(2, 1, kv_heads, 1)  # + block table [1, rows, 1, blocks]
        logger.info(
            "KV pool: %d blocks of %d tokens (%.1f MiB, sized by %s)",
            size.num_blocks,
            bs,
            self.pool_bytes / 2**20,
            size.source,
        )

    def _profile_gpu(self, budget: kv_budget.KVBudget, max_batch_tokens: int) -> int:
        """vLLM's sizing: run a forward of `max_batch_tokens` prompt tokens before the pool exists, and
        give the pool what `gpu_memory_utilization` of the device allows beyond the weights, that peak,
        and the memory outside torch's allocator (CUDA context, other processes: counted, to be safe)."""
        device = self.device
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        remaining = max_batch_tokens
        tokens: list[int] = []
        lengths: list[int] = []
        while remaining > 0:
            n = min(remaining, self.max_model_len - 1)
            lengths.append(n)
            tokens += [(i % (self.loaded.vocab_size - 1)) + 1 for i in range(n)]
            remaining -= n
        self._run_prompts(lengths, tokens)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        free, total = torch.cuda.mem_get_info(device)
        outside_torch = max(0, (total - free) - torch.cuda.memory_reserved(device))
        allowed = int(total * budget.gpu_memory_utilization) - peak - outside_torch
        torch.cuda.empty_cache()
        logger.info(
            "GPU: %.2f GiB total, peak %.2f GiB in torch (weights and activations), %.2f GiB outside torch; "
            "KV may use %.2f GiB",
            total / 2**30,
            peak / 2**30,
            outside_torch / 2**30,
            allowed / 2**30,
        )
        return max(0, allowed)

    def _run_prompts(self, lengths: list[int], tokens: list[int]) -> None:
        """One step prefilling fresh prompts of these lengths (probes and profiling), then forgetting them.
        Their blocks are 1, 2, ...: at start nothing else holds any, and they are written before read."""
        bs = self.block_size
        sched = outputs.SchedulerOutput.make_empty()
        next_block = 1
        for i, n in enumerate(lengths):
            req_id = f"__probe{i}__"
            num_blocks = -(-n // bs)
            blocks = tuple(range(next_block, next_block + num_blocks)) if self._kv else (1,) * num_blocks
            next_block += num_blocks
            sched.new_reqs.append(
                outputs.NewRequestData(
                    req_id=req_id,
                    prompt_token_ids=[],
                    sampling_params=request_mod.SamplingParams(max_tokens=1, temperature=0.0),
                    block_ids=blocks,
                )
            )
            sched.req_ids.append(req_id)
            sched.num_scheduled_tokens.append(n)
            sched.num_computed_tokens.append(0)
            sched.do_sample.append(False)
        sched.input_token_ids = tokens
        try:
            self.execute(sched)
        finally:
            self.free(list(sched.req_ids))

    def _probe(self) -> torch.Tensor:
        """Prefill a few fixed tokens; returns their final hidden states."""
        num = _PROBE_TOKENS
        if self._kv:
            num = min(num, self.num_blocks * self.block_size)
        tokens = [i % self.loaded.vocab_size for i in range(1, num + 1)]
        captured: list[torch.Tensor] = []
        forward = self._forward

        def capture(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            hidden = forward(input_ids, positions)
            captured.append(hidden)
            return hidden

        self._forward = capture  # type: ignore[assignment]
        try:
            self._run_prompts([num], tokens)
        finally:
            self._forward = forward
        return captured[0]

    def _check_module_path(self) -> int:
        """Every layer's attention must come through `attend`; a model that bypasses the interface
        would silently compute without the engine's KV. Returns the number of layers."""
        seen: list[int] = []
        self._layers_seen = seen
        try:
            self._reference_hidden = self._probe()
        finally:
            self._layers_seen = None
        expected = int(getattr(self.model.config, "num_hidden_layers", len(seen)))
        if seen != list(range(expected)):
            raise UnsupportedModelError(
                f"{type(self.model).__name__}: expected one attention call per layer for {expected} layers, "
                f"saw layers {seen}; this architecture does not route attention through the interface"
            )
        return expected

    def _try_fast_path(self) -> None:
        """Switch to the lean Llama-family forward if it reproduces the modules on the probe."""
        modules = self._forward
        self._forward = forward_mod.LlamaForward(self.model, self.attend, max_positions=self.max_model_len)
        fast = self._probe()
        reference = self._reference_hidden
        assert reference is not None
        scale = max(1.0, float(reference.abs().max()))
        tolerance = 1e-5 if reference.dtype == torch.float32 else 2e-2
        error = float((fast - reference).abs().max()) / scale
        if error > tolerance:
            logger.warning("fast forward differs from the modules by %.2e; using the modules", error)
            self._forward = modules


def _leading_decodes(counts: list[int], do_sample: list[bool]) -> int:
    for i, (n, sample) in enumerate(zip(counts, do_sample, strict=True)):
        if n != 1 or not sample:
            return i
    return len(counts)


def _extend_slots(slots: list[int], table: list[int], start: int, end: int, block_size: int) -> None:
    """Append the pool slots of positions start..end-1 of a sequence, one range per block."""
    first, last = start // block_size, (end - 1) // block_size
    for index in range(first, last + 1):
        base = table[index] * block_size
        low = start - index * block_size if index == first else 0
        high = end - index * block_size if index == last else block_size
        slots.extend(range(base + low, base + high))
