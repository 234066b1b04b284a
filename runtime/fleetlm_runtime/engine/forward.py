"""Model forwards over a packed row of tokens, with the runner's attention in place of the model's.

Two implementations of one contract, `forward(input_ids [T], positions [T]) -> final hidden states [T, H]`:

* `ModuleForward` runs the model's own transformers modules. Their attention implementation is set to
  the function registered below, which hands query/key/value to the runner's `attend` callback. It works
  for every architecture `models.loader` accepts and is the reference path.
* `LlamaForward` is the same computation for the Llama family (Llama, Mistral, Qwen2, Qwen3) written as
  plain tensor calls on the model's own weights: no module dispatch, q/k/v and gate/up projections fused
  into one matmul each (the modules' weights become views of the fused tensors, so no memory is
  duplicated), and RoPE read from a table. On CPU, where a small model's forward is mostly per-op
  Python overhead, it halves the forward. It mirrors the modules' arithmetic operation for operation, and
  `ModelRunner` checks it against `ModuleForward` on a probe before trusting it.

When no runner is attending in the calling thread, the registered attention delegates to transformers'
own SDPA attention and mask, so `model.generate()` on the same model object behaves exactly as stock.
This module must never schedule, sample or own KV memory; the `attend` callback does the KV part.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "fleetlm"


class AttendFn(Protocol):
    """The runner's attention: stores k/v for `layer` and returns the attention output [T, heads, head_dim]."""

    def __call__(
        self,
        layer: int,
        q: torch.Tensor,  # [T, heads, head_dim]
        k: torch.Tensor,  # [T, kv_heads, head_dim]
        v: torch.Tensor,  # [T, kv_heads, head_dim]
        *,
        scaling: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...


_ACTIVE = threading.local()  # .attend: the callback of the runner whose forward runs in this thread

# RoPE variants whose cos/sin depend on the position only. Dynamic variants rescale with the longest
# sequence in the batch, which is wrong for a batch of unrelated requests; the loader refuses them.
STATIC_ROPE_TYPES = frozenset({"default", "linear", "llama3", "yarn"})
_LLAMA_FAMILY_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})

# A transformers model reaches its submodules, weights and config through attributes that torch types as
# `Tensor | Module` (nn.Module.__getattr__), so this module reads them as `Any`: the layout is checked at
# run time instead, by `LlamaForward.supports` and by the runner's probe against the reference path.
HFModule = Any


def _attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    attend: AttendFn | None = getattr(_ACTIVE, "attend", None)
    if attend is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)  # type: ignore[arg-type]
    for name in ("s_aux", "softcap", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention with {name} is not supported by the FleetLM engine")
    scaling = kwargs.get("scaling")
    window = kwargs.get("sliding_window")
    out = attend(
        int(module.layer_idx),  # type: ignore[arg-type]
        query[0].transpose(0, 1),
        key[0].transpose(0, 1),
        value[0].transpose(0, 1),
        scaling=float(scaling) if scaling is not None else query.shape[-1] ** -0.5,  # type: ignore[arg-type]
        sliding_window=int(window) if window is not None else None,  # type: ignore[call-overload]
    )
    return out.unsqueeze(0), None  # [1, T, heads, head_dim]


AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
# Callers other than the engine get the stock SDPA mask. The engine passes a 4D placeholder mask, which
# transformers returns as-is, so no mask is ever built during an engine step.
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


class Forward(Protocol):
    name: str

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...


class ModuleForward:
    """The model's own modules; attention goes to `attend` through the registered implementation."""

    name = "modules"

    def __init__(self, model: transformers.PreTrainedModel, attend: AttendFn) -> None:
        self._base: HFModule = model.base_model
        self._attend = attend
        self._placeholder_mask = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=model.device)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        _ACTIVE.attend = self._attend
        try:
            out = self._base(
                input_ids=input_ids.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                attention_mask=self._placeholder_mask,
                use_cache=False,
            )
        finally:
            _ACTIVE.attend = None
        return out.last_hidden_state[0]  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True, slots=True)
