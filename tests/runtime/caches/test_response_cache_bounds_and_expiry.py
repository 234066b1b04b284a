"""The response cache's store holds both bounds (entries and bytes), evicts the least recently used,
expires entries `ttl_s` after they were stored (a hit refreshes recency, not age), refuses an entry larger
than the whole byte bound, and `clear()` empties it. Pure Python with a hand-driven clock."""

from __future__ import annotations

import pytest

from fleetlm_runtime.caches import response_store


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _value(text: str = "hello", *, pieces: int = 1) -> response_store.CachedResponse:
    return response_store.CachedResponse(
        pieces=tuple([text] * pieces), finish_reason="length", num_prompt_tokens=3, num_output_tokens=pieces
    )


def _cache(clock: Clock | None = None, **kwargs: float) -> response_store.ResponseCache:
    settings = {"max_entries": 100, "max_bytes": 1 << 20, "ttl_s": 60.0, **kwargs}
    return response_store.ResponseCache(
        max_entries=int(settings["max_entries"]),
        max_bytes=int(settings["max_bytes"]),
        ttl_s=settings["ttl_s"],
        clock=clock or Clock(),
    )


def test_get_returns_what_was_put_and_misses_otherwise() -> None:
    cache = _cache()
    assert cache.get("k") is None
    assert cache.put("k", _value("abc"))
    got = cache.get("k")
    assert got is not None and got.text == "abc" and got.finish_reason == "length"
    assert len(cache) == 1 and cache.num_bytes == _value("abc").size_bytes


def test_entry_bound_evicts_the_least_recently_used() -> None:
    cache = _cache(max_entries=3)
    for key in "abc":
        cache.put(key, _value(key))
    assert cache.get("a") is not None  # "a" is now the most recent; "b" the least
    cache.put("d", _value("d"))
    assert len(cache) == 3 and cache.num_evictions == 1
    assert cache.get("b") is None
    assert all(cache.get(k) is not None for k in "acd")


def test_byte_bound_evicts_until_it_holds() -> None:
    one = _value("x" * 1000).size_bytes
    cache = _cache(max_bytes=3 * one)
    for key in "abcde":
        cache.put(key, _value("x" * 1000))
        assert cache.num_bytes <= 3 * one
    assert len(cache) == 3 and [k for k in "abcde" if cache.get(k) is not None] == ["c", "d", "e"]
    # One big entry pushes out as many small ones as it must.
    cache.put("big", _value("y" * 2500))
    assert cache.num_bytes <= 3 * one and cache.get("big") is not None and len(cache) == 1


def test_an_entry_larger_than_the_byte_bound_is_not_stored() -> None:
    cache = _cache(max_bytes=2000)
    cache.put("small", _value("s"))
    assert not cache.put("huge", _value("z" * 5000))
    assert cache.get("huge") is None and cache.get("small") is not None


def test_size_counts_text_bytes_and_pieces() -> None:
    ascii_value, wide_value = _value("a" * 100), _value("é" * 100)
    assert wide_value.size_bytes - ascii_value.size_bytes == 100  # two UTF-8 bytes per é
    assert _value("a", pieces=10).size_bytes > _value("a" * 10).size_bytes  # each piece costs an object


def test_entries_expire_ttl_after_they_were_stored() -> None:
    clock = Clock()
    cache = _cache(clock, ttl_s=10.0)
    cache.put("k", _value())
    clock.now += 9.9
    assert cache.get("k") is not None  # a hit does not extend the age...
    clock.now += 0.1
    assert cache.get("k") is None  # ...so it expires 10 s after the put
    assert len(cache) == 0 and cache.num_bytes == 0 and cache.num_expirations == 1


def test_expired_entries_go_before_live_ones_when_room_is_needed() -> None:
    clock = Clock()
    cache = _cache(clock, max_entries=2, ttl_s=10.0)
    cache.put("old", _value())
    clock.now += 5
    cache.put("live", _value())
    cache.get("old")  # most recent, but stored first
    clock.now += 6  # "old" is now expired, "live" is not
    cache.put("new", _value())
    assert cache.get("live") is not None and cache.get("new") is not None and cache.get("old") is None
    assert cache.num_evictions == 0


def test_put_again_replaces_and_keeps_the_byte_count_exact() -> None:
    cache = _cache()
    cache.put("k", _value("a" * 10))
    cache.put("k", _value("b" * 500))
    assert len(cache) == 1 and cache.num_bytes == _value("b" * 500).size_bytes


def test_clear_empties_everything() -> None:
    cache = _cache()
    for key in "abc":
        cache.put(key, _value())
    cache.clear()
    assert len(cache) == 0 and cache.num_bytes == 0 and cache.get("a") is None


@pytest.mark.parametrize(("temperature", "top_k", "seed", "eligible"), [
    (0.0, 0, None, True),  # greedy
    (1.0, 1, None, True),  # top_k 1 is greedy too
    (0.7, 0, 42, True),  # sampled from an explicit seed
    (0.0, 0, 7, True),
    (0.7, 0, None, False),  # sampled, unseeded: every answer may differ
    (1.0, 50, None, False),
])  # fmt: skip
def test_only_deterministic_requests_are_eligible(
    temperature: float, top_k: int, seed: int | None, eligible: bool
) -> None:
    assert response_store.is_deterministic(temperature=temperature, top_k=top_k, seed=seed) is eligible


def test_keys_are_canonical_and_every_part_counts() -> None:
    base = {"model": {"source": "m", "revision": None}, "prompt_token_ids": [1, 2, 3], "sampling": {"a": 1, "b": [2]}}
    key = response_store.make_key(**base)  # type: ignore[arg-type]
    assert len(key) == 64 and key == response_store.make_key(**base)  # type: ignore[arg-type]
    reordered = {**base, "sampling": {"b": [2], "a": 1}}
    assert response_store.make_key(**reordered) == key  # type: ignore[arg-type]
    variants = [
        {**base, "model": {"source": "m", "revision": "v2"}},
        {**base, "prompt_token_ids": [1, 2, 4]},
        {**base, "prompt_token_ids": [1, 2]},
        {**base, "sampling": {"a": 2, "b": [2]}},
        {**base, "sampling": {"a": 1, "b": [2], "c": None}},
    ]
    for variant in variants:
        assert response_store.make_key(**variant) != key, variant  # type: ignore[arg-type]
    assert response_store.make_key(**base, salt="tenant-b") != key  # type: ignore[arg-type]
