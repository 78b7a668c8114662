"""A thread-safe LRU map bounded by the bytes of its values.

Both model-side caches use it: :class:`~hd4k_tools.runtime.embedding_cache.ImageEmbeddingCache` (vision outputs
``[L, D]``) and :class:`~hd4k_tools.runtime.kv_prefix_cache.PrefixKVCache` (decoder K/V of a prompt prefix).
Their entries differ in size by orders of magnitude (an HD-1 embedding is ~2.5 MB in bf16, the K/V of an
HD-55 prompt prefix of the 7B model ~1.1 GB), so the bound is on bytes, not on the number of entries.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["BytesLRU"]

V = TypeVar("V")


class BytesLRU(Generic[V]):
    """LRU map ``key -> value`` bounded by ``max_bytes``, each value counted as ``sizeof(value)`` bytes.

    * :meth:`get` marks an entry most-recently used and counts a hit or a miss; :meth:`put` inserts (or
      replaces) and evicts least-recently-used entries until the total fits.
    * An entry larger than the whole budget is not stored (``put`` returns ``False``): storing it would
      evict everything else and then itself.
    * Values are stored as given (no copy); callers must not modify a returned value in place.
    * ``max_bytes=0`` disables caching (every lookup misses, nothing is stored).
    * Every method takes one lock; :meth:`get_or_compute` runs the computation outside it, so a slow
      computation never blocks readers of other entries.
    """

    def __init__(self, max_bytes: int, sizeof: Callable[[V], int]) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
        self.max_bytes = max_bytes
        self._sizeof = sizeof
        self._entries: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.current_bytes = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: object) -> bool:
        """Membership test that does not count as a hit or miss and does not touch the LRU order."""
        with self._lock:
            return key in self._entries

    def get(self, key: Hashable) -> V | None:
        """The cached value for ``key`` (now most-recently used), or ``None``; counts a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def touch(self, key: Hashable) -> bool:
        """Mark ``key`` most-recently used and count a hit if it is present; an absent key is *not* a miss.

        For a caller that found what it needed elsewhere but uses this entry's content indirectly and
        wants it kept warm (the runner on a prefix-cache hit: the image embeddings are baked into the
        cached K/V)."""
        with self._lock:
            if key not in self._entries:
                return False
            self._entries.move_to_end(key)
            self.hits += 1
            return True

    def put(self, key: Hashable, value: V) -> bool:
        """Store ``value`` under ``key``; returns whether it was stored (``False`` if ``sizeof(value)`` is
        larger than the budget — an older entry under ``key`` is dropped either way)."""
        nbytes = self._sizeof(value)
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise ValueError(f"sizeof must give a non-negative int, got {nbytes!r}")
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.current_bytes -= old[1]
            if nbytes > self.max_bytes:
                return False
            while self._entries and self.current_bytes + nbytes > self.max_bytes:
                _, (_, evicted_bytes) = self._entries.popitem(last=False)
                self.current_bytes -= evicted_bytes
                self.evictions += 1
            self._entries[key] = (value, nbytes)
            self.current_bytes += nbytes
            return True

    def fits(self, nbytes: int) -> bool:
        """Whether an entry of ``nbytes`` could be stored at all (to skip building one that cannot)."""
        return nbytes <= self.max_bytes

    def get_or_compute(self, key: Hashable, fn: Callable[[], V]) -> V:
        """The cached value, or ``fn()`` computed outside the lock and stored.

        Two threads missing the same key at once may both compute it; the second ``put`` replaces the
        first with an equal value. That wastes one computation in a rare race but never blocks other keys.
        """
        cached = self.get(key)
        if cached is not None:
            return cached
        value = fn()
        self.put(key, value)
        return value

    def stats(self) -> dict[str, int]:
        """Counters and sizes as a plain dict (for logs and the server's health endpoint)."""
        with self._lock:
            return {
                "entries": len(self._entries),
                "current_bytes": self.current_bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }

    def clear(self) -> None:
        """Drop every entry (the hit/miss/eviction counters are kept)."""
        with self._lock:
            self._entries.clear()
            self.current_bytes = 0

    def keys(self) -> list[Hashable]:
        """Keys from least- to most-recently used (a snapshot)."""
        with self._lock:
            return list(self._entries)
