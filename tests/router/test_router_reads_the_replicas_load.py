"""The router reads each replica's own load from its /metrics (real runtime processes): traffic that
reached a replica some other way (here: straight to it, as from a second router) steers new prompts to
the other replica, a replica that queues loses a seen prefix's requests to the next on the ring, and the
router exports what it read. By its own in-flight counts alone (zero on both) it would split them blind."""

from __future__ import annotations

import asyncio
import collections

import aiohttp

from fleetlm_dev import bench_router
from fleetlm_router import picker

# Long enough to keep the busy replica busy for the whole test, on a slow machine too.
BUSY = {"model": "tiny", "prompt": list(range(20, 40)), "max_tokens": 480, "ignore_eos": True, "stream": True}


async def _stream(session: aiohttp.ClientSession, url: str, prompt: list[int]) -> None:
    async with session.post(url + "/v1/completions", json={**BUSY, "prompt": prompt}) as resp:
        await resp.read()


async def _replica_of(session: aiohttp.ClientSession, url: str, prompt: list[int]) -> str:
    async with session.post(url + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 1}) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()
        return resp.headers["X-FleetLM-Replica"]


async def test_load_from_elsewhere_steers_new_prompts_and_a_queue_spills_prefixes(
    replicas, start_replica, make_router
) -> None:
    busy = start_replica(batching={"maxBatchSize": 1})  # one stream runs, the others queue
    idle = replicas[1]
    router = await make_router(
        [busy.url, idle.url], scrape_interval_s=0.1, scrape_stale_s=2.0, load_factor=4.0, queue_saturated=3
    )
    busy_name, idle_name = bench_router.endpoints_name(busy.url), bench_router.endpoints_name(idle.url)
    ring = picker.HashRing([busy_name, idle_name])
    prompt = next(  # a prompt whose home on the ring is the busy replica
        p
        for p in ([700 + i] * 300 for i in range(200))
        if next(ring.walk(picker.prefix_key({"prompt": p}) or b"")) == busy_name
    )
    router.state.seen_keys.check_and_add(picker.prefix_key({"prompt": prompt}) or b"")  # seen before
    async with aiohttp.ClientSession() as session:
        # Straight to the busy replica (as from a second router): 12 long streams, 11 of them queued.
        streams = [asyncio.create_task(_stream(session, busy.url, [i, *BUSY["prompt"]])) for i in range(12)]
        try:
            for _ in range(200):
                if bench_router.scrape_counter(busy.url, "vllm:num_requests_waiting") >= 5:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("the busy replica never queued")
            await asyncio.sleep(0.5)  # a few scrape intervals
            report = router.state.scraper.scraped.get(busy_name)
            assert report is not None and report.waiting >= 3, router.state.scraper.scraped
            # The seen prefix: its home unless that home queues.
            homed = await _replica_of(session, router.url, prompt)
            queued_then = bench_router.scrape_counter(busy.url, "vllm:num_requests_waiting")
            # New prompts (each unseen): the least loaded replica, as the replicas themselves report it.
            fresh = collections.Counter([await _replica_of(session, router.url, [500 + i] * 40) for i in range(6)])
            still_queued = bench_router.scrape_counter(busy.url, "vllm:num_requests_waiting")
        finally:
            for task in streams:
                task.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
    assert queued_then >= 3 and still_queued >= 1  # the premise held throughout
    assert homed == idle_name
    assert fresh == {idle_name: 6}
    text = router.state.metrics.render().decode()
    assert f'fleetlm_router_replica_waiting{{replica="{busy_name}"}}' in text
    assert router.state.metrics.scrapes.labels("ok")._value.get() > 0
    # The control: the router's own in-flight counts alone (zero on both) would have sent the prefix home
    # and split new prompts between the two; only the scraped queue told it otherwise.
    key = picker.prefix_key({"prompt": prompt})
    assert picker.pick_affinity(ring, key=key, in_flight={}, load_factor=4.0) == picker.Pick(
        busy_name, picker.REASON_AFFINITY
    )
    blind = {picker.pick_affinity(ring, key=None, in_flight={}, tie_break=i).replica for i in range(2)}  # type: ignore[union-attr]
    assert blind == {busy_name, idle_name}


async def test_each_listed_replicas_load_is_exported_before_any_request(replicas, make_router) -> None:
    """The load series of every listed replica appear from the first scrapes, not only once a pick has
    synced the router's replica list (before, the figures of scrapes between two picks could be dropped)."""
    router = await make_router([r.url for r in replicas], scrape_interval_s=0.05)
    names = [bench_router.endpoints_name(r.url) for r in replicas]
    for _ in range(100):
        text = router.state.metrics.render().decode()
        if all(f'fleetlm_router_replica_waiting{{replica="{name}"}} 0.0' in text for name in names):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"no load series for {names} after 5 s of scrapes:\n{text}")
