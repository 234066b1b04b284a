"""Sampling parameters and stop conditions, through the engine core on the tiny model."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
import torch

from fleetlm_runtime.engine import core, sampling
from fleetlm_runtime.engine import request as request_mod

Params = request_mod.SamplingParams


def run(engine: core.EngineCore, jobs: dict[str, tuple[list[int], Params]]) -> dict[str, tuple[list[int], str, object]]:
    """Submit all jobs at once, step to completion; returns req_id -> (tokens, text, last output)."""
    for req_id, (prompt, params) in jobs.items():
        engine.add_request(engine.make_request(req_id=req_id, prompt_token_ids=prompt, sampling_params=params))
    results: dict[str, tuple[list[int], str, object]] = {req_id: ([], "", None) for req_id in jobs}
    while engine.has_unfinished_requests():
        for out in engine.step()[0]:
            tokens, text, _ = results[out.req_id]
            results[out.req_id] = (tokens + out.new_token_ids, text + out.text, out)
    return results


PROMPT = [11, 22, 33, 44, 55, 66, 77]


def test_a_seed_reproduces_a_request_whatever_shares_its_batch(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core(max_batch_size=8, max_batch_tokens=128)
    seeded = Params(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    alone = run(engine, {"a": (PROMPT, seeded)})["a"][0]
    crowd = {f"n{i}": ([i + 1] * (i + 3), Params(max_tokens=30, temperature=0.9, ignore_eos=True)) for i in range(5)}
    crowd["a"] = (PROMPT, seeded)
    crowd["b"] = (PROMPT, Params(max_tokens=24, temperature=1.0, seed=99, ignore_eos=True))
    together = run(engine, crowd)
    assert together["a"][0] == alone
    assert together["b"][0] != alone  # another seed, another sample (24 tokens at T=1: no coincidence)
    greedy = run(engine, {"g": (PROMPT, Params(max_tokens=24, temperature=0.0, ignore_eos=True))})["g"][0]
    assert alone != greedy  # it really sampled


@pytest.mark.parametrize(
    "params",
    [
        Params(max_tokens=20, temperature=0.0),
        Params(max_tokens=20, temperature=1.3, top_k=1),
        Params(max_tokens=20, temperature=0.8, top_p=1e-6, seed=5),
    ],
    ids=["temperature-0", "top_k-1", "tiny-top_p"],
)
def test_degenerate_sampling_equals_greedy(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
    params: Params,
) -> None:
    engine = make_core()
    got = run(engine, {"x": (PROMPT, params)})["x"][0]
    assert got == generate_greedy(reference_model, PROMPT, 20)


def test_sampler_respects_top_k_and_top_p_on_known_logits() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    draws: dict[str, set[int]] = {"k2": set(), "p": set(), "free": set()}
    states = {
        "k2": sampling.SamplingState(greedy=False, temperature=1.0, top_p=1.0, top_k=2, rng=_rng(1)),
        # probabilities 0.64, 0.23, 0.09, ...: top_p=0.8 keeps exactly the first two
        "p": sampling.SamplingState(greedy=False, temperature=1.0, top_p=0.8, top_k=0, rng=_rng(2)),
        "free": sampling.SamplingState(greedy=False, temperature=5.0, top_p=1.0, top_k=0, rng=_rng(3)),
    }
    for _ in range(400):
        tokens, _ = sampling.sample(logits, list(states.values()), all_greedy=False)
        for name, token in zip(states, tokens, strict=True):
            draws[name].add(token)
    assert draws["k2"] == {0, 1}
    assert draws["p"] == {0, 1}
    assert draws["free"] == {0, 1, 2, 3, 4, 5}  # a high temperature flattens: every token shows up


def test_sampler_follows_the_softmax_distribution() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    state = sampling.SamplingState(greedy=False, temperature=1.0, top_p=1.0, top_k=0, rng=_rng(7))
    counts = [0, 0, 0]
    for _ in range(6000):
        counts[sampling.sample(logits, [state], all_greedy=False)[0][0]] += 1
    expected = torch.softmax(logits[0], -1).tolist()
    for count, p in zip(counts, expected, strict=True):
        assert abs(count / 6000 - p) < 0.025


def _rng(seed: int) -> random.Random:
    return random.Random(seed)


def test_stop_token_ids_and_max_tokens(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core()
    free = run(engine, {"free": (PROMPT, Params(max_tokens=12, temperature=0.0, ignore_eos=True))})["free"][0]
    stop_at = free[5]
    out = run(
        engine, {"s": (PROMPT, Params(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_at,)))}
    )
    tokens, _, last = out["s"]
    assert tokens == free[: free.index(stop_at) + 1]
    assert (last.finish_reason, last.stop_reason) == (request_mod.FinishReason.STOP, stop_at)  # type: ignore[attr-defined]
    tokens, _, last = run(engine, {"m": (PROMPT, Params(max_tokens=3, temperature=0.0, ignore_eos=True))})["m"]
    assert len(tokens) == 3 and last.finish_reason is request_mod.FinishReason.LENGTH  # type: ignore[attr-defined]


def test_ignore_eos_generates_past_the_eos_token(
    make_core: Callable[..., core.EngineCore], random_prompts: Callable[..., list[list[int]]]
) -> None:
    engine = make_core(max_batch_size=32, max_batch_tokens=2048)
    eos = engine.loaded.eos_token_ids
    prompts = random_prompts(60, vocab_size=engine.loaded.vocab_size, seed=3, max_len=40)
    jobs = {f"p{i}": (p, Params(max_tokens=48, temperature=0.0)) for i, p in enumerate(prompts)}
    stopped = [k for k, (tokens, _, last) in run(engine, jobs).items() if tokens[-1] in eos]
    assert stopped, "some greedy prompt must reach EOS for this test to mean anything"
    req = stopped[0]
    prompt = jobs[req][0]
    tokens, _, last = run(engine, {"i": (prompt, Params(max_tokens=48, temperature=0.0, ignore_eos=True))})["i"]
    assert len(tokens) == 48 and last.finish_reason is request_mod.FinishReason.LENGTH  # type: ignore[attr-defined]
    assert any(t in eos for t in tokens[:-1])


def test_stop_strings_cut_the_text_and_end_the_request(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core()
    prompt = engine.tokenizer("The quick brown fox").input_ids
    _, full_text, _ = run(engine, {"f": (prompt, Params(max_tokens=40, temperature=0.0, ignore_eos=True))})["f"]
    assert len(full_text) > 30
    stop = full_text[10:14]
    cut = full_text.index(stop)
    tokens, text, last = run(
        engine, {"s": (prompt, Params(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop, "never-there")))}
    )["s"]
    assert text == full_text[:cut]
    assert (last.finish_reason, last.stop_reason) == (request_mod.FinishReason.STOP, stop)  # type: ignore[attr-defined]
    assert len(tokens) < 40 and engine.kv_usage == 0.0
    _, text, _ = run(
        engine,
        {
            "i": (
                prompt,
                Params(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,), include_stop_str_in_output=True),
            )
        },
    )["i"]
    assert text == full_text[: cut + len(stop)]


def test_streamed_text_never_shows_a_stop_string_prefix_that_is_then_cut(
    make_core: Callable[..., core.EngineCore],
) -> None:
    engine = make_core()
    prompt = engine.tokenizer("Hello world!").input_ids
    _, full_text, _ = run(engine, {"f": (prompt, Params(max_tokens=30, temperature=0.0, ignore_eos=True))})["f"]
    stop = full_text[8:14]
    engine.add_request(
        engine.make_request(
            req_id="s",
            prompt_token_ids=prompt,
            sampling_params=Params(max_tokens=30, temperature=0.0, ignore_eos=True, stop=(stop,)),
        )
    )
    streamed = ""
    while engine.has_unfinished_requests():
        for out in engine.step()[0]:
            streamed += out.text
            assert stop not in streamed
            assert full_text.startswith(streamed)
    assert streamed == full_text[: full_text.index(stop)]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": -1}, "seed"),
        ({"stop": ("",)}, "stop"),
        ({"stop": ("x",), "detokenize": False}, "stop"),
        ({"stop_token_ids": (-3,)}, "stop_token_ids"),
    ],
)
def test_invalid_sampling_parameters_are_named(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(request_mod.InvalidParameterError) as info:
        Params(**kwargs)  # type: ignore[arg-type]
    assert info.value.param == param and param in str(info.value)


def test_prompt_plus_max_tokens_over_the_context_is_refused(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core(max_model_len=64)
    assert engine.max_model_len == 64
    with pytest.raises(request_mod.InvalidParameterError) as info:
        engine.make_request(req_id="x", prompt_token_ids=[1] * 40, sampling_params=Params(max_tokens=25))
    assert info.value.param == "max_tokens"
    assert "64" in info.value.message and "40" in info.value.message
    req = engine.make_request(req_id="y", prompt_token_ids=[1] * 40, sampling_params=Params(max_tokens=None))
    assert req.max_tokens == 24  # None means "the rest of the context"


def test_a_context_longer_than_the_model_s_is_refused(make_core: Callable[..., core.EngineCore]) -> None:
    with pytest.raises(request_mod.InvalidParameterError) as info:
        make_core(max_model_len=10**6)
    assert info.value.param == "max_model_len"
