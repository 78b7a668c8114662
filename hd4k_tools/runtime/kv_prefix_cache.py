"""A prefix KV cache: the decoder's keys/values for the part of a prompt that ends right after its last image.

An agent asks several questions about one page. In both prompt layouts the images come before the
question (docs/model.md §4):

* eval layout: ``<s>`` + IMAGE + ``[UNUSED_TOKEN_146]user\\n{question}…``;
* chat layout (``LocalRunner.prompt_text`` for ``Message.user(image, question)``):
  ``<s>[UNUSED_TOKEN_146]system\\n{meta}[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]user\\n`` + IMAGE +
  ``<s>{question}[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\n``.

So a follow-up question shares every position up to the end of the last image — thousands of image
tokens — with the first one. The embedding cache only saves the vision tower; this cache saves the
decoder prefill over that prefix too: on a hit the generation starts from a KV cache holding the prefix
(:func:`hd4k_tools.runtime.generation.generate` ``prefix=``) and prefills only the question.

**Why this is exact.** Attention is causal (docs/model.md §3.3): the keys/values of positions ``< P`` are functions
of the inputs at positions ``< P`` alone, never of later tokens, so they are the same whatever question
follows. RoPE depends only on absolute positions, which the prefix fixes. Partial LoRA (docs/model.md §3.2) applies
at the image positions, all of which lie inside the prefix, exactly as in a full prefill; the suffix is
text only. The cached K/V therefore equal those a full prefill computes (up to floating-point summation
order of kernels run on a different number of rows: logits agree to ~1e-6 in fp32).

**Key.** Everything that determines the prefix's inputs: the token ids of the text parts before each image
(which also fix the layout: system prompt, BOS placement), each image's content hash and ``hd_num`` (which
fix its embeddings and token count), and the dtype/device the model ran in. One cache serves one model:
the key does not name the weights.

**Value.** :class:`~hd4k_tools.models.xcomposer2_4khd.kv_cache.KVPrefix`, ``k, v [n_layers, 1, n_kv, P,
head_dim]``, on the model's device. Entries are large (7B in bf16: 128 KiB per position, ~200 MB for an
HD-9 image, ~1.1 GB for HD-55), so the cache is bounded in bytes like the embedding cache (same
:class:`~hd4k_tools.runtime.lru.BytesLRU`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

# The family gives the tokenisation of text parts that assemble_inputs uses (so both always agree).
from hd4k_tools.models.registry import DEFAULT_FAMILY, KVCache, KVPrefix, ModelFamily, PromptInputs, PromptTokenizer
from hd4k_tools.runtime.lru import BytesLRU

__all__ = ["PrefixKVCache", "PrefixKey", "PromptSplit", "split_at_last_image", "suffix_inputs"]


@dataclass(frozen=True)
class PrefixKey:
    """What determines the K/V of a prompt prefix that ends right after its last image."""

    text_ids: tuple[tuple[int, ...], ...]
    """Token ids of the text part before each image (one tuple per image, possibly empty)."""
    images: tuple[tuple[str, int], ...]
    """``(content hash, hd_num)`` of each image, in prompt order."""
    dtype: str
    device: str


@dataclass(frozen=True)
class PromptSplit:
    """A prompt with images, cut right after its last image (see :func:`split_at_last_image`)."""

    prefix_text_ids: tuple[tuple[int, ...], ...]
    """Token ids of the text parts before each image."""
    image_token_counts: tuple[int, ...]
    prefix_length: int
    """``P``: text tokens before the last image's end + every image's tokens."""
    suffix_ids: tuple[int, ...]
    """Token ids after the last image (never empty)."""

    @property
    def total_length(self) -> int:
        """The whole prompt's length (equals ``assemble_inputs(...).length``)."""
        return self.prefix_length + len(self.suffix_ids)

    def key(self, images: Sequence[tuple[str, int]], dtype: torch.dtype | str, device: torch.device | str) -> PrefixKey:
        """The cache key for this prefix with the given ``(content hash, hd_num)`` per image."""
        if len(images) != len(self.image_token_counts):
            raise ValueError(f"{len(images)} image keys for a prompt with {len(self.image_token_counts)} images")
        return PrefixKey(
            self.prefix_text_ids,
            tuple((str(h), int(n)) for h, n in images),
            str(dtype),
            str(torch.device(device)),
        )


