"""A byte-bounded LRU cache of vision-tower outputs.

Running CLIP ViT-L over up to 56 crops (HD-55) dominates the time to first token for a question about
an image. An agent typically asks several questions about the same page, so the runner keeps the
projected image embeddings ``[L, D]`` of recent images here, keyed by what determines them: the image
content, the HD-N budget, and the dtype/device the vision tower ran in.

The cache is bounded by the total bytes of the stored tensors (not by the number of entries: one HD-55
embedding in bf16 is ~67 MB, one HD-1 embedding ~2.5 MB). It is thread-safe; the value computation in
:meth:`ImageEmbeddingCache.get_or_compute` runs outside the lock so that a slow vision pass does not block
readers of other entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hd4k_tools.runtime.lru import BytesLRU

__all__ = ["EmbeddingCacheKey", "ImageEmbeddingCache", "cache_key", "tensor_nbytes"]


@dataclass(frozen=True)
class EmbeddingCacheKey:
    """What determines a vision output: the image content, ``hd_num``, and the dtype/device it ran in."""

    image_hash: str
    hd_num: int
    dtype: str
    device: str


def cache_key(image_hash: str, hd_num: int, dtype: torch.dtype | str, device: torch.device | str) -> EmbeddingCacheKey:
    """Build a cache key; ``dtype`` and ``device`` are normalised to strings (``"torch.bfloat16"``, ``"cuda:0"``).

    ``image_hash`` is a content hash of the decoded image (``hd4k_tools.inputs.images.image_content_hash``), so the
    same picture read from a path, bytes or a data URL shares one entry.
    """
    if not isinstance(hd_num, int) or isinstance(hd_num, bool) or hd_num < 1:
        raise ValueError(f"hd_num must be a positive int (the resolved HD-N budget), got {hd_num!r}")
    return EmbeddingCacheKey(str(image_hash), hd_num, str(dtype), str(torch.device(device)))


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes held by ``tensor``'s elements (what the cache budget counts)."""
    return tensor.numel() * tensor.element_size()


class ImageEmbeddingCache(BytesLRU[torch.Tensor]):
    """LRU map ``key -> Tensor`` bounded by ``max_bytes`` of tensor data (a :class:`~hd4k_tools.runtime.lru.BytesLRU`).

    * ``get`` marks an entry most-recently used; ``put`` inserts (or replaces) and evicts
      least-recently-used entries until the total fits.
    * An entry larger than the whole budget is not stored (``put`` returns ``False``); storing it would
      evict everything else and then itself.
    * Tensors are stored as given (no copy); callers must not modify a returned tensor in place.
    * ``max_bytes=0`` disables caching (every lookup misses, nothing is stored).
    """

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        super().__init__(max_bytes, tensor_nbytes)

    def put(self, key: Any, tensor: torch.Tensor) -> bool:
        """Store ``tensor`` under ``key``; returns whether it was stored (``False`` if over the budget)."""
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"ImageEmbeddingCache stores tensors, got {type(tensor).__name__}")
        return super().put(key, tensor)

    def get_or_compute(self, key: Any, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Return the cached tensor or compute it with ``fn()`` (outside the lock) and store it.

        Two threads missing the same key at once may both compute it; the second ``put`` replaces the
        first with an equal value. That wastes one vision pass in a rare race but never blocks other keys.
        """
        return super().get_or_compute(key, fn)
