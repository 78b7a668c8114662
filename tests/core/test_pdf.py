"""Tests for hd4k_tools.inputs.pdf: page ranges, lazy rendering, limits, cancellation, damaged and encrypted PDFs."""

from __future__ import annotations

import base64
import hashlib
import io
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hd4k_tools import errors
from hd4k_tools.inputs.images import read_source_bytes
from hd4k_tools.inputs.pdf import RenderedPage, is_pdf, page_count, parse_page_range, render_pages, select_pages
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.testing import pdf_file

pypdfium2 = pytest.importorskip("pypdfium2")

COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 200), (240, 200, 20)]


def _make_pdf(sizes: list[tuple[int, int]], resolution: float = 72.0) -> bytes:
    """A PDF with one page per size, each a solid colour from COLOURS (1 px = 1 pt at 72 dpi)."""
    pages = [Image.new("RGB", size, COLOURS[i % len(COLOURS)]) for i, size in enumerate(sizes)]
    buffer = io.BytesIO()
    pages[0].save(buffer, "PDF", save_all=True, append_images=pages[1:], resolution=resolution)
    return buffer.getvalue()


@pytest.fixture
def three_pages() -> bytes:
    return _make_pdf([(100, 50), (60, 80), (40, 40)])


def _centre(page: RenderedPage) -> tuple[int, ...]:
    return page.image.getpixel((page.image.width // 2, page.image.height // 2))


def _close_to(pixel: tuple[int, ...], colour: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour, strict=True))


# ----------------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------------
def test_every_page_is_rendered_with_its_own_content_and_size(three_pages: bytes) -> None:
    pages = list(render_pages(three_pages, dpi=144, progress=False))
    assert [(p.index, p.number, p.dpi) for p in pages] == [(0, 1, 144.0), (1, 2, 144.0), (2, 3, 144.0)]
    assert [p.image.size for p in pages] == [(200, 100), (120, 160), (80, 80)]
    assert all(p.image.mode == "RGB" for p in pages)
    for page, colour in zip(pages, COLOURS, strict=False):
        assert _close_to(_centre(page), colour), (page.number, _centre(page))
    assert not np.array_equal(np.asarray(pages[0].image.resize((10, 10))), np.asarray(pages[1].image.resize((10, 10))))


def test_resolution_of_the_source_sets_the_page_size_in_points() -> None:
    pdf = _make_pdf([(300, 150)], resolution=150)  # 2 x 1 inch
    (page,) = render_pages(pdf, dpi=100)
    assert page.image.size == (200, 100)


def test_page_selection(three_pages: bytes) -> None:
    pages = list(render_pages(three_pages, pages="3,1", dpi=72))
    assert [p.number for p in pages] == [1, 3]
    assert _close_to(_centre(pages[1]), COLOURS[2])
    assert [p.index for p in render_pages(three_pages, pages=2, dpi=72)] == [1]
    assert [p.index for p in render_pages(three_pages, pages=[2, 3], dpi=72)] == [1, 2]


def test_every_source_kind(three_pages: bytes, tmp_path: Path) -> None:
    path = tmp_path / "doc.pdf"
    path.write_bytes(three_pages)
    b64 = base64.b64encode(three_pages).decode()
    sources = [path, str(path), three_pages, io.BytesIO(three_pages), f"data:application/pdf;base64,{b64}"]
    for source in sources:
        (page,) = render_pages(source, pages=2, dpi=72)
        assert page.image.size == (60, 80)
    assert page_count(io.BytesIO(three_pages)) == page_count(path) == 3
    raw = read_source_bytes(path)
    assert raw.kind == "pdf"
    assert page_count(raw) == 3
    with pytest.raises(errors.PDFError, match=r"max_pages=1") as info:
        render_pages(raw, max_pages=1)
    assert str(path) in str(info.value)  # the name survives the hand-off


def test_rendering_is_lazy(three_pages: bytes) -> None:
    iterator = render_pages(three_pages, dpi=72)
    first = next(iterator)
    assert first.number == 1
    iterator.close()  # releases the document; no further pages are rendered


def test_progress_bar_off_and_on(three_pages: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(list(render_pages(three_pages, dpi=36, progress=False))) == 3
    assert capsys.readouterr().err == ""
    assert len(list(render_pages(three_pages, dpi=36, progress=True))) == 3
    assert "PDF pages" in capsys.readouterr().err


def test_cancel_between_pages(three_pages: bytes) -> None:
    cancel = threading.Event()
    iterator = render_pages(three_pages, dpi=72, cancel=cancel)
    assert next(iterator).number == 1
    cancel.set()
    with pytest.raises(errors.CancelledError, match="PDF pages was cancelled"):
        next(iterator)


def test_cancel_set_before_starting(three_pages: bytes) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(errors.CancelledError):
        list(render_pages(three_pages, cancel=cancel))


# ----------------------------------------------------------------------------------------------------
# limits
# ----------------------------------------------------------------------------------------------------
def test_max_pages(three_pages: bytes) -> None:
    with pytest.raises(errors.PDFError, match=r"3 are selected, more than max_pages=2; pass pages=") as info:
        render_pages(three_pages, max_pages=2)  # refused at the call, before any rendering
    assert "pages='1-2'" in str(info.value)
    assert len(list(render_pages(three_pages, pages="1-2", max_pages=2, dpi=36))) == 2


def test_select_pages_checks_without_rendering(three_pages: bytes) -> None:
    assert select_pages(three_pages) == [0, 1, 2]
    assert select_pages(three_pages, "3,1") == [0, 2]
    with pytest.raises(errors.PDFError, match=r"3 are selected, more than max_pages=2; pass pages="):
        select_pages(three_pages, max_pages=2)
    with pytest.raises(errors.PageRangeError, match="page 4 does not exist"):
        select_pages(three_pages, 4)


def test_page_too_large_for_max_pixels_is_refused_before_rendering(three_pages: bytes) -> None:
    policy = ImagePolicy(max_pixels=10_000)
    iterator = render_pages(three_pages, dpi=144, policy=policy)
    with pytest.raises(errors.ImageTooLargeError, match=r"page 1 .* 200x100 = 20,000 pixels .*dpi=100 or lower"):
        next(iterator)
    (page,) = render_pages(three_pages, pages=1, dpi=100, policy=policy)
    assert page.image.width * page.image.height <= 10_000


def test_policy_applies_to_pdf_sources(three_pages: bytes, tmp_path: Path) -> None:
    with pytest.raises(errors.FileTooLargeError, match="raise max_bytes"):
        page_count(three_pages, policy=ImagePolicy(max_bytes=100))
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "doc.pdf"
    outside.write_bytes(three_pages)
    with pytest.raises(errors.PathNotAllowedError):
        render_pages(outside, policy=ImagePolicy(allowed_roots=(root,)))


@pytest.mark.parametrize("dpi", [0, -5, 5000, True, "200"])
def test_bad_dpi(three_pages: bytes, dpi: object) -> None:
    with pytest.raises(errors.PDFError, match="dpi="):
        render_pages(three_pages, dpi=dpi)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# bad documents
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.4\nthis is not really a pdf\n%%EOF", bytes(range(256)) * 8],
    ids=["pdf-header-garbage-body", "random-bytes"],
)
def test_corrupt_pdf(data: bytes) -> None:
    with pytest.raises(errors.PDFError) as info:
        render_pages(data)
    assert not isinstance(info.value, errors.EncryptedPDFError)
    assert "PDF" in str(info.value)


def test_truncated_pdf(three_pages: bytes) -> None:
    with pytest.raises(errors.PDFError):
        list(render_pages(three_pages[:60]))


def test_image_given_as_pdf() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, "PNG")
    with pytest.raises(errors.PDFError, match="use load_image"):
        page_count(buffer.getvalue())