def split_at_last_image(
    tokenizer: PromptTokenizer,
    prompt: str,
    image_token_counts: Sequence[int],
    *,
    bos_each_part: bool = True,
    family: ModelFamily = DEFAULT_FAMILY,
) -> PromptSplit | None:
    """Cut ``prompt`` (with one ``<ImageHere>`` per image) right after its last image.

    Tokenises the text parts exactly as :func:`~hd4k_tools.models.xcomposer2_4khd.prompt.assemble_inputs`
    does, without any embedding. Returns ``None`` when there is nothing to cache: no image, or no token
    after the last image (the prefill must produce the last prompt position's logits, which a cached
    prefix does not hold).
    """
    if not image_token_counts:
        return None
    part_ids = family.prefix_parts(tokenizer, prompt, len(image_token_counts), bos_each_part)
    suffix = tuple(part_ids[-1])
    if not suffix:
        return None
    before = tuple(tuple(ids) for ids in part_ids[:-1])
    counts = tuple(int(n) for n in image_token_counts)
    return PromptSplit(before, counts, sum(len(ids) for ids in before) + sum(counts), suffix)


def suffix_inputs(model: torch.nn.Module, split: PromptSplit) -> PromptInputs:
    """The prompt after the prefix as :class:`PromptInputs` (positions ``P..``; text only, ``im_mask``
    all ``False``): what :func:`~hd4k_tools.runtime.generation.generate` prefills on a prefix hit."""
    device = next(model.parameters()).device
    ids = torch.tensor(split.suffix_ids, dtype=torch.long, device=device)  # [T_s]
    with torch.no_grad():
        embeds = model.embed_tokens(ids).unsqueeze(0)  # [T_s, D] -> [1, T_s, D]
    n = len(split.suffix_ids)
    return PromptInputs(
        inputs_embeds=embeds,
        im_mask=torch.zeros(1, n, dtype=torch.bool, device=device),  # [1, T_s]
        input_ids=ids.unsqueeze(0),  # [1, T_s]
        num_text_tokens=n,
        num_image_tokens=0,
        length=n,
        num_images=0,
    )


def _prefix_nbytes(prefix: KVPrefix) -> int:
    return prefix.nbytes()


class PrefixKVCache(BytesLRU[KVPrefix]):
    """LRU map :class:`PrefixKey` → :class:`KVPrefix`, bounded by ``max_bytes`` of K/V data.

    ``get`` / ``put`` / ``stats`` / ``clear`` as in :class:`~hd4k_tools.runtime.lru.BytesLRU` (hits, misses,
    evictions counted); :meth:`capture` builds the ``on_prefill`` hook that stores a prefix after a
    generation's prefill. ``max_bytes=0`` disables it.
    """

    def __init__(self, max_bytes: int = 2 << 30) -> None:
        super().__init__(max_bytes, _prefix_nbytes)

    def put(self, key: Hashable, value: KVPrefix) -> bool:
        """Store ``value`` under ``key`` (``False`` if larger than the whole budget)."""
        if not isinstance(value, KVPrefix):
            raise TypeError(f"PrefixKVCache stores KVPrefix values, got {type(value).__name__}")
        return super().put(key, value)

    def capture(self, key: PrefixKey, length: int) -> Callable[[KVCache], None]:
        """An ``on_prefill`` hook for :func:`~hd4k_tools.runtime.generation.generate`: after the prompt prefill it
        copies positions ``[:length]`` of the call's KV cache and stores them under ``key``.

        Nothing is copied when the copy could not be stored anyway (larger than ``max_bytes``). The copy
        happens before the first token is decoded, so a generation cancelled later still leaves it here.
        """

        def on_prefill(cache: KVCache) -> None:
            n_layers, _, n_kv, _, head_dim = cache.k.shape
            if not self.fits(2 * n_layers * n_kv * length * head_dim * cache.k.element_size()):
                return
            self.put(key, cache.snapshot(length))

        return on_prefill
