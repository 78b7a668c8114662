"""``HD4KDocumentLoader``: transcribe document images and PDFs into LangChain ``Document``s."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Literal

from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

from hd4k_tools import HD4K, ImagePolicy, ImageSource, InputError, Runner, TaskResult, errors, read_source_bytes

PageSpec = int | str | Sequence[int] | None

_RANGE_PART = re.compile(r"^\s*(\d*)\s*(-?)\s*(\d*)\s*$")


def _parse_pages(spec: PageSpec) -> tuple[list[int], int | None]:
    """A 1-based page selection as (sorted explicit pages, first page of an open range or None).

    ``None``/``"all"`` is every page, ``3``, ``[1, 4]``, ``"1-3,5"``, ``"2-"`` (page 2 to the end),
    ``"-3"`` (pages 1 to 3). Whether the pages exist is checked when they are read.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("all", "*")):
        return [], 1
    if isinstance(spec, bool):
        raise InputError(f"pages={spec!r} is not a page selection; use e.g. 3, [1, 2] or '1-3,5'.")
    if isinstance(spec, int):
        numbers = [spec]
    elif isinstance(spec, str):
        numbers = []
        open_start: int | None = None
        for part in spec.split(","):
            match = _RANGE_PART.match(part)
            if (
                match is None
                or not (match.group(1) or match.group(3))
                or (match.group(1) and match.group(3) and not match.group(2))
            ):
                raise InputError(f"Cannot read {part.strip()!r} in pages={spec!r}; use e.g. '1-3,5' or '2-'.")
            start_text, dash, end_text = match.groups()
            start = int(start_text) if start_text else 1
            if dash and not end_text:
                open_start = start if open_start is None else min(open_start, start)
                continue
            end = int(end_text) if dash else start
            if start > end:
                raise InputError(f"The range {part.strip()!r} in pages={spec!r} runs backwards.")
            numbers.extend(range(start, end + 1))
        if any(n < 1 for n in numbers) or (open_start is not None and open_start < 1):
            raise InputError(f"pages={spec!r}: pages are numbered from 1.")
        explicit = sorted({n for n in numbers if open_start is None or n < open_start})
        return explicit, open_start
    elif isinstance(spec, Sequence) and spec and all(isinstance(p, int) and not isinstance(p, bool) for p in spec):
        numbers = list(spec)
    else:
        raise InputError(f"pages={spec!r} is not a page selection; use e.g. 3, [1, 2] or '1-3,5'.")
    if any(n < 1 for n in numbers):
        raise InputError(f"pages={spec!r}: pages are numbered from 1.")
    return sorted(set(numbers)), None


