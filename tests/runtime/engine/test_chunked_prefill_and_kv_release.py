"""Long prompts are prefilled in chunks while decodes keep flowing; finishing or aborting frees KV."""

from __future__ import annotations

from collections.abc import Callable

from fleetlm_runtime.engine import core
from fleetlm_runtime.engine import request as request_mod

Params = request_mod.SamplingParams


def test_a_decode_gets_a_token_on_every_step_of_a_long_chunked_prefill(
    make_core: Callable[..., core.EngineCore],
    reference_model: object,
    generate_greedy: Callable[..., list[int]],
    random_prompts: Callable[..., list[list[int]]],
) -> None:
    engine = make_core(max_batch_size=4, max_batch_tokens=32)
    short, long = random_prompts(2, vocab_size=engine.loaded.vocab_size, seed=8, min_len=200, max_len=200)
    short = short[:5]
    engine.add_request(
        engine.make_request(
            req_id="decode",
            prompt_token_ids=short,
            sampling_params=Params(max_tokens=100, temperature=0.0, ignore_eos=True),
        )
    )
    engine.step()  # its prefill and first token
    engine.add_request(
        engine.make_request(req_id="long", prompt_token_ids=long, sampling_params=Params(max_tokens=3, temperature=0.0))
    )
    prefill_steps = 0
    long_tokens: list[int] = []
    while not long_tokens:
        outputs, stats = engine.step()
        assert stats is not None and stats.num_tokens <= 32
        by_id = {out.req_id: out for out in outputs}
        assert len(by_id["decode"].new_token_ids) == 1, "the running decode must advance on every step"
        if "long" in by_id:
            long_tokens.extend(by_id["long"].new_token_ids)
        prefill_steps += 1
    assert prefill_steps == 7  # 200 prompt tokens in chunks of 31 (one budget token is the decode's)
    while engine.has_unfinished_requests():
        for out in engine.step()[0]:
            if out.req_id == "long":
                long_tokens.extend(out.new_token_ids)
    assert long_tokens == generate_greedy(reference_model, long, 3)


def test_aborting_running_and_waiting_requests_returns_kv_to_zero(
    make_core: Callable[..., core.EngineCore], random_prompts: Callable[..., list[list[int]]]
) -> None:
    engine = make_core(max_batch_size=4, max_batch_tokens=64, max_kv_tokens=2000)
    pool = [t.data_ptr() for t in engine.runner.pool_tensors]
    prompts = random_prompts(10, vocab_size=engine.loaded.vocab_size, seed=2, min_len=50, max_len=300)
    for i, prompt in enumerate(prompts):
        engine.add_request(
            engine.make_request(
                req_id=f"r{i}", prompt_token_ids=prompt, sampling_params=Params(max_tokens=200, ignore_eos=True)
            )
        )
    for _ in range(12):
        engine.step()
    assert engine.kv_usage > 0 and engine.runner.num_requests > 0 and engine.scheduler.num_waiting > 0
    outputs = engine.abort_requests([f"r{i}" for i in range(10)])
    assert len(outputs) == 10 and all(o.finish_reason is request_mod.FinishReason.ABORT for o in outputs)
    assert engine.kv_usage == 0.0 and engine.scheduler.kv.num_used_blocks == 0
    assert engine.runner.num_requests == 0  # freed at once, not at the next step
    assert [t.data_ptr() for t in engine.runner.pool_tensors] == pool  # the same pool, never reallocated
    assert not engine.has_unfinished_requests()
    assert engine.step() == ([], None)


def test_requests_hold_the_blocks_of_their_tokens_not_their_worst_case(
    make_core: Callable[..., core.EngineCore],
) -> None:
    # 7 blocks of 16 tokens. Each request may come to 40 tokens (3 blocks): reserving the worst case would
    # run 2 at once; holding what they compute (2 blocks for the 20-token prompt and first tokens) runs 3.
    engine = make_core(max_batch_size=8, max_batch_tokens=256, max_kv_tokens=112)
    assert engine.info.kv_num_blocks == 7 and engine.info.kv_capacity_tokens == 112
    for i in range(3):
        engine.add_request(
            engine.make_request(
                req_id=f"r{i}", prompt_token_ids=[3 + i] * 20, sampling_params=Params(max_tokens=20, ignore_eos=True)
            )
        )
    _, stats = engine.step()
    assert stats is not None and stats.num_running == 3 and stats.num_waiting == 0
    assert stats.kv_blocks_used == 6 and stats.num_kv_tokens_reserved == 96 and abs(stats.kv_usage - 6 / 7) < 1e-9
    finished: list[str] = []
    preemptions = 0
    while engine.has_unfinished_requests():
        outs, stats = engine.step()
        finished += [o.req_id for o in outs if o.finished]
        preemptions += stats.num_preemptions if stats is not None else 0
    # They outgrow the pool (9 blocks for 3 x 40 tokens): the newest is preempted, and all complete.
    assert preemptions >= 1 and sorted(finished) == ["r0", "r1", "r2"] and engine.kv_usage == 0.0
