"""A real pretrained instruct model (SmolLM2-135M-Instruct) served through the real server and the official
`openai` client: greedy chat completions equal `model.generate()` on the chat-templated prompt, whether
sent together or streamed, and the model's real knowledge comes through."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
import torch
import transformers

from fleetlm_dev import checkpoints

pytestmark = pytest.mark.slow

MAX_TOKENS = 16
TOPICS = [
    "What is the capital of Italy?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "What is 7 times 8?",
    "Give me a synonym for happy.",
    "Why is the sky blue? One sentence.",
    "Translate 'good morning' into Spanish.",
    "List two uses of copper.",
    "What does a CPU do?",
    "Suggest a name for a black cat.",
    "How many legs does a spider have?",
    "What is the boiling point of water in Celsius?",
]


def conversations() -> list[list[dict[str, str]]]:
    """16 conversations: plain questions, with and without a system message, and multi-turn ones."""
    convs: list[list[dict[str, str]]] = [[{"role": "user", "content": q}] for q in TOPICS[:8]]
    convs += [
        [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": q}] for q in TOPICS[8:]
    ]
    convs += [
        [
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a fun fact about octopuses."},
        ],
        [
            {"role": "user", "content": "I like tea."},
            {"role": "assistant", "content": "Tea is lovely."},
            {"role": "user", "content": "Which kind should I try next?"},
        ],
        [
            {"role": "system", "content": "You are a maths tutor."},
            {"role": "user", "content": "What is a prime?"},
            {"role": "assistant", "content": "A number with exactly two divisors."},
            {"role": "user", "content": "Is 9 prime?"},
        ],
        [{"role": "user", "content": "Write one sentence about autumn leaves."}],
    ]
    assert len(convs) == 16
    return convs


def reference(
    model: transformers.PreTrainedModel, tokenizer: transformers.PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], str]:
    """generate(do_sample=False) on the chat-templated prompt, alone; the tokens and their text."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, do_sample=False, max_new_tokens=MAX_TOKENS)
    tokens = out[0, ids["input_ids"].shape[1] :].tolist()
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


async def chat(client: openai.AsyncOpenAI, messages: list[dict[str, str]], *, stream: bool = False) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": "smollm2-135m-instruct",
        "messages": messages,
        "temperature": 0.0,
        "max_tokens": MAX_TOKENS,
    }
    if not stream:
        reply = await client.chat.completions.create(**kwargs)
        return {
            "text": reply.choices[0].message.content,
            "finish": reply.choices[0].finish_reason,
            "tokens": reply.usage.completion_tokens,
        }
    chunks = await client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    text, finish, tokens = "", None, None
    async for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"text": text, "finish": finish, "tokens": tokens}


async def test_sixteen_concurrent_chats_equal_generate_and_streaming_equals_plain(
    real_client: openai.AsyncOpenAI,
    real_model: transformers.PreTrainedModel,
    real_tokenizer: transformers.PreTrainedTokenizerBase,
) -> None:
    convs = conversations()
    served = await asyncio.gather(*(chat(real_client, c) for c in convs))  # all 16 in flight at once
    streamed = await asyncio.gather(*(chat(real_client, c, stream=True) for c in convs[:4]))
    eos = set(
        real_model.generation_config.eos_token_id
        if isinstance(real_model.generation_config.eos_token_id, list)
        else [real_model.generation_config.eos_token_id]
    )
    for messages, got in zip(convs, served, strict=True):
        tokens, text = reference(real_model, real_tokenizer, messages)
        stopped = bool(tokens) and tokens[-1] in eos
        # Same text, same number of tokens, same reason to stop: the same token sequence.
        assert got == {"text": text, "finish": "stop" if stopped else "length", "tokens": len(tokens)}, messages
    assert any(g["finish"] == "length" for g in served) and any(g["finish"] == "stop" for g in served)
    assert streamed == served[:4]


async def test_a_factual_question_gets_the_models_real_answer(real_client: openai.AsyncOpenAI) -> None:
    got = await chat(real_client, [{"role": "user", "content": "What is the capital of France?"}])
    assert "Paris" in got["text"] and got["finish"] == "stop", got  # stopped on the checkpoint's own EOS


def test_tokenizer_template_and_eos_ids_come_from_the_checkpoint(real_checkpoint: checkpoints.Checkpoint) -> None:
    from fleetlm_runtime.models import loader

    loaded = loader.load(str(real_checkpoint.single), dtype="float32")
    generation = json.loads((real_checkpoint.single / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert loaded.eos_token_ids == frozenset(eos if isinstance(eos, list) else [eos]) == {2}
    assert loaded.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    assert loaded.tokenizer.chat_template == (real_checkpoint.single / "chat_template.jinja").read_text()
    assert loaded.weight_bytes == real_checkpoint.weight_bytes  # fp32 on disk, fp32 loaded, tied head once
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight


def test_the_sharded_copy_loads_the_same_weights(real_checkpoint: checkpoints.Checkpoint) -> None:
    from fleetlm_runtime.models import loader

    index = json.loads((real_checkpoint.sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # really sharded
    single = loader.load(str(real_checkpoint.single), dtype="float32").model.state_dict()
    sharded = loader.load(str(real_checkpoint.sharded), dtype="float32").model.state_dict()
    assert single.keys() == sharded.keys()
    assert all(torch.equal(single[k], sharded[k]) for k in single)
