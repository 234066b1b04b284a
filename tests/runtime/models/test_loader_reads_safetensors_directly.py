"""The loader's own safetensors path: checkpoints laid out as the hub's are (GPT-2 without its base-model
prefix, old mask buffers, a tied head left out, an index over shards) load exactly, and broken ones are
refused with a message that names the tensor or the file."""

from __future__ import annotations

import json
import pathlib

import pytest
import safetensors.torch
import torch
import transformers

from fleetlm_runtime.models import builtin, loader

VOCAB = len(builtin.build_tokenizer())


def _gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return transformers.GPT2LMHeadModel(config).eval()


def _write(directory: pathlib.Path, model: transformers.PreTrainedModel, tensors: dict[str, torch.Tensor]) -> None:
    model.config.save_pretrained(directory)
    builtin.build_tokenizer().save_pretrained(directory)
    safetensors.torch.save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_a_gpt2_checkpoint_in_the_hubs_layout_loads_exactly(tmp_path: pathlib.Path) -> None:
    reference = _gpt2()
    # As openai-community/gpt2 is stored: base-model keys ("h.0..."), causal-mask buffers, no lm_head.
    tensors = {
        k.removeprefix("transformer."): v.clone() for k, v in reference.state_dict().items() if k != "lm_head.weight"
    }
    for layer in range(2):
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))
    _write(tmp_path, reference, tensors)
    loaded = loader.load(str(tmp_path), dtype="float32")
    got = loaded.model.state_dict()
    assert got.keys() == reference.state_dict().keys()
    assert all(torch.equal(got[k], v) for k, v in reference.state_dict().items())
    assert loaded.weight_bytes == sum(p.numel() * 4 for p in reference.parameters())  # tied head counted once


def test_dtype_conversion_happens_in_the_copy(tmp_path: pathlib.Path) -> None:
    reference = _gpt2()
    reference.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards and an index
    builtin.build_tokenizer().save_pretrained(tmp_path)
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    loaded = loader.load(str(tmp_path), dtype="bfloat16")
    for name, tensor in loaded.model.state_dict().items():
        assert tensor.dtype is torch.bfloat16
        assert torch.equal(tensor, reference.state_dict()[name].to(torch.bfloat16)), name


def test_broken_checkpoints_are_refused_naming_what_is_wrong(tmp_path: pathlib.Path) -> None:
    reference = _gpt2()
    state = {k: v.clone() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    cases = {
        "shape": ({**state, "transformer.wpe.weight": torch.zeros(64, 32)}, r"'transformer.wpe.weight' has shape"),
        "missing": ({k: v for k, v in state.items() if k != "transformer.ln_f.bias"}, r"lacks 1 tensors.*ln_f.bias"),
        "stranger": ({**state, "transformer.extra.weight": torch.zeros(2)}, r"'transformer.extra.weight' matches no"),
    }
    for case, (tensors, message) in cases.items():
        directory = tmp_path / case
        _write(directory, reference, tensors)
        with pytest.raises(loader.ModelLoadError, match=message):
            loader.load(str(directory))
    index_dir = tmp_path / "index"
    reference.save_pretrained(index_dir, max_shard_size="100KB")
    shard = sorted(index_dir.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(loader.ModelLoadError, match=shard.name):
        loader.load(str(index_dir))
    garbage = tmp_path / "garbage"
    _write(garbage, reference, state)
    (garbage / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(loader.ModelLoadError, match="not a safetensors file"):
        loader.load(str(garbage))
    index = json.loads((index_dir / "model.safetensors.index.json").read_text())
    assert shard.name in index["weight_map"].values()
