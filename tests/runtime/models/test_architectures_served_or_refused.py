"""Sliding-window and hybrid attention are served exactly; what the engine cannot reproduce is refused."""

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
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "eos_token_id": 2,
    "bos_token_id": 0,
}


def saved(
    tmp_path: pathlib.Path, config: transformers.PretrainedConfig, attn: str = "sdpa"
) -> transformers.PreTrainedModel:
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    model.save_pretrained(tmp_path)
    builtin.build_tokenizer().save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize(
    "config",
    [
        transformers.MistralConfig(**SMALL, sliding_window=8),
        # Qwen2 hybrid: layer 0 full attention, layer 1 a 6-token window.
        transformers.Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=6, max_window_layers=1),
    ],
    ids=["mistral-window-8", "qwen2-hybrid-window-6"],
)
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "modules"])
def test_sliding_window_layers_are_served_exactly(
    config: transformers.PretrainedConfig,
    fast_path: bool,
    tmp_path: pathlib.Path,
    generate_greedy: Callable[..., list[int]],
    random_prompts: Callable[..., list[list[int]]],
) -> None:
    reference = saved(tmp_path, config)
    engine = core.EngineCore(
        config_mod.EngineConfig(max_batch_size=8, max_batch_tokens=16, fast_path=fast_path),
        loaded=loader.load(str(tmp_path)),
    )
    prompts = random_prompts(6, vocab_size=VOCAB, seed=9, min_len=10, max_len=40)  # longer than the window
    for i, prompt in enumerate(prompts):
        engine.add_request(
            engine.make_request(
                req_id=str(i),
                prompt_token_ids=prompt,
                sampling_params=request_mod.SamplingParams(max_tokens=20, temperature=0.0),
            )
        )
    got: list[list[int]] = [[] for _ in prompts]
    while engine.has_unfinished_requests():
        for out in engine.step()[0]:
            got[int(out.req_id)].extend(out.new_token_ids)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == generate_greedy(reference, prompt, 20)
    engine.close()


def test_unsupported_model_types_are_refused_by_name(tmp_path: pathlib.Path) -> None:
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    saved(tmp_path, config, attn="eager")  # gemma2: logit soft-capping and hybrid windows
    with pytest.raises(loader.ModelLoadError, match="model_type 'gemma2' is not supported"):
        loader.load(str(tmp_path))


def test_dynamic_rope_is_refused_with_the_reason() -> None:
    config = transformers.LlamaConfig(**SMALL, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(loader.ModelLoadError, match="rope_type 'dynamic'"):
        loader.check_architecture(config)


def test_linear_or_chunked_attention_layers_are_refused() -> None:
    config = transformers.Qwen2Config(**SMALL)
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(loader.ModelLoadError, match="linear_attention"):
        loader.check_architecture(config)


def test_builtin_models_are_deterministic_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, tok_a = builtin.build("tiny")
    assert torch.equal(torch.rand(1), expected_next)
    second, tok_b = builtin.build("tiny")
    assert tok_a.get_vocab() == tok_b.get_vocab()
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with pytest.raises(ValueError, match="unknown built-in model"):
        builtin.build("huge")
