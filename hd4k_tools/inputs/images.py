"""Turn whatever an agent hands us (a path, bytes, base64, a ``data:`` URL, a URL, a PIL image) into an
RGB :class:`PIL.Image.Image`, under explicit limits for untrusted input.

Every limit lives in an :class:`ImagePolicy` that is passed down explicitly; nothing here reads or
changes global state (Pillow's ``MAX_IMAGE_PIXELS`` and ``LOAD_TRUNCATED_IMAGES`` are left alone).
:func:`read_source_bytes` is the one place that turns a source into bytes; :func:`load_image` and
:mod:`hd4k_tools.inputs.pdf` both build on it.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import io
import os
import re
import stat
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from hd4k_tools.errors import (
    CLI,
    PYTHON,
    CorruptImageError,
    EmptyInputError,
    FileTooLargeError,
    HD4KError,
    ImageNotFoundError,
    ImageTooLargeError,
    InputError,
    InvalidBase64Error,
    InvalidDataURLError,
    PathNotAllowedError,
    UnsupportedFormatError,
    URLNotAllowedError,
)
from hd4k_tools.inputs.policy import ImagePolicy, resolve_policy
from hd4k_tools.inputs.urlfetch import fetch_url

__all__ = [
    "SUPPORTED_FORMATS",
    "ImageHeader",
    "ImagePolicy",
    "ImageSource",
    "SourceBytes",
    "SourceKind",
    "image_content_hash",
    "load_image",
    "probe_image",
    "read_source_bytes",
    "sniff_kind",
    "to_data_url",
]

ImageSource: TypeAlias = str | os.PathLike[str] | bytes | bytearray | BinaryIO | Image.Image
SourceKind: TypeAlias = Literal["image", "pdf", "unknown"]

#: Pillow formats we decode. An allow-list: Pillow can open formats (EPS via Ghostscript, for one) that
#: have no business being fed untrusted bytes.
SUPPORTED_FORMATS: tuple[str, ...] = (
    "PNG",
    "JPEG",
    "WEBP",
    "GIF",
    "BMP",
    "TIFF",
    "ICO",
    "PPM",
    "TGA",
    "JPEG2000",
    "AVIF",
)

# A string longer than this made only of base64 characters is base64, not a path: real paths are rarely
# this long, and a JPEG's base64 starts with "/9j/", which would otherwise look like an absolute path.
_BASE64_MIN_LEN = 512
_BASE64_RE = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# Longer strings are never looked up as file names (PATH_MAX on Linux is 4096).
_MAX_PATH_CHARS = 4096

_IMAGE_MAGIC: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",  # JPEG
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",  # TIFF, little endian
    b"MM\x00*",  # TIFF, big endian
    b"\x00\x00\x01\x00",  # ICO
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000 (jp2)
    b"\xffO\xffQ",  # JPEG 2000 codestream
)
_PNG_MODES = frozenset({"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"})
# The PDF spec lets readers accept junk before the header; pdfium looks within the first 1 KiB.
_PDF_HEADER_WINDOW = 1024


@dataclass(frozen=True)
class SourceBytes:
    """The raw bytes of a source, before any decoding.

    Attributes:
        data: the encoded bytes (never empty).
        name: where they came from, for messages: the path, ``"<bytes>"``, ``"<base64>"``,
            ``"<data URL>"``, ``"<url https://host/path>"`` (credentials removed)...
        kind: ``"image"`` or ``"pdf"`` when the magic bytes say so, else ``"unknown"``.
    """

    data: bytes
    name: str
    kind: SourceKind


def sniff_kind(data: bytes) -> SourceKind:
    """Classify encoded bytes by their magic numbers: ``"pdf"``, ``"image"`` or ``"unknown"``."""
    # Image signatures sit at offset 0, so they are tested first: an image's metadata may mention "%PDF-".
    if data.startswith(_IMAGE_MAGIC):
        return "image"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image"
    if data[4:8] == b"ftyp" and data[8:12] in (b"avif", b"avis"):
        return "image"
    if b"%PDF-" in data[:_PDF_HEADER_WINDOW]:
        return "pdf"
    return "unknown"


# ----------------------------------------------------------------------------------------------------
# Source -> bytes
# ----------------------------------------------------------------------------------------------------
def read_source_bytes(source: ImageSource | SourceBytes, *, policy: ImagePolicy | None = None) -> SourceBytes:
    """Read a source into bytes, applying ``policy``, without decoding it.

    Accepted sources: a path (``str`` or :class:`os.PathLike`), ``bytes``/``bytearray``, a binary file
    object, a base64 string, a ``data:`` URL, an ``http(s)://`` URL (only with ``allow_urls``) and a
    PIL image (encoded to PNG). Strings are dispatched like :func:`load_image` describes. A
    :class:`SourceBytes` (already read) is checked against ``max_bytes`` and returned, so callers can
    sniff ``kind`` first and hand it on without losing its ``name``.

    Raises:
        EmptyInputError, FileTooLargeError, ImageNotFoundError, PathNotAllowedError,
        InvalidBase64Error, InvalidDataURLError, URLNotAllowedError, URLFetchError.
    """
    policy = policy if policy is not None else ImagePolicy()
    if isinstance(source, SourceBytes):
        return _wrap(_check_size(source.data, source.name, policy), source.name)
    if isinstance(source, Image.Image):
        image = source if source.mode in _PNG_MODES else _to_rgb(source, "<PIL image>")
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return _wrap(buffer.getvalue(), "<PIL image>")
    if isinstance(source, bytes | bytearray | memoryview):
        return _wrap(_check_size(bytes(source), "<bytes>", policy), "<bytes>")
    if isinstance(source, str):
        return _from_string(source, policy)
    if isinstance(source, os.PathLike):
        return _from_path(source, policy)
    if hasattr(source, "read"):
        return _from_file(source, policy)
    raise TypeError(
        f"unsupported image source of type {type(source).__name__}; pass a path, bytes, a binary file "
        "object, a base64 string, a data: URL, an http(s) URL or a PIL image"
    )


def _wrap(data: bytes, name: str) -> SourceBytes:
    if not data:
        raise EmptyInputError(f"{name} is empty (0 bytes); pass a non-empty image or PDF.")
    return SourceBytes(data=data, name=name, kind=sniff_kind(data))


def _check_size(data: bytes, name: str, policy: ImagePolicy) -> bytes:
    if len(data) > policy.max_bytes:
        raise _too_many_bytes(name, f"{len(data):,} bytes", policy)
    return data


def _too_many_bytes(name: str, size: str, policy: ImagePolicy) -> FileTooLargeError:
    return FileTooLargeError(
        f"{name} is too large ({size}; the limit is max_bytes={policy.max_bytes:,}); pass a smaller "
        "or more compressed file, or raise max_bytes in the ImagePolicy."
    )


def _from_string(source: str, policy: ImagePolicy) -> SourceBytes:
    text = source.strip()
    if not text:
        raise EmptyInputError("the image source is an empty string; pass a path, URL or base64 data.")
    lowered = text[:16].lower()
    if lowered.startswith("data:"):
        return _from_data_url(text, policy)
    if lowered.startswith(("http://", "https://")):
        return _from_url(text, policy)
    scheme = _SCHEME_RE.match(text)
    if scheme:
        raise URLNotAllowedError(
            f"URL scheme {scheme.group(1)!r} is not supported; only http:// and https:// URLs (with "
            "allow_urls=True) or local paths are accepted."
        )
    if _BASE64_RE.fullmatch(text):
        if _names_file(source, policy):  # an existing file wins, whatever its name looks like
            return _from_path(source, policy)
        if len(text) > _BASE64_MIN_LEN:
            return _from_base64(text, "<base64>", policy)
        short = _short_base64(text, policy)
        if short is not None:
            return short
    return _from_path(source, policy)


def _names_file(source: str, policy: ImagePolicy) -> bool:
    """Whether ``source`` names an existing regular file the policy lets us read. Under ``allowed_roots``
    only files inside a root count, so that the answer reveals nothing about files elsewhere (such a
    string is then read as base64, as before, and a file outside the roots is never opened)."""
    if len(source) > _MAX_PATH_CHARS or "\x00" in source:
        return False
    try:
        resolved = Path(os.path.realpath(Path(source).expanduser()))
        if policy.allowed_roots is not None:
            roots = [Path(os.path.realpath(root.expanduser())) for root in policy.allowed_roots]
            if not any(resolved.is_relative_to(root) for root in roots):
                return False
        return resolved.is_file()
    except (OSError, RuntimeError, ValueError):
        return False


def _short_base64(text: str, policy: ImagePolicy) -> SourceBytes | None:
    """A short base64 string (a tiny image) is taken as base64 only if it decodes to a known signature."""
    try:
        decoded = _from_base64(text, "<base64>", policy)
    except HD4KError:
        return None
    return decoded if decoded.kind != "unknown" else None


def _from_url(url: str, policy: ImagePolicy) -> SourceBytes:
    fetched = fetch_url(url, policy=policy)
    return _wrap(fetched.data, f"<url {fetched.url}>")


def _from_base64(text: str, name: str, policy: ImagePolicy) -> SourceBytes:
    payload = re.sub(r"\s+", "", text)
    if not payload:
        raise EmptyInputError(f"{name} has an empty payload; pass non-empty base64 data.")
    if len(payload) * 3 // 4 > policy.max_bytes:
        raise _too_many_bytes(name, f"about {len(payload) * 3 // 4:,} bytes decoded", policy)
    if "-" in payload or "_" in payload:  # the URL-safe alphabet
        payload = payload.replace("-", "+").replace("_", "/")
    payload += "=" * (-len(payload) % 4)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise InvalidBase64Error(
            f"{name} is not valid base64 ({err}); send the file's bytes base64-encoded (standard or "
            "URL-safe alphabet), or a data:image/...;base64,... URL."
        ) from err
    return _wrap(data, name)


def _from_data_url(url: str, policy: ImagePolicy) -> SourceBytes:
    name = "<data URL>"
    header, comma, payload = url.partition(",")
    if not comma:
        raise InvalidDataURLError(
            "the data: URL has no ',' separating the header from the data; use data:image/png;base64,<base64 bytes>."
        )
    params = [p.strip().lower() for p in header[len("data:") :].split(";")]
    media_type, extras = params[0], params[1:]
    if "base64" not in extras:
        raise InvalidDataURLError(
            "the data: URL is not base64-encoded (no ';base64'); percent-encoded data URLs are not "
            "supported. Use data:image/png;base64,<base64 bytes>."
        )
    if not (media_type.startswith("image/") or media_type == "application/pdf"):
        shown = media_type or "(none)"
        raise InvalidDataURLError(
            f"the data: URL has media type {shown!r}, which is not an image; use an image/... media "
            "type (e.g. data:image/png;base64,...) or application/pdf for documents."
        )
    try:
        return _from_base64(payload, name, policy)
    except InvalidBase64Error as err:
        raise InvalidDataURLError(
            f"the data: URL's payload is not valid base64; re-encode the file as base64 ({err})."
        ) from err


def _from_path(source: str | os.PathLike[str], policy: ImagePolicy) -> SourceBytes:
    """Open the file once, without following a final symlink and without blocking, check what was
    opened from its descriptor, and read from that descriptor (bounded by ``max_bytes``)."""
    try:
        shown = os.fspath(source)
    except TypeError as err:
        raise ImageNotFoundError(f"the path {source!r} is not a file path ({err}); pass a str path.") from err
    if isinstance(shown, bytes):
        shown = os.fsdecode(shown)
    if "\x00" in shown:
        raise ImageNotFoundError(
            f"the path {shown!r} contains a NUL byte, which no file name can hold; pass the real path."
        )
    try:
        path = Path(shown).expanduser()
        # Symlinks resolved once, here; the open below refuses any symlink it meets after this point.
        resolved = Path(os.path.realpath(path))
    except (OSError, RuntimeError, ValueError) as err:  # RuntimeError: a symlink loop (Python < 3.13)
        raise _not_found(shown, err) from err
    if policy.allowed_roots is not None:
        # Checked before existence too, so that a caller cannot probe for files outside the roots.
        root = _check_allowed(resolved, shown, policy.allowed_roots)
        fd = _open_beneath(root, resolved, shown)
    else:
        fd = _open_file(str(resolved), shown)
    try:
        return _wrap(_read_descriptor(fd, shown, policy), shown)
    finally:
        os.close(fd)


# O_NONBLOCK: opening a FIFO must not wait for a writer; O_NOFOLLOW: a symlink swapped in after the
# realpath above is refused rather than followed. Windows lacks both (and FIFOs).
_NOFOLLOW_CLOEXEC = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_OPEN_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | _NOFOLLOW_CLOEXEC
_OPEN_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW_CLOEXEC
_CAN_WALK = os.open in os.supports_dir_fd and hasattr(os, "O_NOFOLLOW") and hasattr(os, "O_DIRECTORY")


def _open_file(path: str, shown: str, dir_fd: int | None = None) -> int:
    try:
        return os.open(path, _OPEN_FILE_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        raise _open_error(err, shown) from err


def _open_error(err: OSError, shown: str) -> InputError:
    if err.errno in (errno.ELOOP, errno.EMLINK, errno.ENOTDIR):
        return PathNotAllowedError(
            f"{shown!r} could not be opened without following a symlink: a symlink loop, or a path that "
            "changed while it was being opened; pass a stable path to a regular file."
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return ImageNotFoundError(f"cannot read {shown!r} ({_reason(err)}); check its permissions.")
    return _not_found(shown, err)


def _not_found(shown: str, err: BaseException) -> ImageNotFoundError:
    # Other ways to hand over an image exist in Python only; on the command line the path is the way.
    return ImageNotFoundError(
        f"no file at {shown!r} ({_reason(err)}); check the path.",
        hints={PYTHON: "Or pass the image as bytes, base64 or a URL.", CLI: "Give the path of an existing file."},
    )


def _open_beneath(root: Path, resolved: Path, shown: str) -> int:
    """Open ``resolved`` (symlink-free, inside ``root``) component by component from ``root`` with
    ``O_NOFOLLOW``, so a folder swapped for a symlink after the check cannot lead outside the root."""
    parts = resolved.relative_to(root).parts
    if not _CAN_WALK:  # pragma: no cover - non-POSIX: open, then compare with what the check saw
        fd = _open_file(str(resolved), shown)
        if not Path(os.path.realpath(resolved)).is_relative_to(root):
            os.close(fd)
            raise _open_error(OSError(errno.ELOOP, "path changed"), shown)
        return fd
    if not parts:
        raise ImageNotFoundError(f"{shown!r} is a directory, not a file; pass the path of an image file.")
    try:
        current = os.open(root, _OPEN_DIR_FLAGS)
    except OSError as err:
        raise _open_error(err, shown) from err
    try:
        for part in parts[:-1]:
            try:
                step = os.open(part, _OPEN_DIR_FLAGS, dir_fd=current)
            except OSError as err:
                raise _open_error(err, shown) from err
            os.close(current)
            current = step
        return _open_file(parts[-1], shown, dir_fd=current)
    finally:
        os.close(current)


def _read_descriptor(fd: int, shown: str, policy: ImagePolicy) -> bytes:
    """Check from the open descriptor that it is a non-empty regular file within ``max_bytes``, then
    read at most ``max_bytes + 1`` bytes from it."""
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise ImageNotFoundError(f"{shown!r} is a directory, not a file; pass the path of an image file.")
    if not stat.S_ISREG(info.st_mode):  # a FIFO, socket or device could block or never end
        raise ImageNotFoundError(f"{shown!r} is not a regular file; pass the path of an image file.")
    if info.st_size == 0:
        raise EmptyInputError(f"{shown!r} is empty (0 bytes); pass a non-empty image or PDF file.")
    if info.st_size > policy.max_bytes:
        raise _too_many_bytes(repr(shown), f"{info.st_size:,} bytes", policy)
    chunks: list[bytes] = []
    left = policy.max_bytes + 1
    try:
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as err:
        raise ImageNotFoundError(f"cannot read {shown!r} ({_reason(err)}); check its permissions.") from err
    return _check_size(b"".join(chunks), repr(shown), policy)


def _check_allowed(resolved: Path, shown: str, roots: tuple[Path, ...]) -> Path:
    """The allowed root (symlinks resolved) that holds ``resolved``; PathNotAllowedError if none does."""
    resolved_roots = [Path(os.path.realpath(root.expanduser())) for root in roots]
    for root in resolved_roots:
        if resolved.is_relative_to(root):
            return root
    allowed = ", ".join(repr(str(root)) for root in resolved_roots) or "(none)"
    raise PathNotAllowedError(
        f"path {shown!r} is outside the allowed directories ({allowed}), after following symlinks "
        "and '..'; pass a file inside one of them, or add its directory to allowed_roots (ImagePolicy.allowed_roots; "
        "for the agent tools, ToolSettings.allowed_root)."
    )


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return type(err).__name__


def _from_file(handle: BinaryIO, policy: ImagePolicy) -> SourceBytes:
    name = str(getattr(handle, "name", "<file>"))
    try:
        data = handle.read(policy.max_bytes + 1)
    except OSError as err:
        raise ImageNotFoundError(f"cannot read the file object {name!r} ({_reason(err)}).") from err
    if isinstance(data, str):
        raise TypeError(f"file object {name!r} is open in text mode; open it in binary mode ('rb').")
    return _wrap(_check_size(bytes(data), name, policy), name)


# ----------------------------------------------------------------------------------------------------
# Bytes -> RGB image
# ----------------------------------------------------------------------------------------------------
def load_image(
    source: ImageSource | SourceBytes, *, policy: ImagePolicy | None = None, **overrides: Any
) -> Image.Image:
    """Load an image from any supported source as an RGB :class:`PIL.Image.Image`.

    Sources: a path (``str`` or :class:`os.PathLike`), ``bytes``/``bytearray``, a binary file object,
    a base64 string, a ``data:`` URL, an ``http(s)://`` URL (only with ``allow_urls=True``), a PIL
    image (still checked against ``max_pixels`` and converted) or a :class:`SourceBytes`.

    A string is read as: a ``data:`` URL if it starts with ``data:``; a URL if it starts with
    ``http://`` or ``https://``; refused if it starts with any other ``scheme://``; base64 if it is
    made only of base64 characters (standard or URL-safe alphabet, whitespace allowed) and is either
    longer than 512 characters or decodes to bytes with an image/PDF signature; otherwise a file path
    (``~`` expanded).

    The result has EXIF orientation applied; transparency (RGBA, LA, P or L/RGB with a transparent
    colour) is composited on white; 16-bit and 32-bit grayscale are scaled (not clipped) to 8 bits;
    CMYK, palette, grayscale and 1-bit images are converted to RGB.

    Args:
        source: the image.
        policy: limits; defaults to ``ImagePolicy()``.
        **overrides: fields of :class:`ImagePolicy` to replace for this call, e.g. ``max_pixels=10**8``.

    Raises:
        TypeError: an unknown override or an unsupported source type.
        InputError subclasses: see :func:`read_source_bytes`, plus ImageTooLargeError,
            CorruptImageError and UnsupportedFormatError (also for PDFs: use the pdf module).
    """
    policy = resolve_policy(policy, overrides)
    if isinstance(source, Image.Image):
        return _finish(source, "<PIL image>", policy)
    raw = read_source_bytes(source, policy=policy)
    if raw.kind == "pdf":
        raise UnsupportedFormatError(
            f"{raw.name} is a PDF, not an image.",
            hints={
                PYTHON: "Use read_document, or hd4k_tools.inputs.pdf.render_pages to render its pages to images.",
                CLI: f"Use `hd4k read {raw.name}` (--pages to choose pages) to transcribe it.",
            },
        )
    return _decode(raw, policy)


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header promises, read without decoding any pixel.

    Attributes:
        width, height: the size of the frame that :func:`load_image` decodes (for an ICO, of its
            largest embedded image, which is the one Pillow decodes).
        format: the Pillow format name (``"PNG"``, ``"ICO"``...).
        frames: the number of frames (pages, animation frames, embedded images).
    """

    width: int
    height: int
    format: str
    frames: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def probe_image(source: ImageSource | SourceBytes, *, policy: ImagePolicy | None = None) -> ImageHeader:
    """Read an image's size from its header under ``policy`` (pixels of every frame or embedded image,
    frame count), decoding nothing. Callers budget a whole request with it before any decode.

    Raises:
        the errors of :func:`read_source_bytes`, plus ImageTooLargeError, CorruptImageError and
        UnsupportedFormatError.
    """
    policy = policy if policy is not None else ImagePolicy()
    if isinstance(source, Image.Image):
        _check_pixels(source.size, "<PIL image>", policy)
        return ImageHeader(source.width, source.height, str(source.format or "PIL"), 1)
    raw = source if isinstance(source, SourceBytes) else read_source_bytes(source, policy=policy)
    if raw.kind == "pdf":
        raise UnsupportedFormatError(f"{raw.name} is a PDF, not an image; use read_document for documents.")
    with _open_checked(raw, policy) as (_image, header):
        return header


