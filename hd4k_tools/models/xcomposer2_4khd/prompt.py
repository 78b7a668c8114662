"""The IXC2-4KHD chat format and prompt assembly (text embeddings + image embeddings + ``im_mask``).

docs/model.md §4: the official ``chat()`` builds a string of
``[UNUSED_TOKEN_146]role\\n…[UNUSED_TOKEN_145]\\n`` turns with a literal ``<ImageHere>`` placeholder
per image, splits it on the placeholder, tokenises every non-empty text part **with BOS** (the
"quirk"), puts each image's projected embeddings between the parts and marks exactly the image
positions in ``im_mask`` (which switches Partial LoRA on, docs/model.md §3.2).

Two deliberate differences from the official code:

* the official wrapper silently truncates the embeddings to ``config.max_length``; we raise
  :class:`~hd4k_tools.errors.ContextOverflowError` instead, naming the largest ``hd_num`` that fits;
* :func:`count_prompt_tokens` lets callers check the budget *before* running the vision tower.

No token id is hard-coded here: ids come from the tokenizer (``bos_id``, ``im_start_id``,
``im_end_id``); the turn markers are the token *strings* of the format.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, Protocol, runtime_checkable

from hd4k_tools.errors import ContextOverflowError, InputError
from hd4k_tools.models.xcomposer2_4khd.special_tokens import IM_END, IM_START, IMAGE_PLACEHOLDER, RESERVED_STRINGS
from hd4k_tools.models.xcomposer2_4khd.tiling import plan

__all__ = [
    "DEFAULT_META_INSTRUCTION",
    "IMAGE_PLACEHOLDER",
    "IM_END",
    "IM_START",
    "ConversationTurn",
    "Layout",
    "PromptTokenizer",
    "build_eval_prompt",
    "build_prompt",
    "check_context",
    "check_encodable",
    "check_untrusted_text",
    "conversation_prompt",
    "count_prompt_tokens",
    "largest_fitting_hd_num",
    "overflow_error",
    "split_prompt",
    "text_part_ids",
    "with_part_bos",
]


# "chat": the official chat() layout (meta instruction, images inside the user turn, BOS before every text
# part). "eval": the authors' evaluation layout (BOS, the images, then the user turn, no system prompt).
Layout = Literal["chat", "eval"]
# IM_START / IM_END are the tokenizer's turn-marker strings ("[UNUSED_TOKEN_146]" / "[UNUSED_TOKEN_145]",
# docs/model.md §4), each a single token; re-exported here for prompt builders.

# docs/model.md §4: the default meta instruction of the 4KHD/VL chat, lines joined with "\n", no trailing newline.
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


# ----------------------------------------------------------------------------------------------------
# Prompt strings
# ----------------------------------------------------------------------------------------------------
def build_prompt(
    query: str,
    *,
    history: Sequence[tuple[str, str]] = (),
    meta_instruction: str = DEFAULT_META_INSTRUCTION,
) -> str:
    """The official chat prompt string (docs/model.md §4).

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


class ConversationTurn(Protocol):
    """A turn as the runtime holds it (``hd4k_tools.runtime.runner.Message``): a role and parts that are
    either text (``str``) or an image (anything else)."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> Sequence[object]: ...


def check_untrusted_text(role: str, text: str) -> None:
    """Refuse text that would change the prompt's structure: a literal ``<ImageHere>`` (it would take an
    image's place), any special token string (``[UNUSED_TOKEN_146]``, ``[UNUSED_TOKEN_145]``, ``<s>``,
    ``</s>``, ``<unk>``: they would become real control tokens and forge turns) and lone UTF-16
    surrogates (not text; the tokenizer cannot encode them). Every message's text is untrusted,
    including system and assistant turns that come from a request (docs/decisions.md)."""
    if not isinstance(text, str):
        raise InputError(f"The {role} text must be a str, got {type(text).__name__}.")
    if IMAGE_PLACEHOLDER in text:
        raise InputError(
            f"The {role} text contains {IMAGE_PLACEHOLDER}, which marks where an image goes in this "
            "model's prompt; pass images as image parts and remove the marker from the text."
        )
    found = [token for token in RESERVED_STRINGS if token in text]
    if found:
        raise InputError(
            f"The {role} text contains {', '.join(found)}, a special token of this model's prompt format "
            "that would act as a control token (e.g. start a forged turn); remove or rewrite it "
            "(e.g. put a space inside the brackets)."
        )
    check_encodable(role, text)


def check_encodable(role: str, text: str) -> None:
    """Refuse lone surrogates (``"\\ud800"``): they are not Unicode text and cannot be UTF-8 encoded."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(
            f"The {role} text contains {text[err.start : err.end]!r} at position {err.start}, a lone surrogate "
            "that is not valid Unicode text; fix the text's encoding."
        ) from None


