"""`bench serve --repeat-fraction`: the dataset repeats earlier requests exactly (after their original,
deterministically for a seed), and the report splits the figures by first/repeat and by the server's
cache answer, with the hit-vs-miss speedup; per class it gives the success rate and refusals by status."""

from __future__ import annotations

from fleetlm_dev import bench_router, bench_serve


def test_repeats_follow_their_originals_and_are_deterministic() -> None:
    ds = bench_serve.DatasetConfig(input_len=6, output_len=3, repeat_fraction=0.5)
    specs = bench_serve.build_dataset(ds, num=200, seed=4)
    assert specs == bench_serve.build_dataset(ds, num=200, seed=4)
    repeats = [i for i, s in enumerate(specs) if s.repeat]
    assert 70 < len(repeats) < 130
    for i in repeats:
        original = next(j for j, s in enumerate(specs) if not s.repeat and s.prompt == specs[i].prompt)
        assert original < i and specs[original].output_len == specs[i].output_len
    # Without repeats the dataset is what it always was for a seed.
    plain = bench_serve.DatasetConfig(input_len=6, output_len=3)
    assert not any(s.repeat for s in bench_serve.build_dataset(plain, num=50, seed=4))
    assert bench_serve.build_dataset(plain, num=50, seed=4) == bench_serve.build_dataset(plain, num=50, seed=4)


async def test_report_splits_hits_from_computed(cached_runtime_process: bench_router.Process) -> None:
    url = cached_runtime_process.url
    cfg = bench_serve.BenchConfig(url=url, num_prompts=12, max_concurrency=1, progress=False, seed=2)
    ds = bench_serve.DatasetConfig(input_len=8, output_len=24, repeat_fraction=0.5)
    ((outcome, _),) = await bench_serve.run(cfg, ds)
    rep = bench_serve.report(outcome, cfg)
    assert rep["completed"] == 12 and rep["success_rate"] == 1.0
    first, repeat = rep["per_origin"]["first"], rep["per_origin"]["repeat"]
    assert first["completed"] + repeat["completed"] == 12 and repeat["completed"] >= 2
    # One at a time: every first is computed, every repeat is a hit.
    assert rep["per_cache"]["miss"]["completed"] == first["completed"]
    assert rep["per_cache"]["hit"]["completed"] == repeat["completed"]
    assert rep["per_cache"]["hit"]["total_output_tokens"] == repeat["total_output_tokens"]
    assert rep["cache_speedup"]["e2el_ms"] > 1.0
    assert "cache=hit" in bench_serve.format_table(rep["per_cache"]["hit"], title="cache=hit")
