"""Builders of hostile inputs shared by the catalogue (images, containers, PDFs) and a health check."""

from __future__ import annotations

import io
import struct
import zlib

from PIL import Image

#: Short answers keep the catalogue fast; the model work is the real tiny checkpoint's.
GEN = {"max_new_tokens": 1, "num_beams": 1}


def png_bytes(size: tuple[int, int] = (40, 30), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def gray_png_header_only(width: int, height: int) -> bytes:
    """A valid grayscale PNG of ``width x height`` zeros, compressed (tiny on disk, huge decoded)."""
    row = b"\x00" + b"\x00" * width  # filter byte + pixels
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def ico_with_png(declared: int, embedded: bytes) -> bytes:
    """An ICO whose directory declares ``declared`` (0 = 256) but embeds ``embedded`` (a PNG)."""
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", declared % 256, declared % 256, 0, 0, 1, 32, len(embedded), 6 + 16)
    return header + entry + embedded


def ico_with_bmp_header(width: int, height: int) -> bytes:
    """An ICO whose single BMP entry's DIB header declares ``width x height`` (no pixel data)."""
    dib = struct.pack("<IiiHHIIiiII", 40, width, height * 2, 1, 32, 0, 0, 0, 0, 0, 0)
    header = struct.pack("<HHH", 0, 1, 1)
    entry = struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(dib), 6 + 16)
    return header + entry + dib


def multi_frame_tiff(sizes: list[tuple[int, int]]) -> bytes:
    frames = [Image.new("L", size) for size in sizes]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:], compression="tiff_deflate")
    return buffer.getvalue()


def animated(fmt: str, frames: int, size: tuple[int, int] = (8, 8)) -> bytes:
    images = [Image.new("RGB", size, (i % 256, 0, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format=fmt, save_all=True, append_images=images[1:], duration=10, loop=0)
    return buffer.getvalue()