def conversation_prompt(messages: Sequence[ConversationTurn], layout: Layout = "chat") -> str:
    """The prompt string of a conversation, one ``<ImageHere>`` per image, in ``layout``.

    ``"chat"``: the official ``chat()`` format; a first ``system`` message replaces the meta instruction,
    earlier turns become history (two user turns in a row are joined with a newline). ``"eval"``: the
    authors' evaluation format, only the last user turn: BOS, its images, then the turn (docs/model.md §4,
    VLMEvalKit). Every engine (native, vLLM) renders requests through this one function.
    """

    def is_text(part: object) -> bool:
        return isinstance(part, str)

    def render(m: ConversationTurn) -> str:
        return "".join(p if is_text(p) else IMAGE_PLACEHOLDER for p in m.content)  # type: ignore[misc]

    turns = list(messages)
    for m in turns:
        for part in m.content:
            if is_text(part):
                check_untrusted_text(m.role, part)  # type: ignore[arg-type]
    if not turns or turns[-1].role != "user":
        raise InputError("The conversation must end with a user message (the question to answer).")
    if layout == "eval":
        last = turns[-1]
        images = "".join(IMAGE_PLACEHOLDER for p in last.content if not is_text(p))
        text = "".join(p for p in last.content if is_text(p))  # type: ignore[misc]
        return images + build_prompt(text, meta_instruction="")
    meta = DEFAULT_META_INSTRUCTION
    if turns[0].role == "system":
        meta = "".join(p for p in turns.pop(0).content if is_text(p))  # type: ignore[misc]
    history: list[tuple[str, str]] = []
    pending_user: str | None = None
    for m in turns[:-1]:
        if m.role == "system":
            raise InputError("A system message is only allowed as the first message.")
        if m.role == "user":
            pending_user = render(m) if pending_user is None else pending_user + "\n" + render(m)
        else:
            history.append((pending_user or "", render(m)))
            pending_user = None
    query = render(turns[-1]) if pending_user is None else pending_user + "\n" + render(turns[-1])
    return build_prompt(query, history=history, meta_instruction=meta)


def prompt_text_tokens(
    count_text_tokens: Callable[[str], int], messages: Sequence[ConversationTurn], layout: Layout = "chat"
) -> int:
    """Text tokens of the prompt an engine renders for ``messages`` (BOS included, images excluded), counted
    with ``count_text_tokens`` (a runner's: exact for the native and vLLM engines, an over-estimate for a
    remote one). ``plan_images`` reserves this much for ``hd_num="auto"``, so an auto request fits.

    Matches :func:`check_context`: the parts between images are tokenised separately, with the BOS rule of
    ``layout`` (:func:`with_part_bos`).
    """
    parts = conversation_prompt(messages, layout).split(IMAGE_PLACEHOLDER)
    counts = [count_text_tokens(part) if part else 0 for part in parts]
    bos = sum(1 for n in counts if n) if layout == "chat" else 1
    return sum(counts) + bos


def partial_conversation_prompt(messages: Sequence[ConversationTurn]) -> str:
    """A conversation in the chat layout that may end with any role (for counting partial histories, e.g.
    ``trim_messages``): one ``<ImageHere>`` per image, and an open assistant turn after a final user turn,
    as in the prompt the model reads."""
    turns = list(messages)
    meta = DEFAULT_META_INSTRUCTION
    if turns and turns[0].role == "system":
        meta = "".join(p for p in turns.pop(0).content if isinstance(p, str))
    text = f"{IM_START}system\n{meta}{IM_END}\n" if meta else ""
    for m in turns:
        body = "".join(p if isinstance(p, str) else IMAGE_PLACEHOLDER for p in m.content)
        text += f"{IM_START}{m.role}\n{body}{IM_END}\n"
    if turns and turns[-1].role == "user":
        text += f"{IM_START}assistant\n"
    return text


def build_eval_prompt(prompt: str, *, num_images: int = 1) -> str:
    """The authors' evaluation layout (docs/model.md §4, VLMEvalKit/lmms-eval ``model_gen``): the images first,
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
    follows each image (docs/model.md §4 "Quirk", MindIE/PaddleMIX ports; ms-swift re-inserts it too).
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
    ``s*ceil(s/ratio) <= hd_num``, docs/model.md §1), so we scan upwards and stop at the first overflow.
    """
    if not image_sizes:
        return None
    best: int | None = None
    for n in range(1, max_hd_num + 1):
        if num_text_tokens + _image_tokens_at(image_sizes, n) > max_length:
            break
        best = n
    return best


def overflow_error(
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
        raise overflow_error(
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
