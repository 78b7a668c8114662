"""HD4KReader: images and PDFs to one Document per page, ingestion into an index, SimpleDirectoryReader."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from llama_index.core import SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.schema import Document, MetadataMode
from llama_index_hd4k import HD4KReader
from llamaindex_support import RecordingRunner, file_hash, write_image, write_pdf

from hd4k_tools import HD4K, errors

GENERATION = {"max_new_tokens": 12}
DIM = 256


class CharTrigramEmbedding(BaseEmbedding):
    """A deterministic local text embedding: hashed character trigrams, L2-normalised."""

    def _embed(self, text: str) -> list[float]:
        vector = np.zeros(DIM)
        padded = f"  {text.lower()}  "
        for i in range(len(padded) - 2):
            vector[zlib.crc32(padded[i : i + 3].encode()) % DIM] += 1.0
        norm = np.linalg.norm(vector)
        return (vector / norm if norm else vector).tolist()

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._embed(text)

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._embed(query)


@pytest.fixture
def reader(runner: RecordingRunner) -> HD4KReader:
    return HD4KReader(HD4K(runner), hd_num=1, generation=GENERATION)


@pytest.fixture
def pdf(tmp_path: Path) -> Path:
    return write_pdf(tmp_path / "report.pdf", ["1. Introduction", "2. Revenue by region", "3. Outlook"])


def test_pdf_pages_become_documents(reader: HD4KReader, runner: RecordingRunner, pdf: Path) -> None:
    documents = reader.load_data(pdf, extra_info={"project": "q3"})
    assert [d.metadata["page"] for d in documents] == [1, 2, 3]
    texts = [d.text for d in documents]
    assert all(texts) and len(set(texts)) == 3, texts  # each page read on its own
    for document, result in zip(documents, runner.results, strict=True):
        assert document.text == result.text
        meta = document.metadata
        assert meta["file_path"] == str(pdf) and meta["project"] == "q3"
        assert meta["hd_num"] == 1 and meta["grid"] == "1x1" and meta["model"] == "tiny-ixc2-4khd"
        assert meta["image_tokens"] == result.usage.image_tokens > 0
        assert meta["tokens"] == result.usage.total_tokens
        # Technical keys stay out of what embeddings and LLMs read; file and page stay in.
        embedded = document.get_content(metadata_mode=MetadataMode.EMBED)
        assert f"page: {meta['page']}" in embedded and f"file_path: {pdf}" in embedded
        assert "image_tokens" not in embedded and "hd_num" not in embedded
    assert [r.hd_nums for r in runner.requests] == [(1,), (1,), (1,)]


@pytest.mark.parametrize("pages", [None, "1-3", "all", "-3", [1, 2, 3]])
def test_lazy_load_reads_one_page_at_a_time(
    reader: HD4KReader, runner: RecordingRunner, pdf: Path, pages: object
) -> None:
    documents = reader.lazy_load_data(pdf, pages=pages)
    assert runner.requests == []
    first = next(documents)
    assert first.metadata["page"] == 1 and len(runner.requests) == 1  # only the first page transcribed
    second = next(documents)
    assert second.metadata["page"] == 2 and len(runner.requests) == 2
    assert [d.metadata["page"] for d in documents] == [3]
    assert len(runner.requests) == 3
    assert [d.text for d in (first, second)] == [r.text for r in runner.results[:2]]


def test_max_pages_refuses_a_long_selection_before_reading(runner: RecordingRunner, pdf: Path) -> None:
    reader = HD4KReader(HD4K(runner), hd_num=1, generation=GENERATION, max_pages=2)
    documents = reader.lazy_load_data(pdf)
    with pytest.raises(errors.PDFError, match="3 are selected, more than max_pages=2"):
        next(documents)
    assert runner.requests == []
    assert [d.metadata["page"] for d in reader.load_data(pdf, pages="2-")] == [2, 3]


@pytest.mark.parametrize(("pages", "expected"), [(2, [2]), ([3, 1], [1, 3]), ("2-3", [2, 3]), ("3,1-2", [1, 2, 3])])
def test_page_selection(
    reader: HD4KReader, runner: RecordingRunner, pdf: Path, pages: object, expected: list[int]
) -> None:
    documents = reader.load_data(pdf, pages=pages)
    assert [d.metadata["page"] for d in documents] == expected
    assert len(runner.requests) == len(expected)


def test_bad_page_selection_is_an_error(reader: HD4KReader, pdf: Path) -> None:
    with pytest.raises(errors.PageRangeError):
        reader.load_data(pdf, pages=7)


def test_images_and_lists_of_files(reader: HD4KReader, runner: RecordingRunner, pdf: Path, tmp_path: Path) -> None:
    photo = write_image(tmp_path / "receipt.png", (240, 240, 230), size=(90, 120), label="Total 9.99")
    documents = reader.load_data([photo, photo.read_bytes()])
    assert [(d.metadata["file_path"], d.metadata["page"]) for d in documents] == [(str(photo), 1), ("<bytes>", 1)]
    assert runner.image_hashes() == [file_hash(photo)] * 2
    assert documents[0].text == documents[1].text  # same pixels, same greedy decoding


def test_retrieval_finds_the_right_page(reader: HD4KReader, pdf: Path) -> None:
    documents = reader.load_data(pdf)
    index = VectorStoreIndex.from_documents(documents, embed_model=CharTrigramEmbedding())
    page_two = next(d for d in documents if d.metadata["page"] == 2)
    hits = index.as_retriever(similarity_top_k=1).retrieve(page_two.text)
    assert len(hits) == 1
    assert hits[0].node.metadata["page"] == 2 and hits[0].node.metadata["file_path"] == str(pdf)
    assert hits[0].node.get_content() == page_two.text


def test_simple_directory_reader_file_extractor(reader: HD4KReader, runner: RecordingRunner, tmp_path: Path) -> None:
    folder = tmp_path / "inbox"
    folder.mkdir()
    write_pdf(folder / "memo.pdf", ["Memo page one", "Memo page two"])
    write_image(folder / "slide.png", (40, 90, 200), label="Slide")
    (folder / "notes.txt").write_text("plain text stays with the default reader")

    documents = SimpleDirectoryReader(
        str(folder), file_extractor={".pdf": reader, ".png": reader}, raise_on_error=True
    ).load_data()

    by_file = sorted((d.metadata["file_name"], d.metadata.get("page")) for d in documents)
    assert by_file == [("memo.pdf", 1), ("memo.pdf", 2), ("notes.txt", None), ("slide.png", 1)]
    ours = [d for d in documents if d.metadata.get("page") is not None]
    assert all(isinstance(d, Document) and d.metadata["model"] == "tiny-ixc2-4khd" for d in ours)
    # SimpleDirectoryReader's file info is kept as given, and no second file key is added.
    assert all(d.metadata["file_path"].endswith(d.metadata["file_name"]) for d in ours)
    assert all("file" not in d.metadata for d in ours)
    assert [d.metadata["page_label"] for d in ours if d.metadata["file_name"] == "memo.pdf"] == ["1", "2"]
    assert {d.metadata["total_pages"] for d in ours if d.metadata["file_name"] == "memo.pdf"} == {2}
    assert len(runner.requests) == 3


def test_load_data_takes_file_as_llama_index_file_readers_do(reader: HD4KReader, tmp_path: Path) -> None:
    photo = write_image(tmp_path / "a.png", (1, 2, 3))
    by_keyword = reader.load_data(file=photo, extra_info={"k": 1})
    assert [(d.metadata["file_path"], d.metadata["page_label"], d.metadata["k"]) for d in by_keyword] == [
        (str(photo), "1", 1)
    ]
    assert [d.text for d in reader.load_data(file_path=photo)] == [d.text for d in by_keyword]  # older name
    with pytest.raises(TypeError, match="one file argument"):
        reader.load_data()


def test_num_workers_fails_with_a_clear_error(reader: HD4KReader, tmp_path: Path) -> None:
    import pickle

    from llama_index.readers.hd4k.base import ReaderNotPicklableError

    with pytest.raises(ReaderNotPicklableError, match="aload_data\\(num_workers=N\\)"):
        pickle.dumps(reader)
    folder = tmp_path / "two"
    folder.mkdir()
    write_image(folder / "a.png", (10, 20, 30))
    write_image(folder / "b.png", (30, 20, 10))
    directory = SimpleDirectoryReader(str(folder), file_extractor={".png": reader}, raise_on_error=True)
    with pytest.raises(ReaderNotPicklableError, match="cannot be sent to worker processes"):
        directory.load_data(num_workers=2)


async def test_aload_data_with_num_workers_reads_concurrently_in_process(
    reader: HD4KReader, runner: RecordingRunner, tmp_path: Path
) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    write_image(folder / "a.png", (10, 20, 30))
    write_image(folder / "b.png", (30, 20, 10))
    directory = SimpleDirectoryReader(str(folder), file_extractor={".png": reader}, raise_on_error=True)
    documents = await directory.aload_data(num_workers=2)
    assert sorted(d.metadata["file_name"] for d in documents) == ["a.png", "b.png"]
    assert len(runner.requests) == 2


def test_wrong_arguments(reader: HD4KReader, tmp_path: Path) -> None:
    photo = write_image(tmp_path / "a.png", (1, 2, 3))
    with pytest.raises(errors.InputError, match="not a PDF"):
        reader.load_data(photo, pages=2)
    with pytest.raises(TypeError, match="unexpected arguments"):
        reader.load_data(photo, page=2)
    with pytest.raises(errors.ImageNotFoundError):
        reader.load_data(tmp_path / "missing.pdf")
