"""``HD4KIngestLoader``: the records of an ``hd4k ingest`` output folder as LangChain ``Document``\\ s."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from langchain_core.document_loaders import BaseLoader
from langchain_core.documents import Document

from hd4k_tools import PageRecord, iter_ingest_records


class HD4KIngestLoader(BaseLoader):
    """Read the pages ``hd4k ingest`` transcribed (``OUT/jsonl/*.jsonl``): one ``Document`` per page.

    Nothing is transcribed here: the model ran during ingestion. ``page_content`` is the page's Markdown;
    the metadata holds the keys of :class:`HD4KDocumentLoader` (``source``, ``page``, ``hd_num``, ``grid``,
    token counts, ``model``, ``finish_reason``) plus ``page_count`` and ``content_hash``, all flat values.
    The document ``id`` is the record's resume key, so re-indexing an output folder replaces documents
    instead of duplicating them. Pages that failed (``record.error``) are skipped unless
    ``include_errors=True`` (then their content is empty and ``error_type``/``error`` say why). Loading a
    folder that does not exist, a file, or a folder that is not ingest output raises
    :class:`hd4k_tools.ingestion.IngestOutputError` naming the path (never an empty list).

    Example:
        .. code-block:: python

            from langchain_core.vectorstores import InMemoryVectorStore
            from langchain_hd4k import HD4KIngestLoader

            docs = HD4KIngestLoader("out/").load()
            store = InMemoryVectorStore.from_documents(docs, embeddings)
    """

    def __init__(self, out: str | os.PathLike[str], *, include_errors: bool = False) -> None:
        self.out = out
        self.include_errors = include_errors

    @staticmethod
    def _document(record: PageRecord) -> Document:
        metadata: dict[str, Any] = {
            # LangChain's loader conventions, as HD4KDocumentLoader: page 0-based, page_label, total_pages.
            "source": record.source,
            "page": (record.page or 1) - 1,
            "page_label": str(record.page or 1),
            "total_pages": record.page_count,
            "content_hash": record.content_hash,
            "hd_num": record.hd_num,
            "grid": record.grid,
            "image_tokens": record.tokens.image,
            "input_tokens": record.tokens.prompt,
            "output_tokens": record.tokens.completion,
            "tokens": record.tokens.prompt + record.tokens.completion,
            "model": record.model,
            "finish_reason": record.finish_reason,
        }
        if record.error is not None:
            metadata["error_type"] = record.error.type
            metadata["error"] = record.error.message
        return Document(id=record.key, page_content=record.text, metadata=metadata)

    def lazy_load(self) -> Iterator[Document]:
        """Yield one ``Document`` per ingested page, ordered by source and page.

        Raises:
            hd4k_tools.ingestion.IngestOutputError: the folder is missing, a file, or not ingest output.
        """
        for record in iter_ingest_records(self.out):
            if record.error is None or self.include_errors:
                yield self._document(record)


__all__ = ["HD4KIngestLoader"]
