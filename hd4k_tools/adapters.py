"""The adapter kit every framework integration shares (LangChain, LlamaIndex, and any other host).

Framework-neutral, and it never imports a framework: each integration converts its own message and
document types, then leans on these helpers for the parts that must behave the same everywhere:

- :func:`as_hd4k`: accept an :class:`~hd4k_tools.hd4k.HD4K` or a bare ``Runner``;
- :func:`assemble_messages` / :func:`tool_result_parts`: role mapping into :class:`Message` turns;
- :func:`count_message_tokens`: prompt tokens of a conversation, images included (from the plans);
- :func:`filter_stream` (over :class:`~hd4k_tools.runtime.stops.StopFilter`): streamed deltas that join
  to the non-streamed answer, cut at stop strings;
- :func:`run_cancellable`: async calls whose cancellation stops the model at the next token;
- :func:`select_document_pages` / :func:`page_metadata`: which pages of a source to read, checked
  against the page limit before anything is transcribed, and the page fields loaders report.

Structured output (constrained decoding, validation, one retry) lives in :mod:`hd4k_tools.structured`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from PIL import Image

from hd4k_tools.errors import InputError
from hd4k_tools.hd4k import HD4K, _in_thread
from hd4k_tools.inputs.images import ImageSource, SourceBytes, read_source_bytes
from hd4k_tools.inputs.pdf import PageSpec, page_count, page_labels, select_pages
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.models.registry import IMAGE_PLACEHOLDER, PromptTokenizer
from hd4k_tools.runtime.runner import Message, Runner
from hd4k_tools.runtime.stops import StopFilter

T = TypeVar("T")
Role = Literal["system", "user", "assistant", "tool"]
Part = str | Image.Image

__all__ = [
    "DocumentPages",
    "StopFilter",
    "as_hd4k",
    "assemble_messages",
    "count_message_tokens",
    "filter_stream",
    "page_metadata",
    "run_cancellable",
    "select_document_pages",
    "tool_result_parts",
]


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------
def as_hd4k(obj: Any, *, what: str = "hd") -> HD4K:
    """``obj`` as an :class:`HD4K`: returned as is, or a ``Runner`` wrapped in one.

    Raises:
        TypeError: anything else (the message says how to build one).
    """
    if isinstance(obj, HD4K):
        return obj
    if isinstance(obj, Runner):
        return HD4K(obj)
    raise TypeError(
        f"{what} must be an hd4k_tools.HD4K (or a Runner), got {type(obj).__name__}; build one with "
        "HD4K.from_pretrained(path) or HD4K.remote(url)."
    )


# ----------------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------------
def tool_result_parts(name: str | None, parts: Sequence[Part]) -> list[Part]:
    """A tool result as user-turn parts: the model has no tool role, so the result is introduced in text."""
    prefix = f"Result of the tool {name}:\n" if name else "Tool result:\n"
    return [prefix, *parts]


def assemble_messages(turns: Iterable[tuple[Role, Sequence[Part]]]) -> list[Message]:
    """Framework turns as :class:`Message` objects, the same way for every integration.

    System texts are joined into one leading system message (a system image is refused); ``tool`` turns
    become user turns introduced by :func:`tool_result_parts` (give them their parts already prefixed,
    or use the role ``"tool"`` for an unnamed result); adjacent text parts of one turn are joined with a
    newline (unless the first already ends with one); empty user turns are dropped, empty assistant turns
    kept (dropping one would merge the user turns around it).
    """
    system: list[str] = []
    out: list[Message] = []
    for role, parts in turns:
        if role == "tool":
            role, parts = "user", tool_result_parts(None, parts)
        merged: list[Part] = []
        for part in parts:
            if isinstance(part, str):
                if not part:
                    continue
                if merged and isinstance(merged[-1], str):
                    separator = "" if merged[-1].endswith("\n") else "\n"
                    merged[-1] = merged[-1] + separator + part
                    continue
            merged.append(part)
        if role == "system":
            if any(not isinstance(p, str) for p in merged):
                raise InputError("A system message cannot hold images; put them in a user message.")
            system.extend(p for p in merged if isinstance(p, str))
            continue
        if role not in ("user", "assistant"):
            raise InputError(f"Unsupported message role {role!r}; use system, user, assistant or tool.")
        if not merged and role == "user":
            continue
        out.append(Message(role, tuple(merged)))
    if system:
        out.insert(0, Message("system", ("\n\n".join(system),)))
    return out


def count_message_tokens(
    hd: HD4K, messages: Sequence[Message], hd_num: Any = None, generation: Mapping[str, Any] | None = None
) -> int:
    """Prompt tokens of ``messages``: text counted with the model's tokenizer (InternLM2's in process; a
    server-side runner estimates), plus the image tokens of each image's HD-N plan at ``hd_num``.

    The count follows the chat layout (meta instruction, turn markers, a BOS before every text part); the
    conversation may end with any role, so ``trim_messages``-style callers can count partial histories.
    """
    images = [img for m in messages for img in m.images]
    # The plans of a chat request at this hd_num ("auto" depends on the answer length, hence generation).
    plans = hd.build_request(messages, hd_num=hd_num, generation=generation).plans() if images else []
    image_tokens = [p.num_tokens for p in plans]
    family = hd.family
    prompt = family.partial_conversation_prompt(messages)
    tokenizer = getattr(hd.runner, "tokenizer", None)
    if isinstance(tokenizer, PromptTokenizer):
        return family.count_prompt_tokens(tokenizer, prompt, image_tokens, bos_each_part=True)
    text = prompt.replace(IMAGE_PLACEHOLDER, "")
    return hd.runner.count_text_tokens(text) + sum(image_tokens)


# ----------------------------------------------------------------------------------------------------
# Streams and cancellation
# ----------------------------------------------------------------------------------------------------
def filter_stream(deltas: Iterable[str], stops: Sequence[str] = ()) -> Iterator[str]:
    """The answer's deltas from raw model deltas: leading and trailing whitespace as in the non-streamed
    answer, cut before the first stop string (the iteration over ``deltas`` ends right there, so a
    generator source stops generating). Joined, they equal :func:`~hd4k_tools.runtime.stops.cut_at_stops`."""
    cleaner = StopFilter(stops)
    for delta in deltas:
        piece = cleaner.feed(delta)
        if piece:
            yield piece
        if cleaner.stopped:
            return
    tail = cleaner.finish()
    if tail:
        yield tail


async def run_cancellable(call: Callable[[threading.Event], T]) -> T:
    """Await ``call(cancel)`` in a worker thread; cancelling the awaiting task sets ``cancel``, so the
    model stops at its next token instead of running on unseen (the same path as ``HD4K.a*`` methods)."""
    return await _in_thread(call)


# ----------------------------------------------------------------------------------------------------
# Documents
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DocumentPages:
    """A source read once, and the pages of it to transcribe.

    Attributes:
        name: where it came from (path, ``"<bytes>"``...).
        data: its bytes (pass them to ``HD4K.read_document`` page by page).
        is_pdf: a PDF (else a single image).
        indices: 0-based pages selected, in order (``[0]`` for an image).
        labels: each selected page's printed label (its 1-based number when the PDF has no labels).
        total_pages: pages in the document (1 for an image).
    """

    name: str
    data: bytes
    is_pdf: bool
    indices: tuple[int, ...]
    labels: tuple[str, ...]
    total_pages: int

    def pages(self) -> Iterator[tuple[int, int | None, str]]:
        """(0-based index, 1-based page to pass as ``pages=`` or ``None`` for an image, label) per page."""
        for index, label in zip(self.indices, self.labels, strict=True):
            yield index, (index + 1 if self.is_pdf else None), label


def select_document_pages(
    source: ImageSource | SourceBytes,
    pages: PageSpec = None,
    *,
    policy: ImagePolicy,
    max_pages: int,
) -> DocumentPages:
    """Read ``source`` under ``policy`` and select its pages with the core's rules
    (:func:`hd4k_tools.inputs.pdf.select_pages`): the selection is validated against the page count and
    ``max_pages`` before any page is transcribed, with the same errors as ``HD4K.read_document``.

    Raises:
        PageRangeError, PDFError (too many pages selected), InputError (a page selection for an image),
        and the input errors of :func:`~hd4k_tools.inputs.images.read_source_bytes`.
    """
    raw = source if isinstance(source, SourceBytes) else read_source_bytes(source, policy=policy)
    if raw.kind != "pdf":
        if pages not in (None, 1, "1", [1], (1,)):
            raise InputError(f"pages={pages!r} was given but {raw.name} is a single image, not a PDF.")
        return DocumentPages(raw.name, raw.data, False, (0,), ("1",), 1)
    indices = select_pages(raw, pages, policy=policy, max_pages=max_pages)
    labels = page_labels(raw, indices, policy=policy)
    return DocumentPages(raw.name, raw.data, True, tuple(indices), tuple(labels), page_count(raw, policy=policy))


def page_metadata(index: int, label: str, total_pages: int) -> dict[str, Any]:
    """The page fields of a loaded document, as LangChain's PDF loaders write them: ``page`` (0-based),
    ``page_label`` (the printed label) and ``total_pages``."""
    return {"page": index, "page_label": label, "total_pages": total_pages}
