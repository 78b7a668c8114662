"""A small corpus made on the spot for the ingest tests: multi-page PDFs, images, a duplicate, a corrupt
file, a password-protected PDF and a PDF whose page is too large to render."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, ImageDraw

from hd4k_tools.testing import pdf_file

COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 200), (240, 200, 20), (120, 40, 160)]

# Engine settings that keep the tiny model fast: few tiles, short answers, small renders.
FAST = {"hd_num": 2, "dpi": 36, "generation": {"max_new_tokens": 6}}


def _page(i: int, size: tuple[int, int] = (300, 400)) -> Image.Image:
    image = Image.new("RGB", size, COLOURS[i % len(COLOURS)])
    ImageDraw.Draw(image).text((20, 20), f"page {i}", fill=(255, 255, 255))
    return image


def pdf_bytes(pages: list[Image.Image], resolution: float = 72.0) -> bytes:
    buffer = io.BytesIO()
    pages[0].save(buffer, "PDF", save_all=True, append_images=pages[1:], resolution=resolution)
    return buffer.getvalue()


def locked_pdf() -> bytes:
    """A one-page PDF behind the standard security handler whose user password is not empty (the /U
    entry matches no empty password), so readers ask for a password."""
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 200 100] >>",
        b"<< /Filter /Standard /V 1 /R 2 /O <%s> /U <%s> /P -44 >>" % (b"ab" * 32, b"cd" * 32),
    ]
    file_id = b"0123456789abcdef0123456789abcdef"
    return pdf_file(objects, trailer=b"/Encrypt 4 0 R /ID [<%s> <%s>]" % (file_id, file_id))


def make_corpus(root: Path) -> dict[str, Path]:
    """Write the corpus under ``root``; returns its files by role.

    Pages to transcribe: report.pdf 3 + nested/letter.pdf 2 + huge.pdf 2 (one renders, one is too large)
    + scan.png 1 + photo.jpg 1 = 9, plus one error record each for broken.pdf and locked.pdf; the copy
    of report.pdf is a duplicate (transcribed once), notes.txt is not a document.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested").mkdir(exist_ok=True)
    files = {
        "report": root / "report.pdf",
        "duplicate": root / "nested" / "copy of report.pdf",
        "letter": root / "nested" / "letter.pdf",
        "scan": root / "scan.png",
        "photo": root / "photo.jpg",
        "broken": root / "broken.pdf",
        "locked": root / "locked.pdf",
        "huge": root / "huge.pdf",
        "notes": root / "notes.txt",
    }
    report = pdf_bytes([_page(0), _page(1), _page(2)])
    files["report"].write_bytes(report)
    files["duplicate"].write_bytes(report)
    files["letter"].write_bytes(pdf_bytes([_page(3, (400, 300)), _page(4)]))
    _page(5, (500, 300)).save(files["scan"])
    _page(6, (320, 240)).save(files["photo"], quality=90)
    files["broken"].write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage, then the file ends")
    files["locked"].write_bytes(locked_pdf())
    # Page 2 is 100 x 100 px at 0.1 dpi: 72,000 pt square, far beyond max_pixels at any usable dpi.
    small = pdf_bytes([_page(7)])
    huge_page = io.BytesIO()
    _page(8, (100, 100)).save(huge_page, "PDF", resolution=0.1)
    files["huge"].write_bytes(_two_pdfs(small, huge_page.getvalue()))
    files["notes"].write_text("not a document")
    return files


def _two_pdfs(first: bytes, second: bytes) -> bytes:
    """One PDF with the page of ``first`` then the page of ``second`` (joined by pdfium)."""
    import pypdfium2

    target = pypdfium2.PdfDocument.new()
    for data in (first, second):
        source = pypdfium2.PdfDocument(data)
        target.import_pages(source)
        source.close()
    buffer = io.BytesIO()
    target.save(buffer)
    target.close()
    return buffer.getvalue()


def make_images(root: Path, count: int, *, prefix: str = "img", size: tuple[int, int] = (64, 48)) -> list[Path]:
    """``count`` small PNGs of distinct content under ``root`` (no PDF: no render worker needed)."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = root / f"{prefix}{i:04d}.png"
        image = Image.new("RGB", size, (i * 37 % 256, i * 91 % 256, i * 53 % 256))
        ImageDraw.Draw(image).text((2, 2), str(i), fill=(255, 255, 255))
        image.save(path)
        paths.append(path)
    return paths


def bomb_pdf(operations: int = 20000) -> bytes:
    """A one-page PDF of ``operations`` filled triangles (about 6 bytes each, compressed): a few
    kilobytes that keep pdfium busy for seconds (a "content bomb")."""
    import zlib

    ops = b"".join(
        b"%d %d m %d 792 l %d 0 l h f\n" % (i % 600, i % 700, 612 - i % 600, i % 612) for i in range(operations)
    )
    stream = zlib.compress(b"0.5 g\n" + ops)
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R >>",
        b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(stream) + stream + b"\nendstream",
    ]
    return pdf_file(objects)
