"""Single flight: concurrent claims of one key make one leader and followers that get its result; a leader
that fails releases its followers with nothing, one of them leads next, and nothing is stored; a follower
that gives up never cancels the flight; `clear()` forgets flights, so an old result is not stored."""

from __future__ import annotations

import asyncio

import pytest

from fleetlm_runtime.caches import response_store


def _cache() -> response_store.ResponseCache:
    return response_store.ResponseCache(max_entries=10, max_bytes=1 << 20, ttl_s=60.0)


VALUE = response_store.CachedResponse(pieces=("a", "b"), finish_reason="stop", num_prompt_tokens=2, num_output_tokens=2)


async def test_concurrent_claims_compute_once() -> None:
    cache = _cache()
    computations = 0

    async def request() -> tuple[str, response_store.CachedResponse | None]:
        nonlocal computations
        claim = cache.claim("k")
        if isinstance(claim, response_store.Hit):
            return "hit", claim.value
        if isinstance(claim, response_store.Follower):
            return "shared", await claim.wait()
        computations += 1
        try:
            await asyncio.sleep(0.01)  # the engine at work
            return "miss", VALUE
        finally:
            claim.finish(VALUE)

    results = await asyncio.gather(*(request() for _ in range(8)))
    assert computations == 1
    assert sorted(how for how, _ in results) == ["miss"] + ["shared"] * 7
    assert all(value == VALUE for _, value in results)
    assert cache.num_flights == 0 and cache.get("k") == VALUE
    assert isinstance(cache.claim("k"), response_store.Hit)


async def test_a_failed_leader_releases_followers_who_claim_again() -> None:
    cache = _cache()
    leader = cache.claim("k")
    assert isinstance(leader, response_store.Leader)
    followers = [cache.claim("k") for _ in range(3)]
    assert all(isinstance(f, response_store.Follower) for f in followers)
    waits = [asyncio.create_task(f.wait()) for f in followers]  # type: ignore[union-attr]
    await asyncio.sleep(0)
    leader.finish(None)  # aborted: nothing to share, nothing stored
    assert await asyncio.gather(*waits) == [None, None, None]
    assert cache.get("k") is None and cache.num_flights == 0
    again = [cache.claim("k") for _ in range(3)]
    assert [type(c).__name__ for c in again] == ["Leader", "Follower", "Follower"]
    again[0].finish(VALUE)  # type: ignore[union-attr]
    assert await again[1].wait() == VALUE  # type: ignore[union-attr]


async def test_finish_is_idempotent_and_a_leader_in_finally_never_leaks_a_flight() -> None:
    cache = _cache()
    leader = cache.claim("k")
    assert isinstance(leader, response_store.Leader)
    follower = cache.claim("k")
    assert isinstance(follower, response_store.Follower)
    waiting = asyncio.create_task(follower.wait())
    await asyncio.sleep(0)

    async def serve() -> None:  # the server's shape: the leader computes, and finishes in `finally`
        try:
            raise RuntimeError("engine failed")
        finally:
            leader.finish(None)

    with pytest.raises(RuntimeError, match="engine failed"):
        await serve()
    assert await waiting is None  # released with nothing, to claim again
    leader.finish(VALUE)  # a second finish changes nothing
    assert cache.num_flights == 0 and cache.get("k") is None


async def test_a_follower_that_gives_up_does_not_cancel_the_flight() -> None:
    cache = _cache()
    leader = cache.claim("k")
    quitter, stayer = cache.claim("k"), cache.claim("k")
    quitting = asyncio.create_task(quitter.wait())  # type: ignore[union-attr]
    staying = asyncio.create_task(stayer.wait())  # type: ignore[union-attr]
    await asyncio.sleep(0)
    quitting.cancel()  # its client hung up
    await asyncio.sleep(0)
    leader.finish(VALUE)  # type: ignore[union-attr]
    assert await staying == VALUE
    assert cache.get("k") == VALUE


async def test_clear_during_a_flight_stores_nothing_from_before_it() -> None:
    cache = _cache()
    old_leader = cache.claim("k")
    follower = cache.claim("k")
    cache.clear()  # e.g. the cache settings changed: results computed before must not be stored
    new_leader = cache.claim("k")
    assert isinstance(new_leader, response_store.Leader)  # the old flight is forgotten
    old_leader.finish(VALUE)  # type: ignore[union-attr]
    assert await follower.wait() == VALUE  # type: ignore[union-attr]  # its follower still gets an answer
    assert cache.get("k") is None
    new_leader.finish(VALUE)
    assert cache.get("k") == VALUE
