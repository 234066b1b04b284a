"""Load a causal LM and its tokenizer once per process: a built-in model or a local safetensors directory.

A model spec is `builtin:tiny`, `builtin:small` or a filesystem path (a local checkout or a mounted PVC).
Loading never touches the network (`local_files_only`) and never unpickles (`use_safetensors=True`
refuses `.bin` checkpoints). Architectures are checked before the weights are read: the engine replaces
the attention function and keeps its own KV buffers, which is exact only for decoder-only models whose
attention layers are full or sliding-window softmax attention called through transformers'
`AttentionInterface`; anything else is refused here with a message that says why.

This module must never import the engine or the server; the engine asks it for a `LoadedModel`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import threading

import torch
import transformers

from fleetlm_runtime.models import builtin
from fleetlm_runtime.models.errors import ModelLoadError

# Families whose attention the engine reproduces exactly (tested in tests/runtime/models). Each calls the
# registered attention function with (query, key, value, mask, scaling[, sliding_window]) only.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
SUPPORTED_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
DYNAMIC_ROPE_TYPES = frozenset({"dynamic", "longrope"})

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclasses.dataclass(frozen=True, slots=True)
class LoadedModel:
    spec: str  # what the user asked for ("builtin:tiny" or the path)
    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    dtype: torch.dtype
    device: torch.device
    max_model_len: int  # context length in tokens (prompt + output)
    vocab_size: int  # rows of the output head (ids the model can emit)
    eos_token_ids: frozenset[int]  # from the generation config: what generate() stops on

    @property
    def model_id(self) -> str:
        return self.spec


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` is fp32 on CPU (half precision is slow and inexact there) and bf16 on GPUs that have it."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


def check_architecture(config: transformers.PretrainedConfig) -> None:
    """Refuse configs whose layers the engine's KV handling does not reproduce exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelLoadError(
            f"model_type {model_type!r} is not supported by the FleetLM engine: it keeps its own KV buffers "
            f"and attention, which are exact only for {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "add_cross_attention", False):
        raise ModelLoadError("encoder-decoder and cross-attention models are not supported by the engine")
    layer_types = getattr(config, "layer_types", None) or ()
    unknown = sorted(set(layer_types) - SUPPORTED_LAYER_TYPES)
    if unknown:
        raise ModelLoadError(
            f"layer types {unknown} (hybrid, linear or chunked attention) are not supported by the engine's "
            f"KV handling; only {sorted(SUPPORTED_LAYER_TYPES)} layers are"
        )
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type") if isinstance(rope, dict) else None
    if rope_type in DYNAMIC_ROPE_TYPES:
        raise ModelLoadError(
            f"rope_type {rope_type!r} rescales positions by the longest sequence in a batch, which is wrong "
            "for a batch of unrelated requests; the engine does not serve it"
        )
    for name in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, name, None):
            raise ModelLoadError(f"{name} is not supported by the engine's attention")


def _max_model_len(config: transformers.PretrainedConfig, override: int | None) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit < 2:
        raise ModelLoadError("the config has no usable max_position_embeddings (context length)")
    if override is None:
        return limit
    if not 2 <= override <= limit:
        raise ModelLoadError(f"max_model_len must be in [2, {limit}] for this model, got {override}")
    return override


def _eos_token_ids(model: transformers.PreTrainedModel) -> frozenset[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _load_local(
    path: pathlib.Path, dtype: torch.dtype
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory (expected a local safetensors checkout)")
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(f"no *.safetensors weights in {str(path)!r}; only safetensors checkpoints are loaded")
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    check_architecture(config)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, local_files_only=True, use_safetensors=True, attn_implementation="sdpa"
    )
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


_LOCK = threading.Lock()


@functools.cache
def _load_cached(spec: str, dtype: torch.dtype, device: str) -> LoadedModel:
    torch_device = torch.device(device)
    if builtin.is_builtin(spec):
        model, tokenizer = builtin.build(spec.removeprefix(builtin.BUILTIN_PREFIX), dtype=dtype)
    else:
        model, tokenizer = _load_local(pathlib.Path(spec).expanduser(), dtype)
    check_architecture(model.config)
    model.to(device=torch_device).eval()
    model.requires_grad_(False)
    return LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        device=torch_device,
        max_model_len=_max_model_len(model.config, None),
        vocab_size=int(model.get_output_embeddings().weight.shape[0]),
        eos_token_ids=_eos_token_ids(model),
    )


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: the first CUDA device when torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load(
    spec: str = "builtin:tiny",
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    max_model_len: int | None = None,
) -> LoadedModel:
    """The model for `spec`, loaded on the first call and shared afterwards (one load per process)."""
    torch_device = resolve_device(device)
    resolved = resolve_dtype(dtype, torch_device)
    if not builtin.is_builtin(spec):
        spec = str(pathlib.Path(spec).expanduser().resolve())  # one load whatever the spelling
    with _LOCK:  # two concurrent first calls must not load twice
        loaded = _load_cached(spec, resolved, str(torch_device))
    if max_model_len is None:
        return loaded
    # A shorter context is metadata on the same weights, never a second load.
    return dataclasses.replace(loaded, max_model_len=_max_model_len(loaded.model.config, max_model_len))