@contextmanager
def _open_checked(raw: SourceBytes, policy: ImagePolicy) -> Iterator[tuple[Image.Image, ImageHeader]]:
    """Open ``raw`` lazily (no pixel decoded) and check its header promise: every frame or embedded
    image within ``max_pixels``, at most ``max_frames`` frames."""
    formats = _available_formats()
    if raw.data.startswith(_ICO_MAGIC):
        # Pillow's ICO plugin decodes the largest embedded image inside Image.open: check them all first.
        _check_ico_entries(raw.data, raw.name, policy)
    try:
        with _pillow_bomb_guard():
            image = Image.open(io.BytesIO(raw.data), formats=formats)
    except Image.DecompressionBombError as err:
        raise _pillow_bomb(raw.name, err, policy) from err
    except UnidentifiedImageError as err:
        raise _unsupported(raw, formats) from err
    except Exception as err:  # Pillow plugins raise many types on damaged headers
        raise _corrupt(raw.name, err) from err
    with image:
        header = _check_header(image, raw, policy)
        yield image, header


# Formats whose seek() reads only the next frame's header (no pixels), so every frame can be checked.
_SEEKABLE_HEADER_FORMATS = frozenset({"TIFF", "MPO"})


def _check_header(image: Image.Image, raw: SourceBytes, policy: ImagePolicy) -> ImageHeader:
    name = raw.name
    _check_pixels(image.size, name, policy)
    fmt = str(image.format or "")
    width, height = image.size
    try:
        frames = int(getattr(image, "n_frames", 1))
        if frames > policy.max_frames:
            raise ImageTooLargeError(
                f"{name} has {frames:,} frames, more than max_frames={policy.max_frames:,}; send a single "
                "image (e.g. the first frame as PNG), or raise max_frames in the ImagePolicy."
            )
        if fmt == "ICO":
            width, height, frames = _check_ico_entries(raw.data, name, policy)
        elif fmt in _SEEKABLE_HEADER_FORMATS and frames > 1:
            for index in range(1, frames):
                image.seek(index)
                _check_pixels(image.size, f"{name} (frame {index + 1})", policy)
            image.seek(0)
        if _EXIF_ORIENTATION_TAG in image.getexif() and image.getexif()[_EXIF_ORIENTATION_TAG] in _TRANSPOSING:
            width, height = height, width  # load_image applies the EXIF orientation
    except HD4KError:
        raise
    except Exception as err:
        raise _corrupt(name, err) from err
    return ImageHeader(int(width), int(height), fmt, frames)


