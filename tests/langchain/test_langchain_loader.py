"""HD4KDocumentLoader on the tiny random checkpoint: one Document per page, lazily; page selection;
RAG ingestion into an in-memory vector store."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore
from langchain_hd4k import HD4KDocumentLoader
from langchain_helpers import CappedRunner, page_image, png_bytes, write_pdf

from hd4k_tools import HD4K, ImagePolicy, InputError, errors, plan
from hd4k_tools.testing import pdf_file

# Small renders and short answers keep the tests fast; the pipeline is the same at any size.
OPTIONS = {"dpi": 36, "hd_num": 1, "generation": {"max_new_tokens": 8}}


@pytest.fixture(scope="module")
def pdf_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pdf(tmp_path_factory.mktemp("loader") / "report.pdf", 3)


@pytest.fixture(scope="module")
def all_pages(hd4k_tiny: HD4K, pdf_path: Path) -> list[Document]:
    return HD4KDocumentLoader(hd4k_tiny, pdf_path, **OPTIONS).load()  # type: ignore[arg-type]


def test_one_document_per_page_with_metadata(all_pages: list[Document], pdf_path: Path, hd4k_tiny: HD4K) -> None:
    # LangChain's PDF-loader conventions: page 0-based, page_label as printed, total_pages.
    assert [d.metadata["page"] for d in all_pages] == [0, 1, 2]
    assert [d.metadata["page_label"] for d in all_pages] == ["1", "2", "3"]
    assert {d.metadata["total_pages"] for d in all_pages} == {3}
    page_size = (150, 200)  # a 300x400 pt page... written at 72 dpi, rendered at 36 dpi
    expected = plan(*page_size, 1)
    for doc in all_pages:
        meta = doc.metadata
        assert meta["source"] == str(pdf_path)
        assert meta["hd_num"] == 1
        assert meta["grid"] == f"{expected.rows}x{expected.cols}"
        assert meta["image_tokens"] == expected.num_tokens
        assert meta["tokens"] == meta["input_tokens"] + meta["output_tokens"]
        assert 1 <= meta["output_tokens"] <= 8
        assert meta["model"] == hd4k_tiny.model_id
        assert all(isinstance(v, str | int | float) for v in meta.values())  # flat: any vector store takes it
        assert doc.page_content
    # The pages look different, so the (random) model's transcriptions differ too.
    assert len({d.page_content for d in all_pages}) == 3


def test_same_text_as_read_document(all_pages: list[Document], hd4k_tiny: HD4K, pdf_path: Path) -> None:
    result = hd4k_tiny.read_document(pdf_path, pages=[2], **OPTIONS)  # type: ignore[arg-type]
    assert all_pages[1].page_content == result.pages[0].text


def test_output_option_changes_the_prompt(all_pages: list[Document], hd4k_tiny: HD4K, pdf_path: Path) -> None:
    as_text = HD4KDocumentLoader(hd4k_tiny, pdf_path, pages=[1], output="text", **OPTIONS).load()  # type: ignore[arg-type]
    assert as_text[0].metadata["input_tokens"] != all_pages[0].metadata["input_tokens"]
    with pytest.raises(InputError, match="output="):
        HD4KDocumentLoader(hd4k_tiny, pdf_path, pages=[1], output="html", **OPTIONS).load()  # type: ignore[arg-type]


def test_lazy_load_transcribes_page_by_page(hd4k_tiny: HD4K, pdf_path: Path) -> None:
    runner = CappedRunner(hd4k_tiny.runner, max_new_tokens=8)
    documents = HD4KDocumentLoader(runner, pdf_path, **OPTIONS).lazy_load()  # type: ignore[arg-type]
    assert runner.requests == []  # nothing happens before the first page is asked for
    first = next(documents)
    assert first.metadata["page"] == 0
    assert len(runner.requests) == 1
    second = next(documents)
    assert second.metadata["page"] == 1
    assert len(runner.requests) == 2
    assert [d.metadata["page"] for d in documents] == [2]
    assert len(runner.requests) == 3


@pytest.mark.parametrize(
    ("pages", "expected"),
    [("2-", [2, 3]), ("1,3", [1, 3]), ([3, 1], [1, 3]), (2, [2]), ("-2", [1, 2]), ("all", [1, 2, 3]), ("3-", [3])],
)
def test_page_selection(hd4k_tiny: HD4K, pdf_path: Path, pages: object, expected: list[int]) -> None:
    runner = CappedRunner(hd4k_tiny.runner, max_new_tokens=1)
    docs = HD4KDocumentLoader(runner, pdf_path, pages=pages, dpi=36, hd_num=1).load()  # type: ignore[arg-type]
    assert [d.metadata["page_label"] for d in docs] == [str(n) for n in expected]
    assert [d.metadata["page"] for d in docs] == [n - 1 for n in expected]
    assert len(runner.requests) == len(expected)


@pytest.mark.parametrize("pages", ["4", [2, 7], "4-", "5-6"])
def test_pages_past_the_end_are_an_error(hd4k_tiny: HD4K, pdf_path: Path, pages: object) -> None:
    loader = HD4KDocumentLoader(hd4k_tiny, pdf_path, pages=pages, **OPTIONS)  # type: ignore[arg-type]
    with pytest.raises(errors.PageRangeError, match="the document has 3 pages"):
        loader.load()


@pytest.mark.parametrize("pages", ["a-b", "3-1", "0", [0], [], "1 2", True])
def test_bad_page_selection(hd4k_tiny: HD4K, pdf_path: Path, pages: object) -> None:
    runner = CappedRunner(hd4k_tiny.runner, max_new_tokens=1)
    loader = HD4KDocumentLoader(runner, pdf_path, pages=pages, **OPTIONS)  # type: ignore[arg-type]
    # The core's page selection: the same error class and text as HD4K.read_document, before any page is read.
    with pytest.raises(errors.PageRangeError) as caught:
        loader.load()
    with pytest.raises(errors.PageRangeError) as core:
        hd4k_tiny.read_document(pdf_path, pages=pages, **OPTIONS)  # type: ignore[arg-type]
    assert str(caught.value) == str(core.value)
    assert runner.requests == []


def test_max_pdf_pages_is_honoured_before_any_page_is_read(hd4k_tiny: HD4K, pdf_path: Path) -> None:
    runner = CappedRunner(hd4k_tiny.runner, max_new_tokens=1)
    hd = HD4K(runner, max_pdf_pages=2)
    with pytest.raises(errors.PDFError, match="more than max_pages=2"):
        HD4KDocumentLoader(hd, pdf_path, **OPTIONS).load()  # type: ignore[arg-type]
    with pytest.raises(errors.PDFError, match="more than max_pages=1"):
        next(HD4KDocumentLoader(hd, pdf_path, pages="2-", max_pages=1, **OPTIONS).lazy_load())  # type: ignore[arg-type]
    assert runner.requests == []
    assert len(HD4KDocumentLoader(hd, pdf_path, pages="2-", **OPTIONS).load()) == 2  # type: ignore[arg-type]


def _labelled_pdf(path: Path) -> Path:
    """A 2-page blank PDF whose page-label tree numbers the pages in lower-case roman (i, ii)."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R /PageLabels << /Nums [0 << /S /r >>] >> >>",
        b"<< /Type /Pages /Kids [3 0 R 4 0 R] /Count 2 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 400] >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 300 400] >>",
    ]
    path.write_bytes(pdf_file(objects, version=b"1.7"))
    return path