# A hand-made PDF encrypted with the standard security handler, revision 2 (40-bit RC4), as described in
# the PDF 1.7 reference, algorithms 3.2-3.4. The page has no content, so no object needs encrypting.
_PASSWORD_PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")


def _rc4(key: bytes, data: bytes) -> bytes:
    state = list(range(256))
    j = 0
    for i in range(256):
        j = (j + state[i] + key[i % len(key)]) % 256
        state[i], state[j] = state[j], state[i]
    out, i, j = bytearray(), 0, 0
    for byte in data:
        i = (i + 1) % 256
        j = (j + state[i]) % 256
        state[i], state[j] = state[j], state[i]
        out.append(byte ^ state[(state[i] + state[j]) % 256])
    return bytes(out)


def _padded(password: bytes) -> bytes:
    return (password + _PASSWORD_PAD)[:32]


def _encrypted_pdf(user_password: bytes, owner_password: bytes) -> bytes:
    permissions = -44
    file_id = hashlib.md5(b"hd4k-tools test document").digest()
    owner_key = hashlib.md5(_padded(owner_password)).digest()[:5]
    owner_entry = _rc4(owner_key, _padded(user_password))
    file_key = hashlib.md5(_padded(user_password) + owner_entry + struct.pack("<i", permissions) + file_id).digest()[:5]
    user_entry = _rc4(file_key, _PASSWORD_PAD)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P %d >>"
        % (owner_entry.hex().encode(), user_entry.hex().encode(), permissions),
    ]
    trailer_id = file_id.hex().encode()
    return pdf_file(objects, trailer=b"/Encrypt 4 0 R /ID [<%s> <%s>]" % (trailer_id, trailer_id))


