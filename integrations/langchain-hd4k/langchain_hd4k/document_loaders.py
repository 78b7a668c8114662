"""``HD4KDocumentLoader``: transcribe document images and PDFs into LangChain ``Document``s."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any, Literal

from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

from hd4k_tools import HD4K, ImagePolicy, ImageSource, Runner, TaskResult
from hd4k_tools.adapters import DocumentPages, as_hd4k, page_metadata, run_cancellable, select_document_pages

PageSpec = int | str | Sequence[int] | None


class HD4KDocumentLoader(BaseLoader):
    """Transcribe document images and PDFs with InternLM-XComposer2-4KHD, one ``Document`` per page.

    Pages are rendered and transcribed one at a time as :meth:`lazy_load` is consumed, so the first
    page is available before the last one is read and nothing is done for pages never asked for.
    Each ``Document`` holds the page's transcription as ``page_content`` and metadata in LangChain's PDF
    loader conventions: ``source``, ``page`` (0-based index), ``page_label`` (the printed label, e.g.
    ``"iv"``; the 1-based number when the PDF has none), ``total_pages``; then ``hd_num``, ``grid`` (tile
    rows x columns), token counts
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
        max_pages: int | None = None,
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
            max_pages: refuse a selection of more PDF pages than this (default: the HD4K's
                ``max_pdf_pages``), checked before the first page is transcribed.
        """
        self.hd = as_hd4k(hd)
        self.sources: list[ImageSource] = list(source) if isinstance(source, list | tuple) else [source]
        self.pages = pages
        self.dpi = dpi
        self.hd_num = hd_num
        self.output = output
        self.generation = dict(generation) if generation else None
        self.policy = policy
        self.max_pages = max_pages

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

    def _select(self, source: ImageSource) -> DocumentPages:
        # The core's page selection: checked against the page count and max_pages before any page is read.
        limit = self.hd.max_pdf_pages if self.max_pages is None else self.max_pages
        return select_document_pages(source, self.pages, policy=self.policy or self.hd.policy, max_pages=limit)

    @staticmethod
    def _document(result: TaskResult, document: DocumentPages, index: int, label: str) -> Document:
        plan = result.plan
        usage = result.usage
        metadata: dict[str, Any] = {
            "source": document.name,
            **page_metadata(index, label, document.total_pages),
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
            document = self._select(source)
            for index, page, label in document.pages():
                result = self.hd.read_document(document.data, pages=page, max_pages=1, **options)
                yield self._document(result.pages[0], document, index, label)

    async def alazy_load(self) -> AsyncIterator[Document]:
        """Async :meth:`lazy_load`: the model runs in a worker thread, the event loop stays free, and
        cancelling the consumer stops the model at its next token."""
        options = self._options()
        for source in self.sources:
            document = await run_cancellable(lambda _cancel, source=source: self._select(source))
            for index, page, label in document.pages():
                result = await self.hd.aread_document(document.data, pages=page, max_pages=1, **options)
                yield self._document(result.pages[0], document, index, label)


__all__ = ["HD4KDocumentLoader"]