def test_page_label_comes_from_the_pdf(hd4k_tiny: HD4K, tmp_path: Path) -> None:
    runner = CappedRunner(hd4k_tiny.runner, max_new_tokens=1)
    docs = HD4KDocumentLoader(runner, _labelled_pdf(tmp_path / "roman.pdf"), dpi=36, hd_num=1).load()
    assert [(d.metadata["page"], d.metadata["page_label"], d.metadata["total_pages"]) for d in docs] == [
        (0, "i", 2),
        (1, "ii", 2),
    ]


def test_images_and_bytes(hd4k_tiny: HD4K, pdf_path: Path, tmp_path: Path) -> None:
    image_path = tmp_path / "scan.png"
    page_image(2).save(image_path)
    loader = HD4KDocumentLoader(
        hd4k_tiny, [image_path, png_bytes(page_image(2)), pdf_path.read_bytes()], pages=None, **OPTIONS
    )  # type: ignore[arg-type]
    docs = loader.load()
    assert [(d.metadata["source"], d.metadata["page"]) for d in docs] == [
        (str(image_path), 0),
        ("<bytes>", 0),
        ("<bytes>", 0),
        ("<bytes>", 1),
        ("<bytes>", 2),
    ]
    assert docs[0].page_content == docs[1].page_content  # same pixels from a path and from bytes
    assert docs[0].metadata["image_tokens"] == plan(300, 400, 1).num_tokens
    with pytest.raises(InputError, match="single image"):
        HD4KDocumentLoader(hd4k_tiny, image_path, pages="2", **OPTIONS).load()  # type: ignore[arg-type]


def test_policy_applies(hd4k_tiny: HD4K, pdf_path: Path, tmp_path: Path) -> None:
    policy = ImagePolicy(allowed_roots=(tmp_path,))
    with pytest.raises(errors.PathNotAllowedError):
        HD4KDocumentLoader(hd4k_tiny, pdf_path, policy=policy, **OPTIONS).load()  # type: ignore[arg-type]
    with pytest.raises(errors.ImageTooLargeError):
        HD4KDocumentLoader(hd4k_tiny, pdf_path, policy=ImagePolicy(max_pixels=1000), **OPTIONS).load()  # type: ignore[arg-type]


async def test_alazy_load(hd4k_tiny: HD4K, pdf_path: Path, all_pages: list[Document]) -> None:
    loader = HD4KDocumentLoader(hd4k_tiny, pdf_path, pages="2-", **OPTIONS)  # type: ignore[arg-type]
    docs = [doc async for doc in loader.alazy_load()]
    assert docs == all_pages[1:]
    assert await HD4KDocumentLoader(hd4k_tiny, pdf_path, pages=[1], **OPTIONS).aload() == all_pages[:1]  # type: ignore[arg-type]


def test_rag_ingestion_retrieves_the_page(all_pages: list[Document], pdf_path: Path) -> None:
    store = InMemoryVectorStore.from_documents(all_pages, DeterministicFakeEmbedding(size=64))
    retriever = store.as_retriever(search_kwargs={"k": 1})
    found = retriever.invoke(all_pages[1].page_content)
    assert len(found) == 1
    assert found[0].page_content == all_pages[1].page_content
    assert found[0].metadata["page"] == 1
    assert found[0].metadata["source"] == str(pdf_path)
