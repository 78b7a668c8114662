"""Prompt assembly for the decoder: text embeddings and image embeddings interleaved, with ``im_mask``
marking exactly the image positions (which switches Partial LoRA on, docs/model.md §3.2).

The prompt *string* and its token counting are torch-free and live in
:mod:`hd4k_tools.models.xcomposer2_4khd.prompt`; this module turns them into tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from hd4k_tools.errors import InputError
from hd4k_tools.models.xcomposer2_4khd.prompt import (
    PromptTokenizer,
    overflow_error,
    split_prompt,
    text_part_ids,
)

__all__ = ["PromptInputs", "assemble_inputs"]


class _Embedder(Protocol):
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class PromptInputs:
    """A prompt ready for the decoder.

    ``inputs_embeds`` ``[1, T, D]``; ``im_mask`` ``[1, T]`` bool, True exactly at image positions;
    ``input_ids`` ``[1, T]`` long: the text token ids, ``-1`` at image positions (bookkeeping only, the
    model consumes the embeddings). ``length == T == num_text_tokens + num_image_tokens``.
    """

    inputs_embeds: torch.Tensor
    im_mask: torch.Tensor
    input_ids: torch.Tensor
    num_text_tokens: int
    num_image_tokens: int
    length: int
    num_images: int = 0


def _embedding_device(model: object) -> torch.device:
    """Device of the model's weights (token ids must live there for the embedding lookup)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


def _interleave(
    part_ids: Sequence[Sequence[int]],
    ids_tensor: torch.Tensor,
    text_embeds: torch.Tensor,
    image_embeds: Sequence[torch.Tensor],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(inputs_embeds [1, T, D], im_mask [1, T], input_ids [1, T])``: the text parts and the images in
    turn, image positions marked in the mask and given id -1."""
    dtype = text_embeds.dtype
    chunks: list[torch.Tensor] = []
    mask_chunks: list[torch.Tensor] = []
    id_chunks: list[torch.Tensor] = []
    offset = 0
    for idx, ids in enumerate(part_ids):
        if ids:
            chunks.append(text_embeds[offset : offset + len(ids)])  # [n_i, D]
            mask_chunks.append(torch.zeros(len(ids), dtype=torch.bool, device=device))
            id_chunks.append(ids_tensor[offset : offset + len(ids)])
            offset += len(ids)
        if idx < len(image_embeds):
            emb = image_embeds[idx].to(device=device, dtype=dtype)  # [L_i, D]
            chunks.append(emb)
            mask_chunks.append(torch.ones(emb.shape[0], dtype=torch.bool, device=device))
            id_chunks.append(torch.full((emb.shape[0],), -1, dtype=torch.long, device=device))
    inputs_embeds = torch.cat(chunks, dim=0).unsqueeze(0)  # [1, T, D]
    im_mask = torch.cat(mask_chunks).unsqueeze(0)  # [1, T]
    input_ids = torch.cat(id_chunks).unsqueeze(0)  # [1, T]
    return inputs_embeds, im_mask, input_ids


def assemble_inputs(
    model: _Embedder,
    tokenizer: PromptTokenizer,
    prompt: str,
    image_embeds: Sequence[torch.Tensor],
    *,
    max_length: int,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    hd_num: int | None = None,
    bos_each_part: bool = True,
) -> PromptInputs:
    """Interleave text and image embeddings as the official chat does (docs/model.md §4).

    ``image_embeds[i]`` ``[L_i, D]`` are the projected vision outputs (``model.encode_image``), in
    placeholder order. Raises :class:`InputError` if the placeholder count differs from the number of
    images, and :class:`ContextOverflowError` if the prompt is longer than ``max_length`` (see
    :func:`check_context` for ``image_sizes``/``hd_num``, which only improve the message).
    """
    parts = split_prompt(prompt, len(image_embeds))
    for i, emb in enumerate(image_embeds):
        if emb.dim() != 2:
            raise ValueError(f"image_embeds[{i}] must be [L, D] (one image's vision output), got {tuple(emb.shape)}")
    part_ids = text_part_ids(tokenizer, parts, bos_each_part)
    num_text = sum(len(ids) for ids in part_ids)
    image_counts = [int(e.shape[0]) for e in image_embeds]
    total = num_text + sum(image_counts)
    if total == 0:
        raise InputError("The prompt is empty: give a question or at least one image.")
    if total > max_length:
        raise overflow_error(
            total=total,
            num_text=num_text,
            image_token_counts=image_counts,
            max_length=max_length,
            image_sizes=image_sizes,
            hd_num=hd_num,
        )

    with torch.no_grad():
        device = _embedding_device(model)
        ids_tensor = torch.tensor([t for ids in part_ids for t in ids], dtype=torch.long, device=device)
        text_embeds = model.embed_tokens(ids_tensor)  # [T_text, D]
        dim = text_embeds.shape[-1]
        for i, emb in enumerate(image_embeds):
            if emb.shape[-1] != dim:
                raise ValueError(f"image_embeds[{i}] has width {emb.shape[-1]} but the text embeddings have {dim}")

        inputs_embeds, im_mask, input_ids = _interleave(part_ids, ids_tensor, text_embeds, image_embeds, device)
    return PromptInputs(
        inputs_embeds=inputs_embeds,
        im_mask=im_mask,
        input_ids=input_ids,
        num_text_tokens=num_text,
        num_image_tokens=sum(image_counts),
        length=total,
        num_images=len(image_embeds),
    )