_EXIF_ORIENTATION_TAG = 0x0112
_TRANSPOSING = frozenset({5, 6, 7, 8})  # orientations that swap width and height


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ICO_MAGIC = b"\x00\x00\x01\x00"


def _check_ico_entries(data: bytes, name: str, policy: ImagePolicy) -> tuple[int, int, int]:
    """Check every image embedded in an ICO from its own header (a PNG's IHDR, a BMP's DIB header):
    the directory's sizes are one byte each, and Pillow decodes the embedded image at its real size.
    Returns the size of the largest entry (the one Pillow decodes) and the entry count."""
    count = int.from_bytes(data[4:6], "little")
    largest = (0, 0)
    for i in range(count):
        entry = data[6 + 16 * i : 6 + 16 * (i + 1)]
        if len(entry) < 16:
            raise CorruptImageError(f"{name} has a truncated ICO directory; re-export the icon.")
        offset = int.from_bytes(entry[12:16], "little")
        head = data[offset : offset + 24]
        if head.startswith(_PNG_SIGNATURE) and len(head) >= 24:
            size = (int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"))
        elif len(head) >= 12:
            # A BMP entry's DIB header holds the height of the XOR and AND masks together.
            size = (
                abs(int.from_bytes(head[4:8], "little", signed=True)),
                abs(int.from_bytes(head[8:12], "little", signed=True)) // 2,
            )
        else:
            raise CorruptImageError(f"{name}: ICO entry {i + 1} points past the end of the file; re-export it.")
        _check_pixels(size, f"{name} (embedded image {i + 1})", policy)
        if size[0] * size[1] > largest[0] * largest[1]:
            largest = size
    return largest[0] or 1, largest[1] or 1, count


def _decode(raw: SourceBytes, policy: ImagePolicy) -> Image.Image:
    with _open_checked(raw, policy) as (image, _header):
        return _finish(image, raw.name, policy)


def _finish(image: Image.Image, name: str, policy: ImagePolicy) -> Image.Image:
    """Check the header size, decode fully, then orient and convert to RGB."""
    _check_pixels(image.size, name, policy)
    try:
        with _pillow_bomb_guard():
            image.load()
    except Image.DecompressionBombError as err:
        raise _pillow_bomb(name, err, policy) from err
    except Exception as err:
        raise _corrupt(name, err) from err
    # A format whose decoded size differs from its header (checked above) still must not pass.
    _check_pixels(image.size, name, policy)
    return _to_rgb(_exif_transpose(image), name)


def _check_pixels(size: tuple[int, int], name: str, policy: ImagePolicy) -> None:
    width, height = size
    if width * height > policy.max_pixels:
        raise ImageTooLargeError(
            f"{name} is {width}x{height} = {width * height:,} pixels, more than max_pixels="
            f"{policy.max_pixels:,}; downscale it first, or raise max_pixels in the ImagePolicy if you "
            "trust the input."
        )


@contextmanager
def _pillow_bomb_guard() -> Iterator[None]:
    """Silence Pillow's DecompressionBombWarning for one call: our own ``max_pixels`` check is the
    authority, and Pillow's global ``MAX_IMAGE_PIXELS`` must not be changed. Its hard error
    (``DecompressionBombError``, at twice that) still fires and is turned into ImageTooLargeError.

    ``catch_warnings`` is process-wide before Python 3.14, so under threads a race can at worst let a
    DecompressionBombWarning reach the log; it never skips a size check."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def _pillow_bomb(name: str, err: Exception, policy: ImagePolicy) -> ImageTooLargeError:
    return ImageTooLargeError(
        f"{name} exceeds Pillow's decompression-bomb limit ({err}); our limit is max_pixels="
        f"{policy.max_pixels:,}. Downscale the image first; raising max_pixels beyond Pillow's limit "
        "also needs PIL.Image.MAX_IMAGE_PIXELS raised by the application."
    )


def _corrupt(name: str, err: Exception) -> CorruptImageError:
    return CorruptImageError(
        f"{name} cannot be decoded: the image data is damaged or truncated ({type(err).__name__}: "
        f"{err}); re-export or re-download the file and try again."
    )


def _available_formats() -> list[str]:
    Image.init()  # Pillow's own lazy plugin registration; Image.open would do the same
    return [fmt for fmt in SUPPORTED_FORMATS if fmt in Image.OPEN]


def _unsupported(raw: SourceBytes, formats: list[str]) -> UnsupportedFormatError:
    supported = ", ".join(formats)
    head = raw.data[:512]
    if b"<svg" in head.lower():
        what = "an SVG vector image, which is not supported; rasterize it to PNG first"
    elif _looks_like_text(head):
        what = "text, not an image (a text file with an image extension?); pass the real image file"
    else:
        what = "not in a supported image format; convert it to PNG or JPEG"
    return UnsupportedFormatError(f"{raw.name} is {what}. Supported formats: {supported}.")


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return printable >= 0.95 * len(text)


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        # Damaged EXIF must not cost the caller the whole image; the pixels are still valid.
        return image.copy()


_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    mode = image.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    try:
        if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
            return _wide_gray_to_rgb(image)
        if has_alpha:
            return _on_white(image.convert("RGBA"))
        if mode == "RGB":
            return image.copy()
        return image.convert("RGB")
    except HD4KError:
        raise
    except Exception as err:
        raise UnsupportedFormatError(
            f"{name} uses colour mode {mode!r}, which cannot be converted to RGB ({err}); convert it to "
            "an RGB PNG or JPEG first."
        ) from err


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_gray_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float grayscale to 8 bits (Pillow's own convert clips)."""
    values = np.asarray(image)
    if image.mode in _SIXTEEN_BIT_MODES or (
        image.mode == "I" and values.size and values.min() >= 0 and values.max() <= 0xFFFF
    ):
        gray = (values.astype(np.uint32) * 255 + 0x7FFF) // 0xFFFF
    elif image.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        gray = np.rint(values * 255.0)
    else:
        gray = _stretch(values.astype(np.float64))
    return Image.fromarray(gray.astype(np.uint8), mode="L").convert("RGB")


def _stretch(values: np.ndarray) -> np.ndarray:
    finite = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if high <= low:
        return np.zeros_like(finite)
    return np.rint((finite - low) * (255.0 / (high - low)))


# ----------------------------------------------------------------------------------------------------
# Helpers for callers
# ----------------------------------------------------------------------------------------------------
def image_content_hash(image: Image.Image) -> str:
    """SHA-256 (hex) over the image's mode, size and raw pixel bytes: equal pixels, equal hash."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def to_data_url(
    image: ImageSource | SourceBytes, format: str = "PNG", *, policy: ImagePolicy | None = None, **overrides: Any
) -> str:
    """Encode an image as a ``data:<mime>;base64,...`` URL (``format`` is a Pillow format name).

    ``image`` is anything :func:`load_image` takes (a path, bytes, a file object, base64, a data URL, a PIL
    image...); everything but a PIL image is loaded with :func:`load_image` under ``policy`` (and
    ``overrides``), so the URL holds the checked RGB image the model would see, re-encoded.

    Raises:
        UnsupportedFormatError: Pillow cannot write ``format``.
        InputError subclasses: the source cannot be read (see :func:`load_image`).
    """
    fmt = format.upper()
    if fmt == "JPG":
        fmt = "JPEG"
    Image.init()
    mime = Image.MIME.get(fmt)
    if fmt not in Image.SAVE or mime is None:
        raise UnsupportedFormatError(f"cannot encode to {format!r}; use 'PNG', 'JPEG' or 'WEBP'.")
    if not isinstance(image, Image.Image):
        image = load_image(image, policy=policy, **overrides)
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = _to_rgb(image, "<PIL image>")
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"