class _Layer:
    """One decoder layer's weights as the fast path reads them (the fused ones are views, see `_fuse_linears`)."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    eps: float
    q_norm: torch.Tensor | None  # Qwen3 normalises q and k per head; the others do not
    k_norm: torch.Tensor | None
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up: torch.Tensor
    gate_up_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    mlp_act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float
    sliding_window: int | None


class LlamaForward:
    """Llama-family decoder layers as plain tensor calls (see the module docstring)."""

    name = "llama-fast"

    def __init__(self, model: transformers.PreTrainedModel, attend: AttendFn, *, max_positions: int) -> None:
        base: HFModule = model.base_model
        config: HFModule = model.config
        self._attend = attend
        self._embed = base.embed_tokens.weight
        self._norm = base.norm.weight
        self._norm_eps = float(base.norm.variance_epsilon)
        first = base.layers[0].self_attn
        self._heads = int(config.num_attention_heads)
        self._kv_heads = int(config.num_key_value_heads)
        self._head_dim = int(first.head_dim)
        self._dtype = self._embed.dtype
        self._layers = [self._fuse(layer, config) for layer in base.layers[: config.num_hidden_layers]]
        # cos/sin for every position, from the model's own rotary module: its output depends on the
        # position only (static RoPE), so a row of this table equals what the module computes for it.
        with torch.inference_mode():
            positions = torch.arange(max_positions, device=self._embed.device).unsqueeze(0)
            probe = torch.zeros(1, dtype=self._dtype, device=self._embed.device)
            cos, sin = base.rotary_emb(probe, positions)
        self._cos = cos[0].unsqueeze(1)  # [positions, 1, head_dim], broadcast over heads
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated), exactly: IEEE
        # multiplication is sign-symmetric. One roll replaces slice, slice, neg and cat.
        half = self._head_dim // 2
        self._sin_signed = sin[0].unsqueeze(1).clone()
        self._sin_signed[..., :half] = -self._sin_signed[..., :half]

    @staticmethod
    def supports(model: transformers.PreTrainedModel) -> str | None:
        """None if the fast path applies to `model`, else the reason it does not."""
        config: HFModule = model.config
        if config.model_type not in ("llama", "mistral", "qwen2", "qwen3"):
            return f"model_type {config.model_type!r} has no fast path"
        base: HFModule = model.base_model
        rope_type = getattr(getattr(base, "rotary_emb", None), "rope_type", None)
        if rope_type not in STATIC_ROPE_TYPES:
            return f"rope type {rope_type!r} is not static"
        if getattr(config, "pretraining_tp", 1) not in (1, None):
            return "pretraining_tp > 1"
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = [layer.input_layernorm, layer.post_attention_layernorm]
            norms += [n for n in (getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)) if n is not None]
            if any(type(n).__name__ not in _LLAMA_FAMILY_NORMS for n in norms):
                return "unexpected normalisation layers"
            if not all(hasattr(mlp, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
                return "unexpected MLP layout"
        return None

    def _fuse(self, layer: HFModule, config: object) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, qkv_bias = _fuse_linears(attn, "qkv", [attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up, gate_up_bias = _fuse_linears(mlp, "gate_up", [mlp.gate_proj, mlp.up_proj])
        # Qwen2/Qwen3 set a per-layer window; Mistral reads it from the config in forward().
        window = getattr(attn, "sliding_window", None)
        if window is None and getattr(config, "model_type", "") == "mistral":
            window = getattr(config, "sliding_window", None)
        return _Layer(
            input_norm=layer.input_layernorm.weight,
            post_norm=layer.post_attention_layernorm.weight,
            eps=float(layer.input_layernorm.variance_epsilon),
            q_norm=attn.q_norm.weight if getattr(attn, "q_norm", None) is not None else None,
            k_norm=attn.k_norm.weight if getattr(attn, "k_norm", None) is not None else None,
            qkv=qkv,
            qkv_bias=qkv_bias,
            gate_up=gate_up,
            gate_up_bias=gate_up_bias,
            o=attn.o_proj.weight,
            o_bias=attn.o_proj.bias,
            down=mlp.down_proj.weight,
            down_bias=mlp.down_proj.bias,
            mlp_act=mlp.act_fn,
            scaling=float(attn.scaling),
            sliding_window=int(window) if window is not None else None,
        )

    def _rms(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        # The modules' arithmetic (LlamaRMSNorm.forward): fp32 statistics, cast back, then weight. In fp32
        # torch's rms_norm is that same sequence in one call (bit-identical; the runner's probe checks).
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        num_tokens = input_ids.shape[0]
        heads, kv_heads, head_dim = self._heads, self._kv_heads, self._head_dim
        q_end, k_end = heads, heads + kv_heads
        half = head_dim // 2
        cos, sin = self._cos.index_select(0, positions), self._sin_signed.index_select(0, positions)
        hidden = F.embedding(input_ids, self._embed)
        for index, layer in enumerate(self._layers):
            x = self._rms(hidden, layer.input_norm, layer.eps)
            qkv = F.linear(x, layer.qkv, layer.qkv_bias).view(num_tokens, heads + 2 * kv_heads, head_dim)
            v = qkv[:, k_end:]
            # apply_rotary_pos_emb: x * cos + rotate_half(x) * sin, on q and k together when possible
            if layer.q_norm is None and layer.k_norm is None:
                qk = qkv[:, :k_end]
                qk = qk * cos + torch.roll(qk, half, dims=-1) * sin
                q, k = qk[:, :q_end], qk[:, q_end:]
            else:
                q, k = qkv[:, :q_end], qkv[:, q_end:k_end]
                if layer.q_norm is not None:
                    q = self._rms(q, layer.q_norm, layer.eps)
                if layer.k_norm is not None:
                    k = self._rms(k, layer.k_norm, layer.eps)
                q = q * cos + torch.roll(q, half, dims=-1) * sin
                k = k * cos + torch.roll(k, half, dims=-1) * sin
            attn = self._attend(index, q, k, v, scaling=layer.scaling, sliding_window=layer.sliding_window)
            hidden = hidden + F.linear(attn.reshape(num_tokens, heads * head_dim), layer.o, layer.o_bias)
            x = self._rms(hidden, layer.post_norm, layer.eps)
            gate, up = F.linear(x, layer.gate_up, layer.gate_up_bias).chunk(2, dim=-1)
            hidden = hidden + F.linear(layer.mlp_act(gate) * up, layer.down, layer.down_bias)
        return self._rms(hidden, self._norm, self._norm_eps)


def _fuse_linears(
    owner: torch.nn.Module, name: str, linears: list[torch.nn.Linear]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight for several linears on the same input; the modules' weights become views of it.

    The result is remembered on `owner`, so a second runner on the same model reuses it instead of
    fusing (and so copying) the weights again."""
    attribute = f"_fleetlm_fused_{name}"
    cached: tuple[torch.Tensor, torch.Tensor | None] | None = getattr(owner, attribute, None)
    if cached is not None and all(
        lin.weight.untyped_storage().data_ptr() == cached[0].untyped_storage().data_ptr() for lin in linears
    ):
        return cached
    with torch.no_grad():
        weight = torch.cat([lin.weight for lin in linears])
        biases = [lin.bias for lin in linears]
        bias = torch.cat([b for b in biases if b is not None]) if all(b is not None for b in biases) else None
        if any(b is not None for b in biases) and bias is None:
            raise ValueError("some but not all fused projections have a bias")
        row = 0
        for lin in linears:
            rows = lin.weight.shape[0]
            lin.weight = torch.nn.Parameter(weight[row : row + rows], requires_grad=False)
            if bias is not None:
                lin.bias = torch.nn.Parameter(bias[row : row + rows], requires_grad=False)
            row += rows
    # Stored with object.__setattr__: a plain attribute, not a registered parameter or buffer.
    object.__setattr__(owner, attribute, (weight, bias))
    return weight, bias


def build(model: transformers.PreTrainedModel, attend: AttendFn, *, max_positions: int, fast: bool) -> Forward:
    """The fast path when asked for and applicable, else the modules (the caller checks agreement)."""
    if fast and LlamaForward.supports(model) is None:
        return LlamaForward(model, attend, max_positions=max_positions)
    return ModuleForward(model, attend)
