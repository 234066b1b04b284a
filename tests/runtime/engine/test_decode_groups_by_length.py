"""Decode rows sorted by length and attended in groups: every request still equals `generate()`.

The runner sorts a step's decode rows by length and attends over them in groups of `_DECODE_GROUP`, each
gathering only as many blocks as its longest row holds. Here a batch of more than two groups, with
prompts from a few tokens to several blocks long, decodes together from the same step on: the groups
read different numbers of blocks, and each request's greedy tokens must equal `model.generate()` on it
alone. Both forwards are checked.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fleetlm_runtime.engine import core, runner
from fleetlm_runtime.engine import request as request_mod


@pytest.mark.parametrize("fast_path", [True, False])
def test_decode_groups_of_different_lengths_equal_generate(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
    random_prompts: Callable[..., list[list[int]]],
    fast_path: bool,
) -> None:
    num_requests = 2 * runner._DECODE_GROUP + 5  # three groups, the last one short
    engine = make_core(max_batch_size=num_requests, max_batch_tokens=4096, fast_path=fast_path)
    prompts = random_prompts(num_requests, vocab_size=engine.loaded.vocab_size, seed=5, min_len=200, max_len=200)
    prompts = [prompt[: 3 + 9 * i] for i, prompt in enumerate(prompts)]  # 3 .. 192 tokens: 1 to 13 blocks
    # Submitted in an order unrelated to length, so the runner's sort has work to do.
    order = sorted(range(num_requests), key=lambda i: (i * 7) % num_requests)
    for index in order:
        engine.add_request(
            engine.make_request(
                req_id=f"r{index}",
                prompt_token_ids=prompts[index],
                sampling_params=request_mod.SamplingParams(max_tokens=12, temperature=0.0),
            )
        )
    seen_groups: list[list[tuple[int, int, int]]] = []
    make_meta = engine.runner._make_meta

    def record(**kwargs: object) -> object:
        meta = make_meta(**kwargs)  # type: ignore[arg-type]
        seen_groups.append([(g.start, g.rows, g.num_blocks) for g in meta.decode_groups])
        return meta

    engine.runner._make_meta = record  # type: ignore[method-assign]
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(num_requests)}
    while engine.has_unfinished_requests():
        outputs, _ = engine.step()
        for out in outputs:
            tokens[out.req_id].extend(out.new_token_ids)
    full = [groups for groups in seen_groups if sum(rows for _, rows, _ in groups) == num_requests]
    assert full, "all requests must decode in one step at least once"
    for groups in full:
        assert len(groups) == 3 and [rows for _, rows, _ in groups] == [runner._DECODE_GROUP] * 2 + [5]
        blocks = [num_blocks for _, _, num_blocks in groups]
        assert blocks == sorted(blocks) and blocks[0] < blocks[-1], f"groups read {blocks} blocks"
    for index, prompt in enumerate(prompts):
        expected = generate_greedy(reference_model, prompt, 12)
        assert tokens[f"r{index}"] == expected, f"request {index} (prompt {len(prompt)} tokens) differs"
    assert engine.kv_usage == 0.0 and engine.runner.num_requests == 0
