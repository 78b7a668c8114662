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
    GenerationConfig,
    ImagePolicy,
    ImageSource,
    InputError,
    PageRecord,
    Runner,
    TaskResult,
    iter_ingest_records,
)
from hd4k_tools.adapters import DocumentPages, as_hd4k, select_document_pages

__all__ = ["HD4KIngestReader", "HD4KReader"]

PageSelection = int | str | Sequence[int] | None
FileArg = str | os.PathLike[str] | bytes

# Facts about how a page was read: useful for filtering and audits, noise for embeddings and prompts.
_TECHNICAL_KEYS = ["hd_num", "grid", "image_tokens", "tokens", "model", "total_pages"]


class ReaderNotPicklableError(InputError, TypeError):
    """An HD4KReader was sent to another process (``SimpleDirectoryReader(...).load_data(num_workers=N)``)."""


class HD4KReader(BaseReader):
    """Read images and PDFs with InternLM-XComposer2-4KHD into one ``Document`` per page.

    Each document's text is the page's transcription (Markdown by default); its metadata holds
    ``file_path`` (LlamaIndex's key; ``SimpleDirectoryReader``'s own file metadata is kept as given, never
    duplicated), ``page_label`` (the printed label, as LlamaIndex's PDF reader writes it), ``page``
    (1-based; 1 for a single image), ``total_pages``, ``hd_num``, ``grid`` (tile rows x cols),
    ``image_tokens``, ``tokens`` (prompt + completion) and ``model``, plus any ``extra_info``. The
    technical keys are excluded from the text that embeddings and LLMs see.

    ``SimpleDirectoryReader(...).load_data(num_workers=N)`` sends readers to worker processes, which
    cannot carry a loaded model: that raises :class:`ReaderNotPicklableError` saying what to do instead
    (``aload_data(num_workers=N)`` runs files concurrently in this process; a server-side engine batches).

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
        self.hd = as_hd4k(hd)
        self.hd_num = hd_num
        self.output = output
        self.dpi = dpi
        self.pages = pages
        self.generation = generation
        self.policy = policy
        self.max_pages = max_pages

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise ReaderNotPicklableError(
            "HD4KReader holds a loaded model and cannot be sent to worker processes, as "
            "SimpleDirectoryReader(...).load_data(num_workers=N) does. Use load_data() without num_workers, or "
            "await SimpleDirectoryReader(...).aload_data(num_workers=N) (files read concurrently in this "
            "process), or point HD4K.remote(url) at an `hd4k serve` / vLLM server that batches requests."
        )

    # -- reading -------------------------------------------------------------------------------------
    def _select(self, source: ImageSource, pages: PageSelection) -> DocumentPages:
        # The whole selection is validated (pages exist, max_pages) before any page is read.
        policy = self.policy or self.hd.policy
        limit = self.hd.max_pdf_pages if self.max_pages is None else self.max_pages
        return select_document_pages(source, pages, policy=policy, max_pages=limit)

    def _read_page(self, document: DocumentPages, page: int | None) -> TaskResult:
        result = self.hd.read_document(
            document.data,
            pages=page,
            hd_num=self.hd_num,
            output=self.output,
            dpi=self.dpi,
            progress=False,
            generation=self.generation,
            policy=self.policy,
            max_pages=1,
        )
        return result.pages[0]

    @staticmethod
    def _document(
        result: TaskResult, document: DocumentPages, index: int, label: str, extra_info: dict[str, Any]
    ) -> Document:
        plan = result.plan
        metadata: dict[str, Any] = dict(extra_info)
        metadata.setdefault("file_path", document.name)
        metadata.update(
            {
                "page_label": label,
                "page": index + 1,
                "total_pages": document.total_pages,
                "hd_num": result.hd_num,
                "grid": plan.grid if plan is not None else None,
                "image_tokens": result.usage.image_tokens,
                "tokens": result.usage.total_tokens,
                "model": result.model,
            }
        )
        return Document(
            text=result.text,
            metadata=metadata,
            excluded_embed_metadata_keys=list(_TECHNICAL_KEYS),
            excluded_llm_metadata_keys=list(_TECHNICAL_KEYS),
        )

    def _source(self, file: FileArg, fs: Any) -> tuple[str, ImageSource]:
        if fs is not None and not isinstance(file, bytes):
            with fs.open(str(file), "rb") as handle:
                return str(file), handle.read()
        if isinstance(file, bytes):
            return "<bytes>", file
        return str(file), Path(file)

    def lazy_load_data(
        self,
        file: FileArg | Sequence[FileArg] | None = None,
        pages: PageSelection = None,
        extra_info: dict[str, Any] | None = None,
        fs: Any = None,
        *,
        file_path: FileArg | Sequence[FileArg] | None = None,
        **kwargs: Any,
    ) -> Iterator[Document]:
        """Yield one ``Document`` per page of each file, transcribing a page only when it is asked for.

        Args:
            file: a path, encoded bytes, or a list of them (``SimpleDirectoryReader`` passes a path, as it
                does to LlamaIndex's own file readers: ``load_data(file, extra_info=..., fs=...)``).
            pages: PDF pages, 1-based (``2``, ``[1, 3]``, ``"1-3,5"``); default: the reader's ``pages``
                (all pages). The selection is checked against the page count (and ``max_pages``)
                before the first page is transcribed; then each page is read when its document is
                asked for.
            extra_info: metadata added to every document (``SimpleDirectoryReader`` passes the file's).
            fs: an fsspec filesystem to read paths from (``SimpleDirectoryReader`` passes it).
            file_path: the older name of ``file``.
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; HD4KReader takes file, pages, extra_info, fs")
        if (file is None) == (file_path is None):
            raise TypeError("HD4KReader.load_data takes one file argument: load_data(file) or load_data(file=...).")
        target = file if file is not None else file_path
        files = list(target) if isinstance(target, list | tuple) else [target]
        selection = pages if pages is not None else self.pages
        for item in files:
            name, source = self._source(item, fs)  # type: ignore[arg-type]
            document = self._select(source, selection)
            if not isinstance(item, bytes):
                document = DocumentPages(
                    name, document.data, document.is_pdf, document.indices, document.labels, document.total_pages
                )
            for index, page, label in document.pages():
                result = self._read_page(document, page)
                yield self._document(result, document, index, label, dict(extra_info or {}))

    def load_data(
        self,
        file: FileArg | Sequence[FileArg] | None = None,
        pages: PageSelection = None,
        extra_info: dict[str, Any] | None = None,
        fs: Any = None,
        *,
        file_path: FileArg | Sequence[FileArg] | None = None,
        **kwargs: Any,
    ) -> list[Document]:
        """All documents of :meth:`lazy_load_data` as a list."""
        return list(self.lazy_load_data(file, pages=pages, extra_info=extra_info, fs=fs, file_path=file_path, **kwargs))


class HD4KIngestReader(BaseReader):
    """Read an ``hd4k ingest`` output folder (``OUT/jsonl/*.jsonl``) into one ``Document`` per page.

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
            # The metadata keys of HD4KReader: file_path, page (1-based), page_label, total_pages.
            "file_path": record.source,
            "page": record.page or 1,
            "page_label": str(record.page or 1),
            "total_pages": record.page_count,
            "hd_num": record.hd_num,
            "grid": record.grid,
            "image_tokens": record.tokens.image,
            "tokens": record.tokens.prompt + record.tokens.completion,
            "model": record.model,
        }
        if record.error is not None:
            metadata["error_type"] = record.error.type
            metadata["error"] = record.error.message
        hidden = list(_TECHNICAL_KEYS)
        return Document(
            id_=record.key,
            text=record.text,
            metadata=metadata,
            excluded_embed_metadata_keys=hidden,
            excluded_llm_metadata_keys=hidden,
        )

    def lazy_load_data(self, out: str | os.PathLike[str], **kwargs: Any) -> Iterator[Document]:
        """Yield one ``Document`` per ingested page of the output folder ``out`` (by source, then page).

        Raises:
            hd4k_tools.ingestion.IngestOutputError: ``out`` does not exist, is a file, or is not the output
                folder of an ``hd4k ingest`` run (the message names the path).
        """
        if kwargs:
            raise TypeError(f"unexpected arguments {sorted(kwargs)}; HD4KIngestReader takes the output folder")
        for record in iter_ingest_records(out):
            if record.error is None or self.include_errors:
                yield self._document(record)

    def load_data(self, out: str | os.PathLike[str], **kwargs: Any) -> list[Document]:
        """All documents of :meth:`lazy_load_data` as a list."""
        return list(self.lazy_load_data(out, **kwargs))
