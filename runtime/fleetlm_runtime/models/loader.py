"""Load a causal LM and its tokenizer once per process: a built-in model or a local safetensors directory.

A model spec is `builtin:tiny`, `builtin:small` or a filesystem path (a local checkout or a mounted PVC).
Loading never touches the network (`local_files_only`) and never unpickles (only safetensors are read).

A local checkpoint is loaded straight onto the target device with no second copy in host memory: the model
is built on the device with uninitialised parameters (nothing is computed or touched), then every tensor
is copied out of the memory-mapped safetensors file into its parameter, converting the dtype in the same
copy, a chunk at a time, and the mapped pages are dropped at once (see safetensors_io). The host peak is
the model plus one 16 MB chunk on the CPU, one chunk on a GPU; `fleetlm-dev bench load` measures it
against `from_pretrained`.

Architectures are checked before the weights are read: the engine replaces the attention function and
keeps its own KV buffers, which is exact only for decoder-only models whose attention layers are full or
sliding-window softmax attention called through transformers' `AttentionInterface`; anything else is
refused here with a message that says why.

This module must never import the engine or the server; the engine asks it for a `LoadedModel`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import threading

import torch
import transformers
from transformers import initialization as hf_init

from fleetlm_runtime.models import builtin, host_memory, safetensors_io
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
    weight_bytes: int = 0  # bytes of the parameters as loaded (tied weights once), on `device`

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


SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The safetensors files of a checkpoint directory: the shards its index names, or the single file."""
    if not path.is_dir():
        raise ModelLoadError(f"model path {str(path)!r} is not a directory (expected a local safetensors checkout)")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{index} has no readable weight_map") from None
        files = [path / name for name in names]
        absent = [str(f.name) for f in files if not f.is_file() or f.parent != path]
        if absent or not files:
            raise ModelLoadError(f"{index} names shards that are not in {str(path)!r}: {absent}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    raise ModelLoadError(
        f"no safetensors weights ({SINGLE_FILE} or {INDEX_FILE}) in {str(path)!r}; only safetensors checkpoints "
        "are loaded"
    )


def _target_name(
    key: str, targets: dict[str, torch.Tensor], prefix: str, ignored: list[re.Pattern[str]], model_class: str
) -> str | None:
    """The model's name for a checkpoint key; None for keys the model class says to ignore."""
    if key in targets:
        return key
    if prefix and f"{prefix}.{key}" in targets:  # checkpoints saved from the base model (GPT-2's "h.0...")
        return f"{prefix}.{key}"
    if any(p.search(key) for p in ignored):
        return None
    raise ModelLoadError(f"checkpoint tensor {key!r} matches no parameter of {model_class} (wrong config.json?)")


def _load_weights(model: transformers.PreTrainedModel, files: list[pathlib.Path]) -> None:
    """Copy every checkpoint tensor into its (uninitialised) parameter, then check that none is left out."""
    buffers = dict(model.named_buffers(remove_duplicate=False))
    persistent = {name for name in buffers if name.rsplit(".", 1)[-1] not in _non_persistent(model, name)}
    targets = dict(model.named_parameters(remove_duplicate=False)) | {n: buffers[n] for n in persistent}
    prefix = getattr(model, "base_model_prefix", "") or ""
    ignored = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    # Buffers old checkpoints saved that the model now computes at build (rotary frequencies, GPT-2 masks).
    ignored += [re.compile(r"rotary_emb\.inv_freq$"), re.compile(r"attn\.masked_bias$")]
    filled: set[int] = set()
    for path in files:
        with safetensors_io.mapped(path) as mapped:
            for info in mapped.tensors:
                name = _target_name(info.name, targets, prefix, ignored, type(model).__name__)
                if name is None:
                    continue
                target = targets[name]
                if tuple(target.shape) != info.shape:
                    raise ModelLoadError(
                        f"{path.name}: tensor {info.name!r} has shape {list(info.shape)}, the model expects "
                        f"{list(target.shape)} (does config.json belong to these weights?)"
                    )
                mapped.copy_into(info, target)
                filled.add(id(target))
    missing = sorted(name for name, tensor in targets.items() if id(tensor) not in filled)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"the checkpoint lacks {len(missing)} tensors the model needs: {shown}")


def _non_persistent(model: torch.nn.Module, buffer_name: str) -> set[str]:
    owner = model.get_submodule(buffer_name.rpartition(".")[0]) if "." in buffer_name else model
    return set(getattr(owner, "_non_persistent_buffers_set", ()))


def _generation_config(path: pathlib.Path, config: transformers.PretrainedConfig) -> transformers.GenerationConfig:
    """The checkpoint's generation_config.json (its EOS ids are what generate() stops on), else the config's."""
    if (path / transformers.utils.GENERATION_CONFIG_NAME).is_file():
        return transformers.GenerationConfig.from_pretrained(path, local_files_only=True)
    return transformers.GenerationConfig.from_model_config(config)


def _load_local(
    path: pathlib.Path, dtype: torch.dtype, device: torch.device
) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    files = checkpoint_files(path)
    config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
    check_architecture(config)
    # Parameters are allocated on the device and left uninitialised (no random init, no touched pages);
    # buffers computed from the config (rotary frequencies) are made there too. no_init_weights patches
    # torch's init functions for the duration: the caller holds the load lock.
    with torch.device(device), hf_init.no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.tie_weights()  # one tensor for tied embeddings before loading, so it is filled once
    _load_weights(model, files)
    model.generation_config = _generation_config(path, config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def _weight_bytes(model: torch.nn.Module) -> int:
    unique = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(unique.values())


_LOCK = threading.Lock()


@functools.cache
def _load_cached(spec: str, dtype: torch.dtype, device: str) -> LoadedModel:
    torch_device = torch.device(device)
    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    if builtin.is_builtin(spec):
        model, tokenizer = builtin.build(spec.removeprefix(builtin.BUILTIN_PREFIX), dtype=dtype)
    else:
        model, tokenizer = _load_local(pathlib.Path(spec).expanduser(), dtype, torch_device)
    check_architecture(model.config)
    # transformers wraps `to` in functools.wraps(nn.Module.to), whose typed signature keeps the unbound self.
    model.to(device=torch_device).eval()  # type: ignore[call-arg]
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
        weight_bytes=_weight_bytes(model),
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
    with _LOCK, host_memory.load_phase():  # two concurrent first calls must not load twice
        loaded = _load_cached(spec, resolved, str(torch_device))
    if max_model_len is None:
        return loaded
    # A shorter context is metadata on the same weights, never a second load.
    return dataclasses.replace(loaded, max_model_len=_max_model_len(loaded.model.config, max_model_len))
