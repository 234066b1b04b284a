"""Executes one scheduled step on the model (torch + transformers): KV buffers, attention, sampling.

Design (the fastest exact one we measured on CPU; `fleetlm-dev bench engine` prints the figures):

* **Packed tokens, one forward per step.** Every scheduled token of every request (decodes and prefill
  chunks) goes into a single `[1, T]` row with explicit `position_ids`, so the linear layers see exactly
  the tokens that need computing: no padding, and a prefill chunk costs no more than its tokens.
* **Our attention inside the model's forward** (`engine/forward.py`: the model's own modules, or a lean
  Llama-family path over the same weights). `attend` writes the new keys and values straight into
  per-slot KV buffers (`index_copy_`, no per-step concatenation of the cache) and computes attention per
  group: all single-token (decode) queries together (one batched matmul, softmax, matmul over
  contiguous slots), each prefill chunk in its own causal SDPA call. Sliding-window layers get their
  window in the mask, so they are exact.
* **Slot buffers kept compact.** Each running request owns a slot (a row of every layer's KV buffer).
  Slots `0..N-1` are always the live ones: when a request leaves, the last slot moves into its hole
  (one copy of that request's KV), so decode attention reads a plain slice `K[:N, :, :L]` without any
  gather. Buffers grow geometrically in length and in slots, and shrink when the longest request goes.
* **Prefix cache copies.** The scheduler decides which full prompt blocks are cached or evicted
  (`caches/prefix_cache.py`); the runner keeps a copy of each cached block's KV for every layer, copies
  the blocks of a hit into a new request's slot before the forward, copies newly completed blocks out of
  the slots after it, and drops evicted ones. A hit thus costs one copy instead of a prefill.
* **Preemption.** A preempted request's slot is freed like a finished one's, but its sampling state is
  parked until it returns, so a seeded stream continues where it stopped.
* **Sampling per batch.** One argmax for greedy batches, vectorised top-k/top-p otherwise
  (`engine/sampling.py`), one `.tolist()` per step.

This module must never decide *what* runs (the scheduler does) nor touch request lifecycles.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fleetlm_runtime.engine import forward as forward_mod
from fleetlm_runtime.engine import outputs, sampling
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import loader

logger = logging.getLogger(__name__)

_MIN_LEN = 128  # smallest per-slot KV length allocated
_MIN_SLOTS = 8
_PROBE_TOKENS = 8


class UnsupportedModelError(loader.ModelLoadError):
    pass


@dataclass(slots=True)
class _Chunk:
    """A multi-token span of one request in this step (a prompt chunk)."""

    offset: int  # index of its first token in the packed row
    num_tokens: int
    slot: int
    start: int  # position of its first token
    masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)  # by sliding window


@dataclass(slots=True)
class _StepMeta:
    """Everything the attention function needs, computed once per step and shared by all layers."""

    position_ids: torch.Tensor  # [T]
    slot_ids: torch.Tensor  # [T]
    num_decode: int  # single-token queries, packed first, in slot order
    decode_rows: int  # rows of the decode attention batch (num_decode, or N when slots are not a prefix)
    decode_len: int  # keys read by decode attention
    decode_slots: torch.Tensor | None  # None when decode slots are exactly 0..num_decode-1
    decode_lens: torch.Tensor  # [decode_rows] valid keys per row, including the new token
    chunks: list[_Chunk]
    decode_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # by sliding window
    write_index: torch.Tensor | None = None  # [T * kv_heads], made by the first layer (see _write_index)


class ModelRunner:
    def __init__(
        self,
        *,
        loaded: loader.LoadedModel,
        max_model_len: int,
        seed: int = 0,
        fast_path: bool = True,
        prefix_cache_block_size: int = 16,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.max_model_len = max_model_len
        self._lm_head = self.model.get_output_embeddings()
        self._rng = random.Random(seed)
        self.model.set_attn_implementation(forward_mod.ATTN_IMPLEMENTATION)
        if self.model.config._attn_implementation != forward_mod.ATTN_IMPLEMENTATION:
            raise UnsupportedModelError(
                f"{type(self.model).__name__} does not route attention through transformers' AttentionInterface"
            )
        # Request state, by slot. Slots 0..num_slots-1 are live.
        self._slot_of: dict[str, int] = {}
        self._req_of_slot: list[str] = []
        self._slot_len: list[int] = []  # tokens with KV in each live slot
        self._sampling: list[sampling.SamplingState] = []
        self._num_sampled = 0  # live requests that are not greedy
        self._parked: dict[str, sampling.SamplingState] = {}  # preempted requests' sampling streams
        # Prefix cache: block hash -> (K, V) of that block for every layer, each [layers, kv_heads, block, dim].
        self._prefix_blocks: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self._block_size = prefix_cache_block_size
        # KV buffers, one pair per layer: [slot_capacity, kv_heads, len_capacity, head_dim].
        self._k: list[torch.Tensor] = []
        self._v: list[torch.Tensor] = []
        self._k_flat: list[torch.Tensor] = []  # views [slots * kv_heads * len, head_dim] for index_copy_
        self._v_flat: list[torch.Tensor] = []
        self._slot_capacity = _MIN_SLOTS
        self._len_capacity = min(_MIN_LEN, max_model_len)
        self._kv_heads = 0
        self._head_dim = 0
        self._meta: _StepMeta | None = None
        self._arange = torch.arange(max_model_len, device=self.device)
        self._head_offsets = self._arange[:0]  # h * len_capacity for each KV head h (see _write_index)
        self._layers_seen: list[int] | None = None  # attend() records layers while this is a list
        self._reference_hidden: torch.Tensor | None = None
        self.last_model_s = 0.0  # time in the model (forward and output head) during the last step
        self._forward: forward_mod.Forward = forward_mod.ModuleForward(self.model, self.attend)
        self._num_layers = self._check_module_path()
        if fast_path and forward_mod.LlamaForward.supports(self.model) is None:
            self._try_fast_path()

    @property
    def forward_name(self) -> str:
        """Which forward runs: "modules" (the model's own) or "llama-fast"."""
        return self._forward.name

    # ----------------------------------------------------------------------------------------------
    # Public surface

    @property
    def num_slots(self) -> int:
        return len(self._req_of_slot)

    @property
    def kv_buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    @property
    def num_layers(self) -> int:
        return self._num_layers

    @property
    def num_prefix_blocks(self) -> int:
        return len(self._prefix_blocks)

    @property
    def prefix_cache_bytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self._prefix_blocks.values())

    def clear_prefix_cache(self) -> None:
        self._prefix_blocks.clear()

    def close(self) -> None:
        """Drop the KV buffers. The model keeps the engine's attention implementation: other runners may
        share the model, and outside a runner step it is exactly transformers' SDPA."""
        self._k, self._v, self._k_flat, self._v_flat = [], [], [], []
        self._slot_of.clear()
        self._req_of_slot.clear()
        self._slot_len.clear()
        self._sampling.clear()
        self._parked.clear()
        self._prefix_blocks.clear()

    def execute(self, sched: outputs.SchedulerOutput) -> outputs.RunnerOutput:
        with torch.inference_mode():
            if sched.finished_req_ids:
                self._free(sched.finished_req_ids, preempted=sched.preempted_req_ids)
            for new in sched.new_reqs:
                self._add(new)
            if not sched.req_ids:
                result = outputs.RunnerOutput(req_ids=[], sampled_token_ids=[])
            else:
                result = self._execute(sched)
            if sched.prefix_cache_saves:
                self._save_blocks(sched.prefix_cache_saves)
            for block_hash in sched.prefix_cache_evicted:
                self._prefix_blocks.pop(block_hash, None)
            return result

    # ----------------------------------------------------------------------------------------------
    # The step

    def _execute(self, sched: outputs.SchedulerOutput) -> outputs.RunnerOutput:
        req_ids = sched.req_ids
        num_reqs = len(req_ids)
        counts = sched.num_scheduled_tokens
        starts = sched.num_computed_tokens
        token_ids = sched.input_token_ids
        slot_of = self._slot_of
        slot_len = self._slot_len

        # Single-token sampled entries come first (the scheduler's decode pass): the decode group. The
        # first test is the common all-decode step, answered without a Python loop over the requests.
        do_sample = sched.do_sample
        pure_decode = len(token_ids) == num_reqs and all(do_sample)
        num_decode = num_reqs if pure_decode else _leading_decodes(counts, do_sample)
        dec_slots = [slot_of[r] for r in req_ids[:num_decode]]
        order = sorted(range(num_decode), key=dec_slots.__getitem__)
        dec_slots = [dec_slots[i] for i in order]
        ids = [token_ids[i] for i in order]
        positions = [starts[i] for i in order]
        slots = dec_slots.copy()
        sample_req_ids = [req_ids[i] for i in order]
        sample_states = [self._sampling[s] for s in dec_slots]
        for slot, pos in zip(dec_slots, positions, strict=True):
            slot_len[slot] = pos + 1
        decode_len = needed_len = max(positions) + 1 if positions else 0

        chunks: list[_Chunk] = []
        sample_index: list[int] | None = None
        if num_decode < num_reqs:
            sample_index = list(range(num_decode))
            src = num_decode  # read position in token_ids (decode entries hold one token each)
            for i in range(num_decode, num_reqs):
                n, start, slot = counts[i], starts[i], slot_of[req_ids[i]]
                offset = len(ids)
                chunks.append(_Chunk(offset=offset, num_tokens=n, slot=slot, start=start))
                ids.extend(token_ids[src : src + n])
                positions.extend(range(start, start + n))
                slots.extend([slot] * n)
                src += n
                slot_len[slot] = start + n
                needed_len = max(needed_len, start + n)
                if do_sample[i]:
                    sample_index.append(offset + n - 1)
                    sample_req_ids.append(req_ids[i])
                    sample_states.append(self._sampling[slot])
        if needed_len > self._len_capacity:
            self._grow_len(needed_len)

        packed = torch.tensor([ids, positions, slots], dtype=torch.long).to(self.device, non_blocking=True)
        position_ids = packed[1]
        self._meta = self._make_meta(
            position_ids=position_ids,
            slot_ids=packed[2],
            num_decode=num_decode,
            decode_len=decode_len,
            dec_slots=dec_slots,
            chunks=chunks,
        )
        started = time.perf_counter()
        try:
            hidden = self._forward(packed[0], position_ids)
        finally:
            self._meta = None
        if sample_index is not None:
            hidden = hidden[sample_index]
        logits = self._lm_head(hidden)
        self.last_model_s = time.perf_counter() - started
        tokens = sampling.sample(logits, sample_states, all_greedy=self._num_sampled == 0)
        return outputs.RunnerOutput(req_ids=sample_req_ids, sampled_token_ids=tokens)

    def _make_meta(
        self,
        *,
        position_ids: torch.Tensor,
        slot_ids: torch.Tensor,
        num_decode: int,
        decode_len: int,
        dec_slots: list[int],
        chunks: list[_Chunk],
    ) -> _StepMeta:
        decode_slots: torch.Tensor | None = None
        decode_rows = num_decode
        if num_decode:
            lens = position_ids[:num_decode] + 1
            if dec_slots[-1] != num_decode - 1:  # sorted and distinct, so this means "not 0..n-1"
                decode_rows = self.num_slots
                decode_slots = slot_ids[:num_decode]
                # Rows that do not decode this step attend to key 0 only: finite, and discarded.
                full = torch.ones(decode_rows, dtype=lens.dtype, device=self.device)
                lens = full.index_copy_(0, decode_slots, lens)
        else:
            lens = position_ids[:0]
        return _StepMeta(
            position_ids=position_ids,
            slot_ids=slot_ids,
            num_decode=num_decode,
            decode_rows=decode_rows,
            decode_len=decode_len,
            decode_slots=decode_slots,
            decode_lens=lens,
            chunks=chunks,
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
        if layer >= len(self._k):
            self._allocate_layer(layer, k)
        meta = self._meta
        assert meta is not None, "attend() runs only inside a runner step"
        if self._layers_seen is not None:
            self._layers_seen.append(layer)
        head_dim = k.shape[-1]
        write_index = meta.write_index if meta.write_index is not None else self._write_index(meta)
        self._k_flat[layer].index_copy_(0, write_index, k.reshape(-1, head_dim))
        self._v_flat[layer].index_copy_(0, write_index, v.reshape(-1, head_dim))
        if sliding_window is not None and sliding_window >= self.max_model_len:
            sliding_window = None  # a window as long as the context is no window
        parts: list[torch.Tensor] = []
        if meta.num_decode:
            parts.append(self._decode_attention(layer, q, meta, scaling, sliding_window))
        k_layer, v_layer = self._k[layer], self._v[layer]
        grouped = q.shape[1] != k_layer.shape[1]
        for chunk in meta.chunks:
            end = chunk.start + chunk.num_tokens
            mask = self._chunk_mask(chunk, sliding_window)
            out = F.scaled_dot_product_attention(
                q[chunk.offset : chunk.offset + chunk.num_tokens].transpose(0, 1).unsqueeze(0),
                k_layer[chunk.slot : chunk.slot + 1, :, :end],
                v_layer[chunk.slot : chunk.slot + 1, :, :end],
                attn_mask=mask,
                is_causal=mask is None,
                scale=scaling,
                enable_gqa=grouped,
            )
            parts.append(out[0].transpose(0, 1))  # [n, heads, head_dim]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _write_index(self, meta: _StepMeta) -> torch.Tensor:
        # Row of (token t, KV head h) in a flat buffer: (slot * kv_heads + h) * length + position. Source
        # rows are ordered (t, h), t-major, which is how the k/v projections lay them out in memory.
        kv_heads, length = self._kv_heads, self._len_capacity
        base = meta.slot_ids * (kv_heads * length) + meta.position_ids
        meta.write_index = (base.unsqueeze(1) + self._head_offsets).reshape(-1)
        return meta.write_index

    def _decode_attention(
        self,
        layer: int,
        q: torch.Tensor,
        meta: _StepMeta,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        num_decode, rows, length = meta.num_decode, meta.decode_rows, meta.decode_len
        heads, head_dim = q.shape[1], q.shape[2]
        kv_heads = self._kv_heads
        group = heads // kv_heads
        # One decode token per row: fold the query heads that share a KV head into the "query length"
        # dimension ([rows * kv_heads, group, head_dim]), so GQA needs no repeat of K and V.
        q = q[:num_decode].reshape(num_decode, kv_heads, group, head_dim)
        if meta.decode_slots is not None:
            q = q.new_zeros(rows, kv_heads, group, head_dim).index_copy_(0, meta.decode_slots, q)
        mask = meta.decode_masks.get(sliding_window)
        if mask is None:
            # Additive mask, made once per step and window and shared by all layers.
            keys = self._arange[:length]
            lens = meta.decode_lens.unsqueeze(1)
            invalid = keys >= lens
            if sliding_window is not None:
                invalid |= keys < lens - sliding_window
            mask = torch.zeros(invalid.shape, dtype=q.dtype, device=q.device).masked_fill_(invalid, float("-inf"))
            mask = mask.repeat_interleave(kv_heads, dim=0).unsqueeze(1)  # [rows * kv_heads, 1, length]
            meta.decode_masks[sliding_window] = mask
        # Three batched kernels instead of SDPA: for one query per row (tiny GEMMs, many of them) they
        # are 10-15% faster on CPU, and the math is the same (softmax(q k^T * scale + mask) v).
        keys_view = self._k[layer][:rows, :, :length].reshape(rows * kv_heads, length, head_dim)
        values_view = self._v[layer][:rows, :, :length].reshape(rows * kv_heads, length, head_dim)
        scores = torch.baddbmm(
            mask, q.reshape(rows * kv_heads, group, head_dim), keys_view.transpose(1, 2), alpha=scaling
        )
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)  # fp32 softmax, as eager attention does
        if probs.dtype != values_view.dtype:
            probs = probs.to(values_view.dtype)
        out = torch.bmm(probs, values_view).view(rows, kv_heads, group, head_dim)
        if meta.decode_slots is not None:
            out = out.index_select(0, meta.decode_slots)
        return out.reshape(num_decode, heads, head_dim)

    def _chunk_mask(self, chunk: _Chunk, sliding_window: int | None) -> torch.Tensor | None:
        end = chunk.start + chunk.num_tokens
        if chunk.start == 0 and (sliding_window is None or sliding_window >= end):
            return None  # plain causal square: SDPA's is_causal
        if sliding_window in chunk.masks:
            return chunk.masks[sliding_window]
        q_pos = self._arange[chunk.start : end].unsqueeze(1)
        keys = self._arange[:end]
        mask = keys <= q_pos
        if sliding_window is not None:
            mask &= keys > q_pos - sliding_window
        chunk.masks[sliding_window] = mask
        return mask

    # ----------------------------------------------------------------------------------------------
    # Slots and buffers

    def _add(self, new: outputs.NewRequestData) -> None:
        if new.req_id in self._slot_of:
            raise ValueError(f"request {new.req_id!r} already has a KV slot")
        slot = self.num_slots
        if slot >= self._slot_capacity:
            self._grow_slots(slot + 1)
        self._slot_of[new.req_id] = slot
        self._req_of_slot.append(new.req_id)
        self._slot_len.append(0)
        state = self._parked.pop(new.req_id, None)
        if state is None:
            state = sampling.SamplingState.from_params(new.sampling_params, fallback_rng=self._rng)
        self._sampling.append(state)
        if not state.greedy:
            self._num_sampled += 1
        if new.cached_block_hashes:
            self._load_blocks(slot, new.cached_block_hashes)

    def _load_blocks(self, slot: int, hashes: tuple[bytes, ...]) -> None:
        """Copy the KV of cached prefix blocks into positions 0.. of `slot` (a prefix-cache hit)."""
        blocks = [self._prefix_blocks[h] for h in hashes]  # KeyError: the scheduler's index disagrees
        length = len(hashes) * self._block_size
        if length > self._len_capacity:
            self._grow_len(length)
        keys = torch.cat([k for k, _ in blocks], dim=2) if len(blocks) > 1 else blocks[0][0]
        values = torch.cat([v for _, v in blocks], dim=2) if len(blocks) > 1 else blocks[0][1]
        for layer, (k_buf, v_buf) in enumerate(zip(self._k, self._v, strict=True)):
            k_buf[slot, :, :length].copy_(keys[layer])
            v_buf[slot, :, :length].copy_(values[layer])
        self._slot_len[slot] = length

    def _save_blocks(self, saves: list[tuple[str, int, bytes]]) -> None:
        """Copy newly cached full blocks out of their requests' slots (after the forward wrote them)."""
        size = self._block_size
        for req_id, index, block_hash in saves:
            slot = self._slot_of[req_id]
            start, end = index * size, (index + 1) * size
            self._prefix_blocks[block_hash] = (
                torch.stack([buf[slot, :, start:end] for buf in self._k]),
                torch.stack([buf[slot, :, start:end] for buf in self._v]),
            )

    def free(self, req_ids: list[str], preempted: list[str] | None = None) -> None:
        """Release the slots (and so the KV) of these requests now; unknown ids are ignored. Those also
        in `preempted` keep their sampling state for their return."""
        with torch.inference_mode():  # the buffers are inference tensors
            self._free(req_ids, preempted)

    def _free(self, req_ids: list[str], preempted: list[str] | None = None) -> None:
        for req_id in req_ids:
            slot = self._slot_of.pop(req_id, None)
            if slot is None:
                self._parked.pop(req_id, None)  # a preempted request that ended while waiting
                continue  # never reached the runner (aborted while waiting) or already freed
            if preempted and req_id in preempted:
                self._parked[req_id] = self._sampling[slot]
            if not self._sampling[slot].greedy:
                self._num_sampled -= 1
            last = self.num_slots - 1
            if slot != last:
                # Keep slots compact: the last request moves into the hole, KV and all.
                length = self._slot_len[last]
                for buffers in (self._k, self._v):
                    for buf in buffers:
                        buf[slot, :, :length].copy_(buf[last, :, :length])
                moved = self._req_of_slot[last]
                self._slot_of[moved] = slot
                self._req_of_slot[slot] = moved
                self._slot_len[slot] = length
                self._sampling[slot] = self._sampling[last]
            self._req_of_slot.pop()
            self._slot_len.pop()
            self._sampling.pop()
        self._maybe_shrink()

    def _allocate_layer(self, layer: int, key: torch.Tensor) -> None:
        if layer != len(self._k):
            raise UnsupportedModelError("attention layers were called out of order")
        kv_heads, head_dim = key.shape[1], key.shape[2]
        if self._k and (kv_heads, head_dim) != (self._kv_heads, self._head_dim):
            raise UnsupportedModelError("layers with different KV head shapes are not supported by the engine")
        self._kv_heads, self._head_dim = kv_heads, head_dim
        self._head_offsets = torch.arange(kv_heads, device=self.device) * self._len_capacity
        shape = (self._slot_capacity, kv_heads, self._len_capacity, head_dim)
        for buffers, flats in ((self._k, self._k_flat), (self._v, self._v_flat)):
            buf = torch.zeros(shape, dtype=key.dtype, device=key.device)
            buffers.append(buf)
            flats.append(buf.view(-1, head_dim))
        if not self._k_flat[layer].is_contiguous():
            raise AssertionError("KV buffers must be contiguous")

    def _reallocate(self, *, slots: int, length: int) -> None:
        keep_slots = self.num_slots
        keep_len = min(length, self._len_capacity)
        for buffers, flats in ((self._k, self._k_flat), (self._v, self._v_flat)):
            for i, old in enumerate(buffers):
                new = torch.zeros((slots, self._kv_heads, length, self._head_dim), dtype=old.dtype, device=old.device)
                new[:keep_slots, :, :keep_len].copy_(old[:keep_slots, :, :keep_len])
                buffers[i] = new
                flats[i] = new.view(-1, self._head_dim)
        self._slot_capacity, self._len_capacity = slots, length
        self._head_offsets = torch.arange(self._kv_heads, device=self.device) * length

    def _grow_slots(self, needed: int) -> None:
        self._reallocate(slots=max(needed, 2 * self._slot_capacity), length=self._len_capacity)

    def _grow_len(self, needed: int) -> None:
        # Doubling keeps the copies amortised: a request growing to L tokens costs O(L) copies in total.
        self._reallocate(slots=self._slot_capacity, length=self._fit_len(max(needed, 2 * self._len_capacity)))

    def _fit_len(self, needed: int) -> int:
        return min(self.max_model_len, max(_MIN_LEN, 1 << math.ceil(math.log2(max(needed, 1)))))

    def _maybe_shrink(self) -> None:
        # Give memory back when the longest (or most) requests have gone. Shrinking at 4x and growing at
        # 2x leaves a band in which a request coming and going does not reallocate every time.
        longest = max(self._slot_len, default=0)
        length = self._len_capacity
        if length > _MIN_LEN and length >= 4 * max(longest, 1):
            length = self._fit_len(2 * longest)
        slots = self._slot_capacity
        if slots > _MIN_SLOTS and slots >= 4 * self.num_slots:
            slots = max(_MIN_SLOTS, 2 * self.num_slots)
        if (slots, length) != (self._slot_capacity, self._len_capacity) and self._k:
            self._reallocate(slots=slots, length=length)

    def _probe(self) -> torch.Tensor:
        """Prefill a few fixed tokens on a scratch slot; returns their final hidden states."""
        tokens = [i % self.loaded.vocab_size for i in range(1, _PROBE_TOKENS + 1)]
        probe = outputs.NewRequestData(
            req_id="__probe__",
            prompt_token_ids=tokens,
            sampling_params=request_mod.SamplingParams(max_tokens=1, temperature=0.0),
            max_num_tokens=len(tokens) + 1,
        )
        sched = outputs.SchedulerOutput(
            new_reqs=[probe],
            req_ids=["__probe__"],
            num_scheduled_tokens=[len(tokens)],
            num_computed_tokens=[0],
            do_sample=[False],
            input_token_ids=tokens,
            finished_req_ids=[],
        )
        captured: list[torch.Tensor] = []
        forward = self._forward

        def capture(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            hidden = forward(input_ids, positions)
            captured.append(hidden)
            return hidden

        self._forward = capture  # type: ignore[assignment]
        try:
            self.execute(sched)
        finally:
            self._forward = forward
            self.free(["__probe__"])
        return captured[0]

    def _check_module_path(self) -> int:
        """Every layer's attention must come through `attend`; a model that bypasses the interface
        would silently compute without the engine's KV. Returns the number of layers."""
        self._layers_seen = seen = []
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
