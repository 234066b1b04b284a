"""Log-probabilities, penalties and logit_bias through the engine core on the tiny model, checked against
the stock HF model (`model(input_ids).logits`, fp32) and a plain-Python reference of the formulas."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import transformers

from fleetlm_runtime.engine import core, sampling
from fleetlm_runtime.engine import request as request_mod

Params = request_mod.SamplingParams
PROMPT = [11, 22, 33, 44, 55, 66, 77, 11, 22]
REPEATS = [5] * 8  # the tiny model's greedy continuation of this repeats tokens within 12 steps


def run(engine: core.EngineCore, jobs: dict[str, tuple[list[int], Params]]) -> dict[str, tuple[list[int], list]]:
    """Submit all jobs at once, step to completion; returns req_id -> (tokens, logprobs per token)."""
    for req_id, (prompt, params) in jobs.items():
        engine.add_request(engine.make_request(req_id=req_id, prompt_token_ids=prompt, sampling_params=params))
    results: dict[str, tuple[list[int], list]] = {req_id: ([], []) for req_id in jobs}
    while engine.has_unfinished_requests():
        for out in engine.step()[0]:
            tokens, logprobs = results[out.req_id]
            tokens += out.new_token_ids
            if out.logprobs is not None:
                logprobs += out.logprobs
    return results


def _hf_log_softmax(model: transformers.PreTrainedModel, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_greedy_logprobs_equal_hf_log_softmax(
    make_core: Callable[..., core.EngineCore], reference_model: transformers.PreTrainedModel
) -> None:
    engine = make_core(max_batch_size=8)
    jobs = {
        "lp": (PROMPT, Params(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5)),
        # A plain request in the same batch: it gets no logprobs, and its tokens are unchanged.
        "plain": (PROMPT, Params(max_tokens=8, temperature=0.0, ignore_eos=True)),
    }
    got = run(engine, jobs)
    tokens, logprobs = got["lp"]
    assert got["plain"] == (tokens, [])
    assert len(logprobs) == len(tokens) == 8
    reference = _hf_log_softmax(reference_model, PROMPT + tokens)
    for step, (token, (chosen, top)) in enumerate(zip(tokens, logprobs, strict=True)):
        row = reference[len(PROMPT) - 1 + step]
        assert abs(chosen - float(row[token])) < 1e-4
        assert len(top) == 5
        assert top[0][0] == token  # greedy: the sampled token is the most likely one
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        for token_id, value in top:
            assert abs(value - float(row[token_id])) < 1e-4
        assert abs(values[-1] - float(row.topk(5).values[-1])) < 1e-4


def test_logprobs_zero_gives_the_sampled_token_only(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core()
    tokens, logprobs = run(engine, {"x": (PROMPT, Params(max_tokens=4, temperature=1.0, seed=3, logprobs=0))})["x"]
    assert len(logprobs) == len(tokens)
    assert all(top == [] and chosen <= 0.0 for chosen, top in logprobs)


def _reference_processed(
    logits: list[float],
    *,
    prompt: list[int],
    output: list[int],
    presence: float,
    frequency: float,
    rep: float,
    bias: dict[int, float],
) -> list[float]:
    """OpenAI's and vLLM's definitions, one token at a time."""
    out = []
    for token, raw in enumerate(logits):
        value = raw + bias.get(token, 0.0)
        if token in prompt or token in output:
            value = value / rep if value > 0 else value * rep
        count = output.count(token)
        value -= frequency * count + presence * (1.0 if count else 0.0)
        out.append(value)
    return out


def test_penalties_follow_the_reference_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, generator=generator)
    prompt, output = [1, 2, 3], [3, 4, 4, 5, 5, 5]
    presence, frequency, rep, bias = 0.7, 0.4, 1.3, {6: 5.0, 0: -3.0}
    counts = torch.zeros(2, 12)
    for token in output:
        counts[:, token] += 1
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, prompt] = True
    bias_row = torch.zeros(2, 12)
    for token, value in bias.items():
        bias_row[:, token] = value
    got = sampling.apply_penalties(
        logits,
        counts=counts,
        prompt_mask=mask,
        presence=torch.full((2, 1), presence),
        frequency=torch.full((2, 1), frequency),
        repetition=torch.full((2, 1), rep),
        bias=bias_row,
    )
    for row in range(2):
        expected = _reference_processed(
            logits[row].tolist(),
            prompt=prompt,
            output=output,
            presence=presence,
            frequency=frequency,
            rep=rep,
            bias=bias,
        )
        assert got[row].tolist() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"frequency_penalty": 2.0},
        {"presence_penalty": 1.5},
        {"repetition_penalty": 1.8},
        {"frequency_penalty": 0.5, "presence_penalty": -0.5, "repetition_penalty": 1.2, "logit_bias": ((7, 3.0),)},
    ],
    ids=["frequency", "presence", "repetition", "all"],
)
def test_penalised_greedy_equals_a_reference_loop_on_hf(
    make_core: Callable[..., core.EngineCore],
    reference_model: transformers.PreTrainedModel,
    kwargs: dict[str, object],
) -> None:
    params = Params(max_tokens=20, temperature=0.0, ignore_eos=True, **kwargs)  # type: ignore[arg-type]
    engine = make_core(max_batch_size=8)
    got = run(
        engine,
        {"pen": (REPEATS, params), "plain": (REPEATS, Params(max_tokens=20, temperature=0.0, ignore_eos=True))},
    )
    output: list[int] = []
    for _ in range(20):
        with torch.inference_mode():
            logits = reference_model(torch.tensor([REPEATS + output])).logits[0, -1].float().tolist()
        processed = _reference_processed(
            logits,
            prompt=REPEATS,
            output=output,
            presence=params.presence_penalty,
            frequency=params.frequency_penalty,
            rep=params.repetition_penalty,
            bias=dict(params.logit_bias),
        )
        output.append(max(range(len(processed)), key=processed.__getitem__))
    assert got["pen"][0] == output
    assert got["pen"][0] != got["plain"][0]  # the penalty really changed the output


def test_logit_bias_forces_a_token_when_sampling(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core()
    forced = Params(max_tokens=10, temperature=1.0, seed=1, ignore_eos=True, logit_bias=((42, 100.0),))
    banned = Params(max_tokens=10, temperature=0.0, ignore_eos=True, logit_bias=((42, -100.0),), logprobs=1)
    got = run(engine, {"forced": (PROMPT, forced), "banned": ([42] * 5, banned)})
    assert got["forced"][0] == [42] * 10
    assert 42 not in got["banned"][0]


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logit_bias": ((1, 101.0),)}, "logit_bias"),
        ({"logit_bias": ((-1, 1.0),)}, "logit_bias"),
    ],
)
def test_bad_values_name_the_parameter(kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(request_mod.InvalidParameterError) as error:
        Params(**kwargs)  # type: ignore[arg-type]
    assert error.value.param == param


def test_logit_bias_outside_the_vocabulary_is_refused(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core()
    vocab = engine.info.vocab_size
    with pytest.raises(request_mod.InvalidParameterError) as error:
        engine.make_request(req_id="x", prompt_token_ids=PROMPT, sampling_params=Params(logit_bias=((vocab, 1.0),)))
    assert error.value.param == "logit_bias"


def test_prompt_logprobs_equal_hf_log_softmax_across_chunks(
    make_core: Callable[..., core.EngineCore], reference_model: transformers.PreTrainedModel
) -> None:
    """A 40-token prompt prefilled in chunks of 16 (a budget of 16 tokens per step); the same prompt is in
    the prefix cache already, yet every position gets its logprob (such requests do not use cache hits)."""
    engine = make_core(max_batch_tokens=16, max_batch_size=4)
    prompt = [(7 * i + 3) % 800 + 1 for i in range(40)]
    run(engine, {"warm": (prompt, Params(max_tokens=1, temperature=0.0))})
    engine.add_request(
        engine.make_request(
            req_id="echo",
            prompt_token_ids=prompt,
            sampling_params=Params(max_tokens=2, temperature=0.0, prompt_logprobs=3),
        )
    )
    got = []
    while engine.has_unfinished_requests():
        got += [out.prompt_logprobs for out in engine.step()[0] if out.prompt_logprobs is not None]
    assert len(got) == 1  # once, with the first token
    entries = got[0]
    assert len(entries) == len(prompt) and entries[0] is None
    reference = _hf_log_softmax(reference_model, prompt)
    for position in range(1, len(prompt)):
        chosen, top = entries[position]
        row = reference[position - 1]
        assert abs(chosen - float(row[prompt[position]])) < 1e-4
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