def test_encrypted_pdf() -> None:
    encrypted = _encrypted_pdf(b"secret", b"owner")
    # The hand-made file is valid: pdfium opens it with the right password.
    document = pypdfium2.PdfDocument(encrypted, password="secret")
    try:
        assert len(document) == 1
    finally:
        document.close()
    with pytest.raises(errors.EncryptedPDFError, match=r"password-protected.*remove the password"):
        render_pages(encrypted)
    with pytest.raises(errors.EncryptedPDFError):
        page_count(encrypted)


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def test_is_pdf(three_pages: bytes) -> None:
    assert is_pdf(three_pages)
    assert is_pdf(b"\xef\xbb\xbf%PDF-1.7")
    assert not is_pdf(b"\x89PNG\r\n\x1a\n")
    assert not is_pdf(b"")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (None, [0, 1, 2, 3, 4]),
        ("all", [0, 1, 2, 3, 4]),
        (1, [0]),
        (5, [4]),
        ("1-3,5", [0, 1, 2, 4]),
        ("2-", [1, 2, 3, 4]),
        ("-2", [0, 1]),
        (" 4 , 2 - 3 ,2", [1, 2, 3]),
        ([5, 1, 1], [0, 4]),
        ((2, 3), [1, 2]),
    ],
)
def test_parse_page_range(spec: object, expected: list[int]) -> None:
    assert parse_page_range(spec, 5) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        (0, "numbered from 1"),
        (6, "page 6 does not exist"),
        ("0-2", "numbered from 1"),
        ("3-9", "page 9 does not exist"),
        ("4-2", "runs backwards"),
        ("1,,2", "cannot read"),
        ("abc", "cannot read"),
        ("1 2", "cannot read"),
        ("-", "cannot read"),
        ([], "selects no page"),
        ([1, "2"], "not a page selection"),
        (True, "not a page selection"),
        (2.5, "not a page selection"),
    ],
)
def test_parse_page_range_errors(spec: object, problem: str) -> None:
    with pytest.raises(errors.PageRangeError, match=problem) as info:
        parse_page_range(spec, 5)  # type: ignore[arg-type]
    assert "the document has 5 pages" in str(info.value)
    assert "1-5" in str(info.value)


def test_missing_dependency(monkeypatch: pytest.MonkeyPatch, three_pages: bytes) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "pypdfium2", None)
    with pytest.raises(errors.MissingDependencyError, match=r'pip install "hd4k-tools\[pdf\]"'):
        page_count(three_pages)
