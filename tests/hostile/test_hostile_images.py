"""Hostile image bytes (issue 12, item 3 and the load_image catalogue): containers whose embedded images or
frames break the header's promise, bombs, damaged data, bad data URLs and base64, wrong types. Each is a
typed error decided from headers (no big decode), and a normal load works right after."""

from __future__ import annotations

import base64
import io
import resource
from collections.abc import Callable

import pytest
from hostile_support import (
    animated,
    gray_png_header_only,
    ico_with_bmp_header,
    ico_with_png,
    multi_frame_tiff,
    png_bytes,
)
from PIL import Image

from hd4k_tools import ImagePolicy, errors, load_image
from hd4k_tools.inputs.images import probe_image

SMALL = ImagePolicy(max_pixels=1_000_000)


def _over_small() -> bytes:
    return gray_png_header_only(1200, 1000)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return gray_png_header_only(12000, 12000)  # 144 Mpx of zeros, ~140 KB compressed


def test_ico_declaring_256_but_embedding_12000px_png_is_refused_before_decoding(big_png: bytes) -> None:
    data = ico_with_png(0, big_png)
    before = _peak_rss_mb()
    with pytest.raises(errors.ImageTooLargeError, match="embedded image 1"):
        load_image(data)
    # Decoding 12000x12000 would have cost 144+ MB; the refusal is decided from the embedded IHDR.
    assert _peak_rss_mb() - before < 100
    assert load_image(ico_with_png(0, png_bytes((64, 64)))).size == (64, 64)


def test_probe_reports_the_embedded_size_of_an_ico() -> None:
    header = probe_image(ico_with_png(16, png_bytes((300, 200))), policy=ImagePolicy())
    assert (header.width, header.height, header.format) == (300, 200, "ICO")


