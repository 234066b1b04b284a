"""Loading causal LMs saved as safetensors in a directory, per family, and serving them exactly."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import pytest
import torch
import transformers

from fleetlm_runtime.engine import config as config_mod
from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.models import builtin, loader

VOCAB = len(builtin.build_tokenizer())
COMMON = {"vocab_size": VOCAB, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}
LLAMA_LIKE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}

FAMILIES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, **LLAMA_LIKE),
    "mistral": lambda: transformers.MistralConfig(**COMMON, **LLAMA_LIKE, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, **LLAMA_LIKE),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, **LLAMA_LIKE, head_dim=8),
    "gpt2": lambda: transformers.GPT2Config(**COMMON, n_embd=32, n_layer=2, n_head=4, n_positions=256),
}


def save_checkpoint(directory: pathlib.Path, config: transformers.PretrainedConfig) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model.save_pretrained(directory, safe_serialization=True)
    builtin.build_tokenizer().save_pretrained(directory)
    return model


def serve(engine: core.EngineCore, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    for i, prompt in enumerate(prompts):
        engine.add_request(
            engine.make_request(
                req_id=str(i),
                prompt_token_ids=prompt,
                sampling_params=request_mod.SamplingParams(max_tokens=max_tokens, temperature=0.0),
            )
        )
    got: list[list[int]] = [[] for _ in prompts]
    while engine.has_unfinished_requests():
        for out in engine.step()[0]:
            got[int(out.req_id)].extend(out.new_token_ids)
    return got


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_saved_checkpoint_loads_and_serves_like_generate(
    family: str,
    tmp_path: pathlib.Path,
    generate_greedy: Callable[..., list[int]],
    random_prompts: Callable[..., list[list[int]]],
) -> None:
    reference = save_checkpoint(tmp_path, FAMILIES[family]())
    loaded = loader.load(str(tmp_path), dtype="float32")
    assert loaded.model.config.model_type == family and loaded.max_model_len == 256
    assert loaded.tokenizer("hello").input_ids == builtin.build_tokenizer()("hello").input_ids
    assert loader.load(str(tmp_path / ".." / tmp_path.name)) is loaded  # loaded once per process
    engine = core.EngineCore(config_mod.EngineConfig(max_batch_size=8, max_batch_tokens=32), loaded=loaded)
    assert engine.runner.forward_name == ("modules" if family == "gpt2" else "llama-fast")
    prompts = random_prompts(8, vocab_size=VOCAB, seed=4, max_len=60)
    got = serve(engine, prompts, 16)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == generate_greedy(reference, prompt, 16)
    engine.close()


def test_dtype_is_selectable(tmp_path: pathlib.Path) -> None:
    save_checkpoint(tmp_path, FAMILIES["llama"]())
    loaded = loader.load(str(tmp_path), dtype="bfloat16")
    assert loaded.dtype is torch.bfloat16 and next(loaded.model.parameters()).dtype is torch.bfloat16
    engine = core.EngineCore(config_mod.EngineConfig(), loaded=loaded)
    assert len(serve(engine, [[5, 6, 7]], 4)[0]) >= 1
    engine.close()
    assert loader.resolve_dtype("auto", torch.device("cpu")) is torch.float32


def test_pickled_checkpoints_and_missing_directories_are_refused(tmp_path: pathlib.Path) -> None:
    model = transformers.LlamaForCausalLM(FAMILIES["llama"]())
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: never loaded
    with pytest.raises(loader.ModelLoadError, match="safetensors"):
        loader.load(str(tmp_path))
    with pytest.raises(loader.ModelLoadError, match="not a directory"):
        loader.load(str(tmp_path / "missing"))
    with pytest.raises(loader.ModelLoadError, match="dtype"):
        loader.load("builtin:tiny", dtype="float8")
