"""The grammar layer on its own: schemas the library refuses are refused with the field named, equal
schemas compile once, and a matcher's mask admits exactly the tokens that keep the output valid."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import jsonschema
import pytest
import torch
import transformers

from fleetlm_runtime.engine import request as request_mod
from fleetlm_runtime.structured import formats, grammar, mask


def test_bad_schemas_are_refused_naming_the_field() -> None:
    field = "response_format.json_schema.schema"
    for bad in ({"type": "nonsense"}, {"type": "object", "properties": 3}, {"$ref": "#/nowhere"}, [1, 2]):
        with pytest.raises(request_mod.InvalidParameterError) as caught:
            formats.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": bad}})
        assert caught.value.param == field
    with pytest.raises(request_mod.InvalidParameterError) as caught:
        formats.from_response_format({"type": "xml"})
    assert caught.value.param == "response_format.type"
    with pytest.raises(request_mod.InvalidParameterError) as caught:
        formats.from_response_format({"type": "json_schema", "json_schema": {"schema": {}}})
    assert caught.value.param == "response_format.json_schema.name"
    assert formats.from_response_format({"type": "text"}) is None
    assert formats.from_response_format({"type": "json_object"}) is not None


def test_the_server_side_check_loads_no_torch() -> None:
    """The server process never loads torch (its engine child does); checking a schema must not either."""
    code = (
        "import sys; from fleetlm_runtime.structured import formats; "
        "formats.from_response_format({'type': 'json_schema', 'json_schema': {'name': 'x', 'schema': "
        "{'type': 'object', 'properties': {'a': {'type': 'string', 'maxLength': 3}}}}}); "
        "print('torch' in sys.modules, 'xgrammar' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_each_schema_compiles_once_and_the_mask_keeps_a_valid_instance_reachable(
    tokenizer: transformers.PreTrainedTokenizerBase, schemas: list[dict[str, Any]]
) -> None:
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    cache = grammar.GrammarCache(tokenizer, vocab_size=len(tokenizer), stop_token_ids=[eos])
    constraints = [formats.schema_constraint(s, param="schema") for s in schemas]
    for constraint in constraints:
        cache.compile(constraint)
    assert cache.num_compiles == len(schemas) and len(cache.take_compile_seconds()) == len(schemas)
    again = formats.schema_constraint(json.loads(json.dumps(schemas[0])), param="schema")
    assert cache.compile(again) is cache.compile(constraints[0]) and cache.num_compiles == len(schemas)
    assert cache.take_compile_seconds() == ()

    # Walk each grammar greedily on uniform logits with the batch mask: the first allowed token each
    # step. What comes out must validate, and the matcher ends terminated on EOS.
    batch_mask = mask.BatchMask()
    for schema, constraint in zip(schemas, constraints, strict=True):
        matcher = cache.matcher(constraint)
        tokens: list[int] = []
        for _ in range(400):
            logits = torch.zeros(3, len(tokenizer))
            batch_mask.apply(logits, [1], [matcher])
            assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()  # other rows untouched
            token = int(logits[1].argmax())
            assert matcher.accept(token)
            if token == eos:
                break
            tokens.append(token)
        assert matcher.is_terminated, schema
        assert matcher.tokens == [*tokens, eos]
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), schema)
        # A matcher replays a kept sequence to the same state (what a recompute needs).
        fresh = cache.matcher(constraint)
        fresh.replay(tokens)
        assert fresh.tokens == tokens and fresh.accept(eos) and fresh.is_terminated