HOSTILE_BYTES: list[tuple[str, Callable[[], bytes], type[Exception]]] = [
    (
        "ico-embedded-png-over-limit",
        lambda: ico_with_png(0, gray_png_header_only(1200, 1000)),
        errors.ImageTooLargeError,
    ),
    ("ico-bmp-entry-over-limit", lambda: ico_with_bmp_header(4000, 4000), errors.ImageTooLargeError),
    ("ico-entry-past-end", lambda: ico_with_png(16, b"")[:22], errors.InputError),
    ("ico-truncated-directory", lambda: ico_with_png(16, png_bytes())[:12], errors.InputError),
    ("tiff-second-frame-over-limit", lambda: multi_frame_tiff([(8, 8), (1100, 1000)]), errors.ImageTooLargeError),
    ("tiff-third-frame-over-limit", lambda: multi_frame_tiff([(8, 8), (8, 8), (2000, 600)]), errors.ImageTooLargeError),
    ("png-bomb", lambda: gray_png_header_only(2000, 2000), errors.ImageTooLargeError),
    ("png-wide-bomb", lambda: gray_png_header_only(1_000_001, 1), errors.ImageTooLargeError),
    ("png-tall-bomb", lambda: gray_png_header_only(1, 1_000_001), errors.ImageTooLargeError),
    ("truncated-png", lambda: png_bytes()[:60], errors.CorruptImageError),
    ("png-bad-crc-header", lambda: png_bytes()[:16] + b"\xff\xff\xff\xff" + png_bytes()[20:], errors.InputError),
    ("png-signature-only", lambda: b"\x89PNG\r\n\x1a\n", errors.InputError),
    ("jpeg-soi-only", lambda: b"\xff\xd8\xff", errors.InputError),
    ("gif-header-only", lambda: b"GIF89a", errors.InputError),
    ("bmp-header-only", lambda: b"BM" + b"\x00" * 10, errors.InputError),
    ("tiff-header-only", lambda: b"II*\x00\x08\x00\x00\x00", errors.InputError),
    ("random-bytes", lambda: bytes(range(256)) * 4, errors.UnsupportedFormatError),
    ("svg", lambda: b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", errors.UnsupportedFormatError),
    ("text", lambda: b"hello, this is not an image\n" * 4, errors.UnsupportedFormatError),
    ("pdf-as-image", lambda: b"%PDF-1.4\n%%EOF\n", errors.UnsupportedFormatError),
    ("eps", lambda: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", errors.UnsupportedFormatError),
    ("empty", lambda: b"", errors.EmptyInputError),
]


@pytest.mark.parametrize(("make", "error"), [(m, e) for _, m, e in HOSTILE_BYTES], ids=[n for n, _, _ in HOSTILE_BYTES])
def test_hostile_bytes_are_typed_errors(make: Callable[[], bytes], error: type[Exception], good_png: bytes) -> None:
    with pytest.raises(error):
        load_image(make(), policy=SMALL)
    assert load_image(good_png, policy=SMALL).size == (40, 30)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_frame_count_is_capped(fmt: str, good_png: bytes) -> None:
    data = animated(fmt, 12)
    frames = Image.open(io.BytesIO(data)).n_frames  # an encoder may merge identical frames
    assert frames >= 2
    with pytest.raises(errors.ImageTooLargeError, match="max_frames"):
        load_image(data, policy=ImagePolicy(max_frames=frames - 1))
    assert load_image(data, policy=ImagePolicy(max_frames=frames)).size == (8, 8)
    assert load_image(good_png).size == (40, 30)


def test_multi_frame_tiff_within_limits_loads_its_first_frame() -> None:
    assert load_image(multi_frame_tiff([(30, 20), (10, 10)]), policy=SMALL).size == (30, 20)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_STRINGS: list[tuple[str, str, type[Exception]]] = [
    ("data-url-no-comma", "data:image/png;base64", errors.InvalidDataURLError),
    ("data-url-not-base64", "data:image/png,abc", errors.InvalidDataURLError),
    ("data-url-text-type", "data:text/plain;base64,aGVsbG8=", errors.InvalidDataURLError),
    ("data-url-bad-payload", "data:image/png;base64,@@@@", errors.InvalidDataURLError),
    ("data-url-empty-payload", "data:image/png;base64,", errors.EmptyInputError),
    ("data-url-surrogate", "data:image/png;base64,\ud800\ud800", errors.InputError),
    ("data-url-bomb", "data:image/png;base64," + _b64(gray_png_header_only(2000, 2000)), errors.ImageTooLargeError),
    (
        "data-url-ico-bomb",
        "data:image/x-icon;base64," + _b64(ico_with_png(0, gray_png_header_only(1200, 1000))),
        errors.ImageTooLargeError,
    ),
    ("base64-garbage", "A" * 600 + "!", errors.InputError),
    ("base64-not-image", _b64(b"hello world, not an image" * 30), errors.UnsupportedFormatError),
    ("ftp-scheme", "ftp://example.com/a.png", errors.URLNotAllowedError),
    ("file-scheme", "file:///etc/passwd", errors.URLNotAllowedError),
    ("javascript-scheme", "javascript://alert(1)", errors.URLNotAllowedError),
    ("url-disabled", "http://example.com/a.png", errors.URLNotAllowedError),
    ("bracket-unclosed", "http://[::1", errors.URLNotAllowedError),
    ("bracket-ipv4", "http://[127.0.0.1]/", errors.URLNotAllowedError),
    ("bracket-garbage", "https://[zz::zz]:80/x.png", errors.URLNotAllowedError),
    ("bracket-creds", "http://user:pw@[::1/", errors.URLNotAllowedError),
    ("whitespace", "   \n\t ", errors.EmptyInputError),
    ("lone-surrogate-path", "photo\ud800.png", errors.InputError),
]


@pytest.mark.parametrize(("text", "error"), [(t, e) for _, t, e in BAD_STRINGS], ids=[n for n, _, _ in BAD_STRINGS])
def test_hostile_strings_are_typed_errors(text: str, error: type[Exception], good_png: bytes) -> None:
    with pytest.raises(error) as caught:
        load_image(text, policy=SMALL)
    if "user:pw" in text:
        assert "pw" not in str(caught.value)  # credentials never echoed
    assert load_image(good_png).size == (40, 30)


@pytest.mark.parametrize(
    "text", ["http://[::1", "http://[127.0.0.1]/", "https://[::ffff:10.0.0.1", "http://[fe80::1%25eth0"]
)
def test_malformed_bracketed_urls_with_urls_enabled_are_typed(text: str) -> None:
    with pytest.raises(errors.InputError):
        load_image(text, policy=ImagePolicy(allow_urls=True, url_timeout=2))


WRONG_TYPES: list[tuple[str, object]] = [
    ("int", 42),
    ("float", 1.5),
    ("none", None),
    ("list", [b"abc"]),
    ("dict", {"path": "a.png"}),
    ("text-file-object", io.StringIO("abc")),
]


@pytest.mark.parametrize("value", [v for _, v in WRONG_TYPES], ids=[n for n, _ in WRONG_TYPES])
def test_wrong_source_types_are_type_errors(value: object, good_png: bytes) -> None:
    with pytest.raises(TypeError):
        load_image(value)  # type: ignore[arg-type]
    assert load_image(good_png).size == (40, 30)


def test_pil_image_over_the_limit_is_refused() -> None:
    with pytest.raises(errors.ImageTooLargeError):
        load_image(Image.new("L", (1100, 1000)), policy=SMALL)


def test_exif_rotated_header_size_matches_decoded_size() -> None:
    image = Image.new("RGB", (60, 20), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: the decoded image is 20x60
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    header = probe_image(buffer.getvalue(), policy=ImagePolicy())
    assert (header.width, header.height) == load_image(buffer.getvalue()).size == (20, 60)
