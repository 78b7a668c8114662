"""Tests for hd4k_tools.inputs.images: every source kind, colour conversions, limits and error messages."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from hd4k_tools import errors
from hd4k_tools.inputs.images import (
    SourceBytes,
    image_content_hash,
    load_image,
    read_source_bytes,
    sniff_kind,
    to_data_url,
)
from hd4k_tools.inputs.policy import ImagePolicy


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def _sample(width: int = 32, height: int = 24, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _encode(image: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_header_only(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A small PNG whose IHDR claims ``width x height``; the pixel data is a few bytes, far too short."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


@pytest.fixture
def sample() -> Image.Image:
    return _sample()


@pytest.fixture
def sample_png(sample: Image.Image) -> bytes:
    return _encode(sample)


# ----------------------------------------------------------------------------------------------------
# sources
# ----------------------------------------------------------------------------------------------------
SOURCE_KINDS = ["str_path", "pathlib", "bytes", "bytearray", "file", "base64", "base64_lines", "data_url", "pil"]


def _as_source(kind: str, png: bytes, image: Image.Image, tmp_path: Path) -> Any:
    path = tmp_path / "sample.png"
    path.write_bytes(png)
    b64 = base64.b64encode(png).decode("ascii")
    return {
        "str_path": str(path),
        "pathlib": path,
        "bytes": png,
        "bytearray": bytearray(png),
        "file": io.BytesIO(png),
        "base64": b64,
        "base64_lines": "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),
        "data_url": f"data:image/png;base64,{b64}",
        "pil": image.copy(),
    }[kind]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_every_source_kind_round_trips_to_the_same_pixels(
    kind: str, sample: Image.Image, sample_png: bytes, tmp_path: Path
) -> None:
    assert len(base64.b64encode(sample_png)) > 512  # the long-base64 rule applies
    loaded = load_image(_as_source(kind, sample_png, sample, tmp_path))
    assert loaded.mode == "RGB"
    assert loaded.size == sample.size
    np.testing.assert_array_equal(_pixels(loaded), _pixels(sample))


def test_url_safe_base64_and_short_base64_of_a_tiny_image() -> None:
    tiny = Image.new("RGB", (2, 1), (250, 10, 20))
    png = _encode(tiny)
    short = base64.b64encode(png).decode()
    assert len(short) < 512
    np.testing.assert_array_equal(_pixels(load_image(short)), _pixels(tiny))
    big = _sample(40, 40, seed=3)
    urlsafe = base64.urlsafe_b64encode(_encode(big)).decode().rstrip("=")
    np.testing.assert_array_equal(_pixels(load_image(urlsafe)), _pixels(big))


def test_pil_image_given_directly_is_converted_and_not_mutated() -> None:
    original = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    loaded = load_image(original)
    assert loaded.mode == "RGB"
    assert loaded is not original
    assert original.mode == "RGBA"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)


def test_read_source_bytes_names_and_kinds(sample_png: bytes, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(sample_png)
    from_path = read_source_bytes(path)
    assert from_path == SourceBytes(data=sample_png, name=str(path), kind="image")
    assert read_source_bytes(sample_png).name == "<bytes>"
    pdf = read_source_bytes(b"%PDF-1.7\n...")
    assert pdf.kind == "pdf"
    assert read_source_bytes(b"hello").kind == "unknown"
    assert read_source_bytes(_sample(2, 2)).kind == "image"
    assert read_source_bytes(Image.new("CMYK", (2, 2))).kind == "image"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\x89PNG\r\n\x1a\n....", "image"),
        (b"\xff\xd8\xff\xe0....", "image"),
        (b"GIF89a...", "image"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "image"),
        (b"junk before %PDF-1.4", "pdf"),
        (b"just text", "unknown"),
        (b"\x89PNG\r\n\x1a\n...tEXt made from %PDF-1.4", "image"),
    ],
)
def test_sniff_kind(data: bytes, kind: str) -> None:
    assert sniff_kind(data) == kind


def test_a_file_object_is_read_from_its_position(sample: Image.Image, sample_png: bytes) -> None:
    handle = io.BytesIO(b"xx" + sample_png)
    handle.seek(2)
    np.testing.assert_array_equal(_pixels(load_image(handle)), _pixels(sample))


def test_text_mode_file_and_unknown_source_type_are_type_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text("hello")
    with path.open() as handle, pytest.raises(TypeError, match="binary mode"):
        load_image(handle)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="unsupported image source"):
        load_image(12345)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# colour handling
# ----------------------------------------------------------------------------------------------------
def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (40, 20), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    jpeg = _encode(image, "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(jpeg)).size == (40, 20)
    assert load_image(jpeg).size == (20, 40)


def test_rgba_is_composited_on_white() -> None:
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    image.putpixel((1, 0), (10, 20, 30, 255))  # opaque
    image.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    loaded = load_image(_encode(image))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (10, 20, 30)
    assert all(abs(v - 127) <= 1 for v in loaded.getpixel((2, 0)))


def test_palette_with_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 0
    png = _encode(image, transparency=0)
    assert Image.open(io.BytesIO(png)).mode == "P"
    loaded = load_image(png)
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (0, 200, 0)


def test_la_is_composited_on_white() -> None:
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (0, 0))
    image.putpixel((1, 0), (100, 255))
    loaded = load_image(_encode(image))
    assert loaded.getpixel((0, 0)) == (255, 255, 255)
    assert loaded.getpixel((1, 0)) == (100, 100, 100)


def test_sixteen_bit_grayscale_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    png = _encode(Image.fromarray(values))
    assert Image.open(io.BytesIO(png)).mode.startswith("I")
    loaded = load_image(png)
    assert [loaded.getpixel((x, 0))[0] for x in range(4)] == [0, 1, 128, 255]
    assert loaded.getpixel((2, 0)) == (128, 128, 128)


def test_32_bit_integer_and_float_grayscale() -> None:
    wide = Image.fromarray(np.array([[-1000, 0, 1000]], dtype=np.int32), "I")
    assert [load_image(wide).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert [load_image(unit).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_cmyk_jpeg_is_converted_to_rgb() -> None:
    image = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    jpeg = _encode(image, "JPEG", quality=95)
    assert Image.open(io.BytesIO(jpeg)).mode == "CMYK"
    red, green, blue = load_image(jpeg).getpixel((8, 8))
    assert red > 240 and green < 15 and blue < 15


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("L", (2, 2), 77), (77, 77, 77)),
        (Image.new("1", (2, 2), 1), (255, 255, 255)),
        (Image.new("P", (2, 2), 0), (0, 0, 0)),
    ],
    ids=["L", "1", "P"],
)
def test_grayscale_bilevel_and_palette(image: Image.Image, expected: tuple[int, int, int]) -> None:
    loaded = load_image(_encode(image))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((1, 1)) == expected


# ----------------------------------------------------------------------------------------------------
# bad input: class and message (the message must name the fix)
# ----------------------------------------------------------------------------------------------------
def test_empty_inputs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for source in (empty, b"", bytearray(), io.BytesIO(b""), "", "   "):
        with pytest.raises(errors.EmptyInputError, match=r"non-empty|pass a path"):
            load_image(source)


def test_truncated_png_and_jpeg_are_corrupt(sample: Image.Image) -> None:
    png = _encode(_sample(64, 64))
    jpeg = _encode(_sample(64, 64), "JPEG")
    for data in (png[: len(png) // 2], jpeg[: len(jpeg) // 2]):
        with pytest.raises(errors.CorruptImageError, match="re-export or re-download") as info:
            load_image(data)
        assert isinstance(info.value.__cause__, Exception)


def test_text_file_named_png(tmp_path: Path) -> None:
    fake = tmp_path / "notes.png"
    fake.write_text("these are my meeting notes, not an image\n" * 5)
    with pytest.raises(errors.UnsupportedFormatError, match=r"text.*real image file.*Supported formats: PNG"):
        load_image(fake)


def test_unknown_binary_format_lists_supported_formats() -> None:
    with pytest.raises(errors.UnsupportedFormatError, match=r"convert it to PNG or JPEG.*PNG, JPEG, WEBP"):
        load_image(bytes(range(256)) * 4)


def test_svg_is_refused_with_a_hint() -> None:
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    with pytest.raises(errors.UnsupportedFormatError, match="rasterize"):
        load_image(svg)


def test_pdf_given_to_load_image() -> None:
    pdf = _encode(_sample(10, 10), "PDF")
    with pytest.raises(errors.UnsupportedFormatError, match="render_pages"):
        load_image(pdf)


@pytest.mark.parametrize(
    "text",
    ["A" * 601, "QUJD" * 100 + "=" + "QUJD" * 100],
    ids=["bad-length", "padding-in-the-middle"],
)
def test_bad_base64(text: str) -> None:
    with pytest.raises(errors.InvalidBase64Error, match="base64-encoded"):
        load_image(text)


@pytest.mark.parametrize(
    ("url", "fix"),
    [
        ("data:image/png;base64", "no ','"),
        ("data:image/png,%89PNG", "percent-encoded"),
        ("data:text/plain;base64,aGVsbG8=", "not an image"),
        ("data:;base64,aGVsbG8=", "not an image"),
        ("data:image/png;base64,@@@notbase64@@@", "re-encode"),
    ],
)
def test_bad_data_urls(url: str, fix: str) -> None:
    with pytest.raises(errors.InvalidDataURLError, match=fix) as info:
        load_image(url)
    assert "data:image/png;base64" in str(info.value) or "re-encode" in str(info.value)


def test_other_url_schemes_are_refused() -> None:
    for url in ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/"):
        with pytest.raises(errors.URLNotAllowedError, match=r"only http:// and https://"):
            load_image(url)


def test_urls_are_off_by_default() -> None:
    with pytest.raises(errors.URLNotAllowedError, match="allow_urls=True"):
        load_image("https://example.com/cat.png")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(errors.ImageNotFoundError, match="check the path") as info:
        load_image(tmp_path / "nope.png")
    assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(errors.ImageNotFoundError, match="is a directory"):
        load_image(tmp_path)


def test_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(errors.ImageNotFoundError, match="not a regular file"):
        load_image(fifo)  # opening a FIFO would block until a writer appears


def test_errors_are_value_errors_too() -> None:
    with pytest.raises(ValueError):
        load_image(b"")


# ----------------------------------------------------------------------------------------------------
# size limits
# ----------------------------------------------------------------------------------------------------
def _forbid_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = PngImagePlugin.PngImageFile.load

    def spy(self: Any) -> Any:
        calls.append("load")
        return original(self)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", spy)
    return calls


@pytest.mark.parametrize("side", [20_000, 9_000], ids=["past-pillow-limit", "past-max-pixels"])
def test_decompression_bomb_is_refused_from_the_header(monkeypatch: pytest.MonkeyPatch, side: int) -> None:
    bomb = _png_header_only(side, side, bit_depth=1)
    assert len(bomb) < 200
    calls = _forbid_pixel_decoding(monkeypatch)
    max_pixels_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(errors.ImageTooLargeError, match=rf"{side * side:,}|{side * side}") as info:
        load_image(bomb)
    message = str(info.value)
    assert "max_pixels=64,000,000" in message
    assert "Downscale" in message or "downscale" in message
    assert calls == []
    assert max_pixels_before == Image.MAX_IMAGE_PIXELS  # global Pillow state untouched


def test_max_pixels_override_and_pil_images_are_checked(sample_png: bytes) -> None:
    with pytest.raises(errors.ImageTooLargeError, match="raise max_pixels"):
        load_image(sample_png, max_pixels=100)
    with pytest.raises(errors.ImageTooLargeError, match="32x24"):
        load_image(_sample(), policy=ImagePolicy(max_pixels=100))
    assert load_image(sample_png, max_pixels=32 * 24).size == (32, 24)


def test_max_bytes_applies_to_every_source_kind(sample_png: bytes, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(sample_png)
    b64 = base64.b64encode(sample_png).decode()
    sources = [path, sample_png, io.BytesIO(sample_png), b64, f"data:image/png;base64,{b64}"]
    for source in sources:
        with pytest.raises(errors.FileTooLargeError, match="raise max_bytes"):
            load_image(source, max_bytes=100)


def test_unknown_override_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"max_pixelz.*max_pixels"):
        load_image(b"x", max_pixelz=5)


def test_policy_validation() -> None:
    with pytest.raises(ValueError, match="max_pixels"):
        ImagePolicy(max_pixels=0)
    with pytest.raises(ValueError, match="max_redirects"):
        ImagePolicy(max_redirects=-1)
    policy = ImagePolicy(allowed_roots=["/tmp"], allowed_private_hosts={"LocalHost."})  # type: ignore[arg-type]
    assert policy.allowed_roots == (Path("/tmp"),)
    assert policy.allowed_private_hosts == frozenset({"localhost"})
    with pytest.raises(AttributeError):
        policy.max_pixels = 5  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------------
# allowed_roots
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def rooted(tmp_path: Path, sample_png: bytes) -> tuple[Path, Path]:
    root = tmp_path / "root" / "inner"
    root.mkdir(parents=True)
    (root / "ok.png").write_bytes(sample_png)
    outside = tmp_path / "secret.png"
    outside.write_bytes(sample_png)
    return root, outside


def test_file_inside_root_works(rooted: tuple[Path, Path], sample: Image.Image) -> None:
    root, _ = rooted
    loaded = load_image(root / "ok.png", allowed_roots=(root,))
    np.testing.assert_array_equal(_pixels(loaded), _pixels(sample))
    (root / "link.png").symlink_to(root / "ok.png")
    assert load_image(str(root / "link.png"), allowed_roots=(root,)).size == sample.size


def test_dotdot_escape_is_refused(rooted: tuple[Path, Path]) -> None:
    root, _ = rooted
    with pytest.raises(errors.PathNotAllowedError, match="outside the allowed directories") as info:
        load_image(str(root / "../../etc/passwd"), allowed_roots=(root,))
    message = str(info.value)
    assert str(root.resolve()) in message
    assert "root:" not in message  # nothing of /etc/passwd leaks
    assert isinstance(info.value, PermissionError)
    with pytest.raises(errors.PathNotAllowedError):
        load_image("../../etc/passwd", allowed_roots=(root,))


def test_symlink_out_of_root_is_refused(rooted: tuple[Path, Path]) -> None:
    root, outside = rooted
    link = root / "innocent.png"
    link.symlink_to(outside)
    with pytest.raises(errors.PathNotAllowedError, match="add its directory to allowed_roots") as info:
        load_image(link, allowed_roots=[root])
    assert "secret" not in str(info.value)  # the link's target is not revealed
    assert load_image(link).size == (32, 24)  # without roots it is an ordinary file


def test_missing_file_outside_root_is_refused_not_reported_missing(rooted: tuple[Path, Path]) -> None:
    root, outside = rooted
    with pytest.raises(errors.PathNotAllowedError):
        load_image(outside.parent / "does-not-exist.png", allowed_roots=[root])
    with pytest.raises(errors.ImageNotFoundError):
        load_image(root / "does-not-exist.png", allowed_roots=[root])


def test_roots_that_are_symlinks_are_resolved(rooted: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = rooted
    alias = tmp_path / "alias"
    alias.symlink_to(root, target_is_directory=True)
    assert load_image(alias / "ok.png", allowed_roots=[alias]).size == (32, 24)


# ----------------------------------------------------------------------------------------------------
# robustness: damaged bytes never escape as a bare Pillow/OS error
# ----------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_mutated_images_raise_only_typed_errors(fmt: str) -> None:
    original = _encode(_sample(24, 24, seed=1), fmt)
    rng = np.random.RandomState(42)
    for _ in range(30):
        data = bytearray(original)
        for position in rng.randint(0, len(data), size=rng.randint(1, 8)):
            data[position] = rng.randint(0, 256)
        cut = len(data) if rng.rand() < 0.5 else rng.randint(1, len(data))
        try:
            image = load_image(bytes(data[:cut]))
        except errors.HD4KError:
            continue
        assert image.mode == "RGB"


# ----------------------------------------------------------------------------------------------------
# helpers for callers
# ----------------------------------------------------------------------------------------------------
def test_image_content_hash() -> None:
    first, same = _sample(seed=5), _sample(seed=5)
    assert image_content_hash(first) == image_content_hash(same)
    assert len(image_content_hash(first)) == 64
    assert image_content_hash(first) != image_content_hash(_sample(seed=6))
    assert image_content_hash(Image.new("L", (2, 2))) != image_content_hash(Image.new("L", (1, 4)))
    assert image_content_hash(Image.new("L", (2, 2))) != image_content_hash(Image.new("1", (2, 2)))


def test_to_data_url_round_trips(sample: Image.Image) -> None:
    url = to_data_url(sample)
    assert url.startswith("data:image/png;base64,")
    np.testing.assert_array_equal(_pixels(load_image(url)), _pixels(sample))
    jpeg_url = to_data_url(Image.new("RGBA", (4, 4), (0, 0, 255, 255)), format="jpeg")
    assert jpeg_url.startswith("data:image/jpeg;base64,")
    assert load_image(jpeg_url).size == (4, 4)
    with pytest.raises(errors.UnsupportedFormatError, match="PNG"):
        to_data_url(sample, format="NOPE")


def test_no_global_pillow_state_is_changed(sample_png: bytes) -> None:
    from PIL import ImageFile

    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    load_image(sample_png)
    with pytest.raises(errors.CorruptImageError):
        load_image(sample_png[:-40])
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