class HD4KDocumentLoader(BaseLoader):
    """Transcribe document images and PDFs with InternLM-XComposer2-4KHD, one ``Document`` per page.

    Pages are rendered and transcribed one at a time as :meth:`lazy_load` is consumed, so the first
    page is available before the last one is read and nothing is done for pages never asked for.
    Each ``Document`` holds the page's transcription as ``page_content`` and metadata: ``source``,
    ``page`` (1-based; 1 for an image), ``hd_num``, ``grid`` (tile rows x columns), token counts
    (``image_tokens``, ``input_tokens``, ``output_tokens``, ``tokens`` = input + output), ``model``
    and ``finish_reason`` — all flat values, so any vector store accepts them.

    Example:
        .. code-block:: python

            from hd4k_tools import HD4K
            from langchain_hd4k import HD4KDocumentLoader

            hd = HD4K.from_pretrained("internlm/internlm-xcomposer2-4khd-7b")
            docs = HD4KDocumentLoader(hd, "report.pdf", pages="1-3").load()
    """

    def __init__(
        self,
        hd: HD4K | Runner,
        source: ImageSource | Sequence[ImageSource],
        *,
        pages: PageSpec = None,
        dpi: int | None = None,
        hd_num: int | Literal["auto"] | None = None,
        output: Literal["markdown", "text"] = "markdown",
        generation: Mapping[str, Any] | None = None,
        policy: ImagePolicy | None = None,
    ) -> None:
        """Create a loader (nothing is read until :meth:`lazy_load` is consumed).

        Args:
            hd: the model (an :class:`hd4k_tools.HD4K`, or a ``Runner`` to wrap).
            source: one source or a list of them: paths, bytes, file objects, ``data:`` URLs, URLs
                (when ``policy`` allows) of images or PDFs.
            pages: PDF pages to read, 1-based (``3``, ``[1, 2]``, ``"1-3,5"``, ``"2-"``); ``None``
                reads every page. For an image only ``None`` or ``1`` make sense.
            dpi: PDF render resolution (default: the HD4K's, 200).
            hd_num: tiles per page (default 55 for documents; ``"auto"`` fits the context).
            output: ``"markdown"`` or ``"text"``.
            generation: generation options, e.g. ``{"max_new_tokens": 2048}``.
            policy: input limits (default: the HD4K's policy).
        """
        if isinstance(hd, HD4K):
            self.hd = hd
        elif isinstance(hd, Runner):
            self.hd = HD4K(hd)
        else:
            raise TypeError(f"hd must be an hd4k_tools.HD4K or a Runner, got {type(hd).__name__}")
        if isinstance(source, list | tuple):
            self.sources: list[ImageSource] = list(source)
        else:
            self.sources = [source]
        self.explicit_pages, self.open_from = _parse_pages(pages)
        self.pages = pages
        self.dpi = dpi
        self.hd_num = hd_num
        self.output = output
        self.generation = dict(generation) if generation else None
        self.policy = policy

    # -- helpers -------------------------------------------------------------------------------------
    def _options(self) -> dict[str, Any]:
        return {
            "hd_num": self.hd_num,
            "output": self.output,
            "dpi": self.dpi,
            "progress": False,
            "generation": self.generation,
            "policy": self.policy or self.hd.policy,
        }

    def _page_numbers(self) -> Iterator[tuple[int, bool]]:
        """(page number, whether it belongs to an open range that ends at the last page)."""
        for number in self.explicit_pages:
            yield number, False
        if self.open_from is not None:
            for number in itertools.count(self.open_from):
                yield number, number > self.open_from

    @staticmethod
    def _document(result: TaskResult, source: str) -> Document:
        plan = result.plan
        usage = result.usage
        metadata: dict[str, Any] = {
            "source": source,
            "page": result.page if result.page is not None else 1,
            "hd_num": result.hd_num,
            "grid": plan.grid if plan is not None else None,
            "image_tokens": usage.image_tokens,
            "input_tokens": usage.prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "tokens": usage.total_tokens,
            "model": result.model,
            "finish_reason": result.finish_reason,
        }
        return Document(page_content=result.text, metadata=metadata)

    # -- loading -------------------------------------------------------------------------------------
    def lazy_load(self) -> Iterator[Document]:
        """Yield one ``Document`` per page, transcribing each page only when it is asked for."""
        options = self._options()
        for source in self.sources:
            raw = read_source_bytes(source, policy=options["policy"])
            if raw.kind != "pdf":
                result = self.hd.read_document(raw.data, pages=self.pages, **options)
                for page in result.pages:
                    yield self._document(page, raw.name)
                continue
            for number, may_be_past_end in self._page_numbers():
                try:
                    result = self.hd.read_document(raw.data, pages=[number], **options)
                except errors.PageRangeError:
                    if may_be_past_end:
                        break  # an open range ("2-", all pages) ends at the last page
                    raise
                yield self._document(result.pages[0], raw.name)

    async def alazy_load(self) -> AsyncIterator[Document]:
        """Async :meth:`lazy_load`: the model runs in a worker thread, the event loop stays free."""
        options = self._options()
        for source in self.sources:
            raw = await asyncio.to_thread(read_source_bytes, source, policy=options["policy"])
            if raw.kind != "pdf":
                result = await self.hd.aread_document(raw.data, pages=self.pages, **options)
                for page in result.pages:
                    yield self._document(page, raw.name)
                continue
            for number, may_be_past_end in self._page_numbers():
                try:
                    result = await self.hd.aread_document(raw.data, pages=[number], **options)
                except errors.PageRangeError:
                    if may_be_past_end:
                        break
                    raise
                yield self._document(result.pages[0], raw.name)


__all__ = ["HD4KDocumentLoader"]
