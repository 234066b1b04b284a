"""Constrained decoding through the engine core on the random-weight tiny model: every output of every
schema parses and validates, sampled or greedy, mixed with unconstrained requests in one batch, with the
prefix cache on, and under preemption (a KV pool far smaller than the load), where each running request's
matcher must hold exactly the tokens the request has kept at every step."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import jsonschema
import transformers

from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.structured import formats


def _run(
    engine: core.EngineCore, check_matchers: bool = False
) -> tuple[dict[str, list[int]], dict[str, str], int, list[float]]:
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    preemptions = 0
    compiles: list[float] = []
    while engine.has_unfinished_requests():
        outs, stats = engine.step()
        assert stats is not None
        preemptions += stats.num_preemptions
        compiles += stats.grammar_compile_s
        for out in outs:
            assert out.error is None
            tokens.setdefault(out.req_id, []).extend(out.new_token_ids)
            if out.finished:
                assert out.finish_reason is not None
                reasons[out.req_id] = out.finish_reason.value
        if check_matchers:
            states = engine.runner._sampling
            for req in engine.scheduler.running:
                state = states.get(req.req_id)
                if state is not None and state.grammar is not None:
                    assert state.grammar.tokens == req.output_token_ids, req.req_id
    return tokens, reasons, preemptions, compiles


def _validate(tokenizer: transformers.PreTrainedTokenizerBase, ids: list[int], schema: dict[str, Any]) -> None:
    text = tokenizer.decode(ids, skip_special_tokens=True)  # the last token is an EOS
    jsonschema.validate(json.loads(text), schema)


def test_every_schema_validates_sampled_and_greedy_beside_unconstrained_requests(
    make_core: Callable[..., core.EngineCore],
    tokenizer: transformers.PreTrainedTokenizerBase,
    schemas: list[dict[str, Any]],
    max_tokens: int,
) -> None:
    engine = make_core(max_batch_size=32, max_batch_tokens=512)
    rng = random.Random(5)
    expected: dict[str, dict[str, Any] | None] = {}
    for i, schema in enumerate(schemas):
        constraint = formats.schema_constraint(schema, param="schema")
        for j, temperature in enumerate((0.0, 1.0, 1.0)):
            params = request_mod.SamplingParams(
                max_tokens=max_tokens, temperature=temperature, seed=100 * i + j, constraint=constraint
            )
            prompt = [rng.randrange(1, 800) for _ in range(rng.randint(3, 40))]
            req_id = f"s{i}-{j}"
            engine.add_request(engine.make_request(req_id=req_id, prompt_token_ids=prompt, sampling_params=params))
            expected[req_id] = schema
        plain = request_mod.SamplingParams(max_tokens=20, temperature=1.0, seed=i, ignore_eos=True)
        engine.add_request(engine.make_request(req_id=f"u{i}", prompt_token_ids=[3, 4, 5 + i], sampling_params=plain))
        expected[f"u{i}"] = None
    tokens, reasons, _, compiles = _run(engine)
    assert len(compiles) == len(schemas)  # one compile per schema, whatever the number of requests
    for req_id, schema in expected.items():
        if schema is None:
            assert reasons[req_id] == "length" and len(tokens[req_id]) == 20
            continue
        assert reasons[req_id] == "stop", req_id  # the grammar completed and EOS ended it, within budget
        _validate(tokenizer, tokens[req_id], schema)


def test_outputs_validate_under_preemption_with_the_prefix_cache_on(
    make_core: Callable[..., core.EngineCore],
    tokenizer: transformers.PreTrainedTokenizerBase,
    schemas: list[dict[str, Any]],
    max_tokens: int,
) -> None:
    # Shared prompt prefixes (two full blocks) so the prefix cache hits, and a pool a fraction of the load.
    engine = make_core(max_batch_size=32, max_batch_tokens=256, max_kv_tokens=800)
    rng = random.Random(9)
    prefix = [rng.randrange(1, 800) for _ in range(32)]
    expected: dict[str, dict[str, Any]] = {}
    for i in range(64):
        schema = schemas[i % len(schemas)]
        params = request_mod.SamplingParams(
            max_tokens=max_tokens, temperature=1.0, seed=i, constraint=formats.schema_constraint(schema, param="s")
        )
        prompt = prefix + [rng.randrange(1, 800) for _ in range(rng.randint(1, 20))]
        engine.add_request(engine.make_request(req_id=f"r{i}", prompt_token_ids=prompt, sampling_params=params))
        expected[f"r{i}"] = schema
    tokens, reasons, preemptions, _ = _run(engine, check_matchers=True)
    assert preemptions > 0, "the load must overflow the pool"
    assert engine.scheduler.kv.pool.num_cached_blocks > 0
    for req_id, schema in expected.items():
        assert reasons[req_id] == "stop", req_id
        _validate(tokenizer, tokens[req_id], schema)
