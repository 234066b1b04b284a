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
    prompts = random_prompts(10, vocab_size=engine.loaded.vocab_size, seed=2, min_len=50, max_len=300)
    for i, prompt in enumerate(prompts):
        engine.add_request(
            engine.make_request(
                req_id=f"r{i}", prompt_token_ids=prompt, sampling_params=Params(max_tokens=200, ignore_eos=True)
            )
        )
    for _ in range(12):
        engine.step()
    assert engine.kv_usage > 0 and engine.runner.num_slots > 0 and engine.scheduler.num_waiting > 0
    kv_bytes = engine.runner.kv_buffer_bytes
    outputs = engine.abort_requests([f"r{i}" for i in range(10)])
    assert len(outputs) == 10 and all(o.finish_reason is request_mod.FinishReason.ABORT for o in outputs)
    assert engine.kv_usage == 0.0 and engine.scheduler.kv.num_reserved_tokens == 0
    assert engine.runner.num_slots == 0  # freed at once, not at the next step
    assert engine.runner.kv_buffer_bytes < kv_bytes  # and the buffers shrank back
    assert not engine.has_unfinished_requests()
    assert engine.step() == ([], None)


def test_requests_wait_when_kv_capacity_is_reserved(make_core: Callable[..., core.EngineCore]) -> None:
    engine = make_core(max_batch_size=8, max_batch_tokens=256, max_kv_tokens=100)
    for i in range(3):
        engine.add_request(
            engine.make_request(
                req_id=f"r{i}", prompt_token_ids=[3 + i] * 20, sampling_params=Params(max_tokens=20, ignore_eos=True)
            )
        )
    _, stats = engine.step()
    assert stats is not None and stats.num_running == 2 and stats.num_waiting == 1
    assert stats.num_kv_tokens_reserved == 80 and stats.kv_usage == 0.8
    finished: list[str] = []
    while engine.has_unfinished_requests():
        finished += [o.req_id for o in engine.step()[0] if o.finished]
    assert finished[-1] == "r2" and engine.kv_usage == 0.0
