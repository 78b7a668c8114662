"""ImageEmbeddingCache: LRU order, byte bound, counters, thread safety."""

from __future__ import annotations

import hashlib
import threading

import pytest
import torch

from hd4k_tools.runtime.embedding_cache import EmbeddingCacheKey, ImageEmbeddingCache, cache_key, tensor_nbytes


def _key(name: str, hd_num: int = 9) -> EmbeddingCacheKey:
    return cache_key(hashlib.sha256(name.encode()).hexdigest(), hd_num, torch.float32, "cpu")


def _t(n: int, fill: float = 0.0) -> torch.Tensor:
    """A float32 tensor of exactly ``4 * n`` bytes."""
    return torch.full((n,), fill, dtype=torch.float32)


def test_cache_key_normalises_dtype_and_device() -> None:
    a = cache_key("abc", 25, torch.bfloat16, torch.device("cpu"))
    b = cache_key("abc", 25, "torch.bfloat16", "cpu")
    assert a == b and hash(a) == hash(b)
    assert a != cache_key("abc", 16, torch.bfloat16, "cpu")
    assert a != cache_key("abc", 25, torch.float16, "cpu")
    with pytest.raises(ValueError, match="hd_num"):
        cache_key("abc", 0, torch.float32, "cpu")


def test_hits_misses_and_identity() -> None:
    cache = ImageEmbeddingCache(max_bytes=1000)
    k = _key("a")
    assert cache.get(k) is None
    t = _t(10)
    assert cache.put(k, t)
    assert cache.get(k) is t
    assert (cache.hits, cache.misses, cache.evictions) == (1, 1, 0)
    assert cache.current_bytes == 40 == tensor_nbytes(t)
    assert cache.stats() == {
        "entries": 1,
        "current_bytes": 40,
        "max_bytes": 1000,
        "hits": 1,
        "misses": 1,
        "evictions": 0,
    }


def test_lru_eviction_order_and_byte_bound() -> None:
    cache = ImageEmbeddingCache(max_bytes=120)  # room for three 40-byte tensors
    a, b, c, d = (_key(x) for x in "abcd")
    for k in (a, b, c):
        cache.put(k, _t(10))
    assert cache.current_bytes == 120
    assert cache.get(a) is not None  # a becomes most recent: LRU order is now b, c, a
    cache.put(d, _t(10))
    assert cache.keys() == [c, a, d]
    assert cache.evictions == 1
    assert cache.current_bytes == 120
    # A bigger entry evicts as many LRU entries as needed.
    e = _key("e")
    cache.put(e, _t(20))
    assert cache.keys() == [d, e]
    assert cache.evictions == 3
    assert cache.current_bytes == 120 <= cache.max_bytes


def test_replacing_a_key_updates_bytes() -> None:
    cache = ImageEmbeddingCache(max_bytes=100)
    k = _key("a")
    cache.put(k, _t(10))
    cache.put(k, _t(5, 1.0))
    assert len(cache) == 1
    assert cache.current_bytes == 20
    got = cache.get(k)
    assert got is not None and got[0].item() == 1.0


def test_oversize_entry_not_stored() -> None:
    cache = ImageEmbeddingCache(max_bytes=100)
    small, big = _key("small"), _key("big")
    cache.put(small, _t(10))
    assert cache.put(big, _t(26)) is False  # 104 bytes > 100
    assert big not in cache
    assert small in cache  # nothing was evicted for it
    assert cache.evictions == 0
    assert cache.current_bytes == 40


def test_zero_budget_disables_cache() -> None:
    cache = ImageEmbeddingCache(max_bytes=0)
    calls = []
    for _ in range(2):
        cache.get_or_compute(_key("a"), lambda: calls.append(1) or _t(4))
    assert len(calls) == 2 and len(cache) == 0


def test_get_or_compute_and_clear() -> None:
    cache = ImageEmbeddingCache()
    calls: list[int] = []

    def compute() -> torch.Tensor:
        calls.append(1)
        return _t(8, 3.0)

    k = _key("a")
    first = cache.get_or_compute(k, compute)
    second = cache.get_or_compute(k, compute)
    assert first is second and len(calls) == 1
    assert (cache.hits, cache.misses) == (1, 1)
    cache.clear()
    assert len(cache) == 0 and cache.current_bytes == 0
    cache.get_or_compute(k, compute)
    assert len(calls) == 2


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        ImageEmbeddingCache(max_bytes=-1)
    with pytest.raises(TypeError):
        ImageEmbeddingCache().put(_key("a"), [1, 2, 3])  # type: ignore[arg-type]


def test_thread_safety_smoke() -> None:
    """Threads hammering get_or_compute on overlapping keys: values stay correct, bytes stay bounded."""
    cache = ImageEmbeddingCache(max_bytes=40 * 6)  # 6 of the 10 keys fit
    keys = [_key(str(i)) for i in range(10)]
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(tid: int) -> None:
        try:
            start.wait()
            for step in range(300):
                i = (tid * 7 + step * 3) % len(keys)
                value = cache.get_or_compute(keys[i], lambda i=i: _t(10, float(i)))
                assert value.shape == (10,) and value[0].item() == float(i)
                assert cache.current_bytes <= cache.max_bytes
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    stats = cache.stats()
    assert stats["hits"] + stats["misses"] == 8 * 300
    assert stats["current_bytes"] == 40 * stats["entries"] <= cache.max_bytes
    assert stats["evictions"] > 0


# ----------------------------------------------------------------------------------------------------
# The shared BytesLRU (also behind the prefix KV cache)
# ----------------------------------------------------------------------------------------------------
def test_embedding_cache_is_a_bytes_lru() -> None:
    from hd4k_tools.runtime.lru import BytesLRU

    assert isinstance(ImageEmbeddingCache(), BytesLRU)


def test_bytes_lru_with_a_custom_size() -> None:
    from hd4k_tools.runtime.lru import BytesLRU

    cache: BytesLRU[str] = BytesLRU(10, len)
    assert cache.put("a", "xxxx") and cache.put("b", "yyyy")
    assert cache.put("c", "zzzz")  # 12 > 10: the least recent ("a") goes
    assert cache.keys() == ["b", "c"] and cache.current_bytes == 8
    assert cache.get_or_compute("d", lambda: "ww") == "ww"
    assert cache.fits(10) and not cache.fits(11)
    assert cache.put("e", "e" * 11) is False
    with pytest.raises(ValueError, match="sizeof"):
        BytesLRU(10, lambda v: -1).put("a", "x")


def test_touch_refreshes_and_counts_a_hit_but_never_a_miss() -> None:
    cache = ImageEmbeddingCache(max_bytes=80)
    a, b, c = _key("a"), _key("b"), _key("c")
    cache.put(a, _t(10))
    cache.put(b, _t(10))
    assert cache.touch(a) is True  # a becomes most recent
    assert cache.touch(c) is False  # absent: no miss counted
    assert (cache.hits, cache.misses) == (1, 0)
    cache.put(c, _t(10))  # evicts b, the least recent
    assert cache.keys() == [a, c]
