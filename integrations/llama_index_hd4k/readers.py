"""``HD4KReader``: transcribe images and PDFs into LlamaIndex ``Document``\\ s (one per page);
``HD4KIngestReader``: read the pages an ``hd4k ingest`` run already transcribed."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from llama_index.core.readers.base import BaseReader
from llama_index.core.schema import Document

from hd4k_tools import (
    HD4K,
    DocumentResult,
    GenerationConfig,
    ImagePolicy,
    ImageSource,
    PageRecord,
    Runner,
    TaskResult,
    iter_ingest_records,
    read_source_bytes,
    select_pages,
)

__all__ = ["HD4KIngestReader", "HD4KReader"]

PageSelection = int | str | Sequence[int] | None
FileArg = str | os.PathLike[str] | bytes

# Facts about how a page was read: useful for filtering and audits, noise for embeddings and prompts.
_TECHNICAL_KEYS = ["hd_num", "grid", "image_tokens", "tokens", "model"]


class HD4KReader(BaseReader):
    """Read images and PDFs with InternLM-XComposer2-4KHD into one ``Document`` per page.

    Each document's text is the page's transcription (Markdown by default); its metadata holds
    ``file``, ``page`` (1-based; 1 for a single image), ``hd_num``, ``grid`` (tile rows x cols),
    ``image_tokens``, ``tokens`` (prompt + completion) and ``model``, plus any ``extra_info``. The
    technical keys are excluded from the text that embeddings and LLMs see.

    Use it directly (``HD4KReader(hd).load_data("scan.pdf", pages="1-3")``) or per file type::

        SimpleDirectoryReader("docs", file_extractor={".pdf": reader, ".png": reader}).load_data()

    Files handed to a reader come from the application and are read under ``policy`` (default: the
    ``HD4K`` object's policy); untrusted paths from an LLM belong to :class:`HD4KToolSpec` instead.
    """

    def __init__(
        self,
        hd: HD4K | Runner,
        *,
        hd_num: int | str | None = None,
        output: str = "markdown",
        dpi: int | None = None,
        pages: PageSelection = None,
        generation: GenerationConfig | dict[str, Any] | None = None,
        policy: ImagePolicy | None = None,
        max_pages: int | None = None,
    ) -> None:
        """``hd_num``: tiles per page (default 55 for documents, ``"auto"`` to fit the context);
        ``output``: ``"markdown"`` or ``"text"``; ``dpi``: PDF render resolution (default 200);
        ``pages``: default page selection; ``generation``: decoding options (e.g. ``max_new_tokens``);
        ``policy``: limits for the files read; ``max_pages``: refuse selections of more PDF pages
        (default: the ``HD4K`` object's ``max_pdf_pages``)."""
        self.hd = hd if isinstance(hd, HD4K) else HD4K(hd)
        self.hd_num = hd_num
        self.output = output
        self.dpi = dpi
        self.pages = pages
        self.generation = generation
        self.policy = policy
        self.max_pages = max_pages

    # -- reading -------------------------------------------------------------------------------------
    def _read(self, source: ImageSource, pages: PageSelection) -> DocumentResult:
        return self.hd.read_document(
            source,
            pages=pages,
            hd_num=self.hd_num,
            output=self.output,
            dpi=self.dpi,
            progress=False,
            generation=self.generation,
            policy=self.policy,
            max_pages=self.max_pages,
        )

    def _page_results(self, data: bytes, is_pdf: bool, pages: PageSelection) -> Iterator[TaskResult]:
        """One result per page, each page read only when the consumer asks for it."""
        if not is_pdf:
            # The core refuses a page selection other than page 1 for a single image.
            yield from self._read(data, pages).pages
            return
        # The whole selection is validated (pages exist, max_pages) before any page is read.
        policy, limit = self.policy or self.hd.policy, self.max_pages or self.hd.max_pdf_pages
        for index in select_pages(data, pages, policy=policy, max_pages=limit):
            yield from self._read(data, index + 1).pages

    @staticmethod
    def _document(result: TaskResult, file: str, extra_info: dict[str, Any]) -> Document:
        plan = result.plan
        metadata: dict[str, Any] = {
            **extra_info,
            "file": file,
            "page": result.page if result.page is not None else 1,
            "hd_num": result.hd_num,
            "grid": plan.grid if plan is not None else None,
            "image_tokens": result.usage.image_tokens,
            "tokens": result.usage.total_tokens,
            "model": result.model,
        }
        return Document(
            text=result.text,
            metadata=metadata,
            excluded_embed_metadata_keys=list(_TECHNICAL_KEYS),
            excluded_llm_metadata_keys=list(_TECHNICAL_KEYS),
        )

    def _source_bytes(self, file: FileArg, fs: Any) -> tuple[str, bytes, bool]:
        if fs is not None and not isinstance(file, bytes):
            with fs.open(str(file), "rb") as handle:
                raw = read_source_bytes(handle.read(), policy=self.policy or self.hd.policy)
            return str(file), raw.data, raw.kind == "pdf"
        source: ImageSource = file if isinstance(file, bytes) else Path(file)
        raw = read_source_bytes(source, policy=self.policy or self.hd.policy)
        name = raw.name if isinstance(file, bytes) else str(file)
        return name, raw.data, raw.kind == "pdf"

    def lazy_load_data(
        self,
        file_path: FileArg | Sequence[FileArg],
        pages: PageSelection = None,
        extra_info: dict[str, Any] | None = None,
        fs: Any = None,
        **kwargs: Any,
    ) -> Iterator[Document]:
        """Yield one ``Document`` per page of each file, transcribing a page only when it is asked for.

        Args:
            file_path: a path, encoded bytes, or a list of them.
            pages: PDF pages, 1-based (``2``, ``[1, 3]``, ``"1-3,5"``); default: the reader's ``pages``
                (all pages). The selection is checked against the page count (and ``max_pages``)
                before the first page is transcribed; then each page is read when its document is
                asked for.
            extra_info: metadata added to every document (``SimpleDirectoryReader`` passes the file's).
            fs: an fsspec filesystem to read paths from (``SimpleDirectoryReader`` passes it).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; HD4KReader takes file_path, pages, extra_info")
        files = list(file_path) if isinstance(file_path, list | tuple) else [file_path]
        selection = pages if pages is not None else self.pages
        for file in files:
            name, data, is_pdf = self._source_bytes(file, fs)
            for result in self._page_results(data, is_pdf, selection):
                yield self._document(result, name, dict(extra_info or {}))

    def load_data(
        self,
        file_path: FileArg | Sequence[FileArg],
        pages: PageSelection = None,
        extra_info: dict[str, Any] | None = None,
        fs: Any = None,
        **kwargs: Any,
    ) -> list[Document]:
        """All documents of :meth:`lazy_load_data` as a list."""
        return list(self.lazy_load_data(file_path, pages=pages, extra_info=extra_info, fs=fs, **kwargs))


class HD4KIngestReader(BaseReader):
    """Read an ``hd4k ingest`` output folder (``OUT/shards/*.jsonl``) into one ``Document`` per page.

    Nothing is transcribed here. Documents carry the metadata of :class:`HD4KReader` (``file``, ``page``,
    ``hd_num``, ``grid``, ``image_tokens``, ``tokens``, ``model``, the technical keys hidden from
    embeddings and LLMs) plus ``page_count``; ``id_`` is the record's resume key, so re-reading a folder
    gives the same ids. Failed pages are skipped unless ``include_errors=True``.

    >>> from llama_index.core import VectorStoreIndex                       # doctest: +SKIP
    >>> index = VectorStoreIndex.from_documents(HD4KIngestReader().load_data("out/"))  # doctest: +SKIP
    """

    def __init__(self, *, include_errors: bool = False) -> None:
        self.include_errors = include_errors

    @staticmethod
    def _document(record: PageRecord) -> Document:
        metadata: dict[str, Any] = {
            "file": record.source,
            "page": record.page,
            "page_count": record.page_count,
            "hd_num": record.hd_num,
            "grid": record.grid,
            "image_tokens": record.tokens.image,
            "tokens": record.tokens.prompt + record.tokens.completion,
            "model": record.model,
        }
        if record.error is not None:
            metadata["error_type"] = record.error.type
            metadata["error"] = record.error.message
        hidden = [*_TECHNICAL_KEYS, "page_count"]
        return Document(
            id_=record.key,
            text=record.text,
            metadata=metadata,
            excluded_embed_metadata_keys=hidden,
            excluded_llm_metadata_keys=hidden,
        )

    def lazy_load_data(self, out: str | os.PathLike[str], **kwargs: Any) -> Iterator[Document]:
        """Yield one ``Document`` per ingested page of the output folder ``out`` (by source, then page)."""
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; HD4KIngestReader takes the output folder")
        for record in iter_ingest_records(out):
            if record.error is None or self.include_errors:
                yield self._document(record)

    def load_data(self, out: str | os.PathLike[str], **kwargs: Any) -> list[Document]:
        """All documents of :meth:`lazy_load_data` as a list."""
        return list(self.lazy_load_data(out, **kwargs))
