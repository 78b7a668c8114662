"""The way back into the frameworks: an ingest output folder indexed into a LangChain vector store and a
LlamaIndex VectorStoreIndex, and retrieved."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("langchain_core")
pytest.importorskip("llama_index.core")

from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_hd4k import HD4KIngestLoader
from llama_index.core import VectorStoreIndex
from llama_index.core.embeddings import BaseEmbedding
from llama_index_hd4k import HD4KIngestReader


class CharacterEmbedding(BaseEmbedding):
    """Deterministic text embedding for tests: character trigram counts hashed into 64 dimensions, so
    equal texts get equal vectors and different texts (almost always) different ones."""

    @staticmethod
    def _vector(text: str) -> list[float]:
        vector = [0.0] * 64
        for i in range(max(1, len(text) - 2)):
            bucket = hashlib.blake2b(text[i : i + 3].encode(), digest_size=2).digest()
            vector[int.from_bytes(bucket, "big") % 64] += 1.0
        return vector

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)


def test_langchain_loader_indexes_and_retrieves_ingested_pages(reference) -> None:
    manifest, records = reference
    docs = HD4KIngestLoader(manifest.out).load()
    ok = [r for r in records if r.ok]
    assert [(d.metadata["source"], d.metadata["page"] + 1) for d in docs] == [(r.source, r.page or 1) for r in ok]
    assert [d.id for d in docs] == [r.key for r in ok]
    first = docs[0]
    assert first.metadata["hd_num"] == 2 and first.metadata["grid"] == "1x1" and first.metadata["tokens"] > 0

    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=64))
    store.add_documents(docs)
    store.add_documents(HD4KIngestLoader(manifest.out).load())  # re-indexing replaces, by id
    assert len(store.store) == len(ok)
    target = next(
        d for d in docs if Path(d.metadata["source"]).name == "letter.pdf" and d.metadata["page_label"] == "2"
    )
    (hit,) = store.similarity_search(target.page_content, k=1)
    assert hit.page_content == target.page_content

    with_errors = HD4KIngestLoader(manifest.out, include_errors=True).load()
    failed = {
        Path(d.metadata["source"]).name: d.metadata["error_type"] for d in with_errors if "error_type" in d.metadata
    }
    assert failed == {"broken.pdf": "PDFError", "locked.pdf": "EncryptedPDFError", "huge.pdf": "ImageTooLargeError"}


def test_llamaindex_reader_indexes_and_retrieves_ingested_pages(reference) -> None:
    manifest, records = reference
    docs = HD4KIngestReader().load_data(manifest.out)
    ok = [r for r in records if r.ok]
    assert [(d.metadata["file_path"], d.metadata["page"]) for d in docs] == [(r.source, r.page or 1) for r in ok]
    assert [d.doc_id for d in docs] == [r.key for r in ok]
    assert "hd_num" in docs[0].excluded_embed_metadata_keys

    index = VectorStoreIndex.from_documents(docs, embed_model=CharacterEmbedding())
    target = next(d for d in docs if Path(d.metadata["file_path"]).name == "scan.png")
    (hit,) = index.as_retriever(similarity_top_k=1).retrieve(target.text)
    assert hit.node.get_content() == target.text
    assert hit.node.metadata["page"] == 1 and hit.node.ref_doc_id == target.doc_id
