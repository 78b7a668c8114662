"""The IXC2-4KHD chat format and prompt assembly (text embeddings + image embeddings + ``im_mask``).

Spec §4 (``shared/spec/ixc2_4khd.md``): the official ``chat()`` builds a string of
``[UNUSED_TOKEN_146]role\\n…[UNUSED_TOKEN_145]\\n`` turns with a literal ``<ImageHere>`` placeholder
per image, splits it on the placeholder, tokenises every non-empty text part **with BOS** (the
"quirk"), puts each image's projected embeddings between the parts and marks exactly the image
positions in ``im_mask`` (which switches Partial LoRA on, spec §3.2).

Two deliberate differences from the official code:

* the official wrapper silently truncates the embeddings to ``config.max_length``; we raise
  :class:`~hd4k_tools.errors.ContextOverflowError` instead, naming the largest ``hd_num`` that fits;
* :func:`count_prompt_tokens` lets callers check the budget *before* running the vision tower.

No token id is hard-coded here: ids come from the tokenizer (``bos_id``, ``im_start_id``,
``im_end_id``); the turn markers are the token *strings* of the format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from hd4k_tools.errors import ContextOverflowError, InputError
from hd4k_tools.models.xcomposer2_4khd.tokenizer import IM_END, IM_START

__all__ = [
    "DEFAULT_META_INSTRUCTION",
    "IMAGE_PLACEHOLDER",
    "IM_END",
    "IM_START",
    "PromptInputs",
    "PromptTokenizer",
    "assemble_inputs",
    "build_eval_prompt",
    "build_prompt",
    "check_context",
    "count_prompt_tokens",
    "largest_fitting_hd_num",
    "split_prompt",
    "text_part_ids",
    "with_part_bos",
]

IMAGE_PLACEHOLDER = "<ImageHere>"
# IM_START / IM_END are the tokenizer's turn-marker strings ("[UNUSED_TOKEN_146]" / "[UNUSED_TOKEN_145]",
# spec §4), each a single token; re-exported here for prompt builders.

# Spec §4: the default meta instruction of the 4KHD/VL chat, lines joined with "\n", no trailing newline.
DEFAULT_META_INSTRUCTION = "\n".join(
    [
        "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔).",
        "- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational language model that is developed "
        "by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, honest, and harmless.",
        "- InternLM-XComposer (浦语·灵笔) can understand and communicate fluently in the language chosen by "
        "the user such as English and 中文.",
        "- InternLM-XComposer (浦语·灵笔) is capable of comprehending and articulating responses effectively "
        "based on the provided image.",
    ]
)

# Upper bound of the hd_num search when the caller does not say which hd_num overflowed.
_MAX_SUGGESTED_HD_NUM = 100


@runtime_checkable
class PromptTokenizer(Protocol):
    """What prompt assembly needs from a tokenizer (``InternLM2Tokenizer`` provides it)."""

    @property
    def bos_id(self) -> int: ...

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...


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


# ----------------------------------------------------------------------------------------------------
# Prompt strings
# ----------------------------------------------------------------------------------------------------
def build_prompt(
    query: str,
    *,
    history: Sequence[tuple[str, str]] = (),
    meta_instruction: str = DEFAULT_META_INSTRUCTION,
) -> str:
    """The official chat prompt string (spec §4).

    ``[UNUSED_TOKEN_146]system\\n{meta}[UNUSED_TOKEN_145]\\n`` (only if ``meta_instruction`` is
    non-empty), then one user/assistant pair per ``history`` item, then the user turn with ``query`` and
    an open assistant turn. Images are ``<ImageHere>`` placeholders inside ``query`` (or history turns).
    """
    prompt = ""
    if meta_instruction:
        prompt += f"{IM_START}system\n{meta_instruction}{IM_END}\n"
    for user_turn, assistant_turn in history:
        prompt += f"{IM_START}user\n{user_turn}{IM_END}\n{IM_START}assistant\n{assistant_turn}{IM_END}\n"
    prompt += f"{IM_START}user\n{query}{IM_END}\n{IM_START}assistant\n"
    return prompt


def build_eval_prompt(prompt: str, *, num_images: int = 1) -> str:
    """The authors' evaluation layout (spec §4, VLMEvalKit/lmms-eval ``model_gen``): the images first,
    then the user turn, no system prompt. Assemble it with ``bos_each_part=False``, which gives
    ``<s>`` + IMAGE + ``[UNUSED_TOKEN_146]user\\n{prompt}[UNUSED_TOKEN_145]\\n[UNUSED_TOKEN_146]assistant\\n``.
    """
    return IMAGE_PLACEHOLDER * num_images + build_prompt(prompt, meta_instruction="")


def split_prompt(prompt: str, num_images: int) -> list[str]:
    """Split ``prompt`` on ``<ImageHere>``; there must be exactly one placeholder per image."""
    parts = prompt.split(IMAGE_PLACEHOLDER)
    if len(parts) != num_images + 1:
        raise InputError(
            f"The prompt has {len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) but {num_images} image(s) were "
            f"given; put exactly one {IMAGE_PLACEHOLDER} where each image belongs, in the same order."
        )
    return parts


def text_part_ids(tokenizer: PromptTokenizer, parts: Sequence[str], bos_each_part: bool) -> list[list[int]]:
    """Token ids of each text part (empty list for an empty part), BOS placed by :func:`with_part_bos`."""
    ids = [tokenizer.encode(part, add_bos=False) if part else [] for part in parts]
    return with_part_bos(ids, tokenizer.bos_id, bos_each_part)


def with_part_bos(part_ids: Sequence[Sequence[int]], bos_id: int, bos_each_part: bool) -> list[list[int]]:
    """The BOS rule on already tokenised text parts (ids without BOS; parts are separated by images).

    ``bos_each_part=True`` is the official chat: every NON-EMPTY part is tokenised with BOS, so a BOS
    follows each image (spec §4 "Quirk", MindIE/PaddleMIX ports; ms-swift re-inserts it too).
    ``bos_each_part=False`` is the evaluation layout: one BOS at the very start of the sequence (even
    if the first part is empty, i.e. the prompt starts with an image), no BOS elsewhere.
    Shared by the native prompt assembly and the vLLM processor, which rebuilds it on token ids.
    """
    out: list[list[int]] = []
    for i, ids in enumerate(part_ids):
        if bos_each_part:
            out.append([bos_id, *ids] if ids else [])
        else:
            out.append([bos_id, *ids] if i == 0 else list(ids))
    return out


# ----------------------------------------------------------------------------------------------------
# Token budget
# ----------------------------------------------------------------------------------------------------
def count_prompt_tokens(
    tokenizer: PromptTokenizer,
    prompt: str,
    image_token_counts: Sequence[int],
    *,
    bos_each_part: bool = True,
) -> int:
    """Total prompt length (text + image tokens) without running the vision tower.

    ``image_token_counts`` are the per-image token counts (``tiling.plan(w, h, hd_num).num_tokens``);
    the placeholder count is validated as in :func:`assemble_inputs`.
    """
    parts = split_prompt(prompt, len(image_token_counts))
    num_text = sum(len(ids) for ids in text_part_ids(tokenizer, parts, bos_each_part))
    return num_text + sum(int(n) for n in image_token_counts)


def _image_tokens_at(image_sizes: Sequence[tuple[int, int]], hd_num: int) -> int:
    from hd4k_tools.tiling import plan

    return sum(plan(int(w), int(h), hd_num).num_tokens for w, h in image_sizes)


def largest_fitting_hd_num(
    num_text_tokens: int,
    image_sizes: Sequence[tuple[int, int]],
    max_length: int,
    *,
    max_hd_num: int = _MAX_SUGGESTED_HD_NUM,
) -> int | None:
    """The largest ``hd_num`` in ``1..max_hd_num``, used for every image, such that the text tokens plus
    all images' tokens fit in ``max_length``; ``None`` if even ``hd_num=1`` does not fit.

    The token count of a plan never decreases with ``hd_num`` (the tile scale is the largest ``s`` with
    ``s*ceil(s/ratio) <= hd_num``, spec §1), so we scan upwards and stop at the first overflow.
    """
    if not image_sizes:
        return None
    best: int | None = None
    for n in range(1, max_hd_num + 1):
        if num_text_tokens + _image_tokens_at(image_sizes, n) > max_length:
            break
        best = n
    return best


def _overflow_error(
    *,
    total: int,
    num_text: int,
    image_token_counts: Sequence[int],
    max_length: int,
    image_sizes: Sequence[tuple[int, int]] | None,
    hd_num: int | None,
) -> ContextOverflowError:
    num_image = sum(image_token_counts)
    msg = (
        f"The prompt needs {total} tokens ({num_text} text + {num_image} image tokens for "
        f"{len(image_token_counts)} image(s)"
        + (f" at hd_num={hd_num}" if hd_num is not None else "")
        + f") but the model's context holds {max_length}."
    )
    suggestion: int | None = None
    if image_sizes:
        cap = hd_num - 1 if hd_num is not None and hd_num > 1 else _MAX_SUGGESTED_HD_NUM
        suggestion = largest_fitting_hd_num(num_text, image_sizes, max_length, max_hd_num=cap)
        if suggestion is not None:
            fit = num_text + _image_tokens_at(image_sizes, suggestion)
            msg += f" The largest hd_num that fits is {suggestion} ({fit} tokens); use hd_num={suggestion} or lower."
        else:
            msg += " Even hd_num=1 does not fit: shorten the text or send fewer images."
    elif num_image:
        msg += " Use a smaller hd_num (or hd_num='auto'), fewer images, or a shorter prompt."
    else:
        msg += " Shorten the prompt or the conversation history."
    err = ContextOverflowError(msg)
    # Structured fields for callers that retry programmatically.
    err.total_tokens = total  # type: ignore[attr-defined]
    err.max_length = max_length  # type: ignore[attr-defined]
    err.num_text_tokens = num_text  # type: ignore[attr-defined]
    err.num_image_tokens = num_image  # type: ignore[attr-defined]
    err.suggested_hd_num = suggestion  # type: ignore[attr-defined]
    return err


def check_context(
    tokenizer: PromptTokenizer,
    prompt: str,
    image_token_counts: Sequence[int],
    *,
    max_length: int,
    image_sizes: Sequence[tuple[int, int]] | None = None,
    hd_num: int | None = None,
    bos_each_part: bool = True,
) -> int:
    """:func:`count_prompt_tokens`, raising :class:`ContextOverflowError` if the total exceeds
    ``max_length``. Give ``image_sizes`` (``(width, height)`` per image) to get the largest fitting
    ``hd_num`` in the message (and as ``err.suggested_hd_num``); ``hd_num`` is the one that overflowed."""
    parts = split_prompt(prompt, len(image_token_counts))
    num_text = sum(len(ids) for ids in text_part_ids(tokenizer, parts, bos_each_part))
    total = num_text + sum(int(n) for n in image_token_counts)
    if total > max_length:
        raise _overflow_error(
            total=total,
            num_text=num_text,
            image_token_counts=[int(n) for n in image_token_counts],
            max_length=max_length,
            image_sizes=image_sizes,
            hd_num=hd_num,
        )
    return total


# ----------------------------------------------------------------------------------------------------
# Assembly
# ----------------------------------------------------------------------------------------------------
def _embedding_device(model: object) -> torch.device:
    """Device of the model's weights (token ids must live there for the embedding lookup)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        first = next(iter(params()), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


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
    """Interleave text and image embeddings as the official chat does (spec §4).

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
        raise _overflow_error(
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
        dim, dtype = text_embeds.shape[-1], text_embeds.dtype
        for i, emb in enumerate(image_embeds):
            if emb.shape[-1] != dim:
                raise ValueError(f"image_embeds[{i}] has width {emb.shape[-1]} but the text embeddings have {dim}")

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
    return PromptInputs(
        inputs_embeds=inputs_embeds,
        im_mask=im_mask,
        input_ids=input_ids,
        num_text_tokens=num_text,
        num_image_tokens=sum(image_counts),
        length=total,
        num_images=len(image_embeds),
    )
