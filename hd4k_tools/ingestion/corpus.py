"""The corpus: inputs (files, folders, glob patterns) to a sorted list of files, their content hashes,
duplicates, and the pages each file contributes.

Nothing here loads a model. :func:`describe_file` is the per-file CPU step (hash, kind, page count and
selection) that local mode calls in process and Ray mode runs as tasks.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hd4k_tools.errors import HD4KError, ImageNotFoundError, InputError, UnsupportedFormatError
from hd4k_tools.ingestion.records import RecordError, display_path
from hd4k_tools.inputs.images import read_source_bytes
from hd4k_tools.inputs.pdf import PageSpec, page_count, parse_page_range
from hd4k_tools.inputs.policy import ImagePolicy

PDF_EXTENSIONS = frozenset({".pdf"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
SUPPORTED_EXTENSIONS = PDF_EXTENSIONS | IMAGE_EXTENSIONS
_GLOB_CHARS = re.compile(r"[*?\[]")


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_EXTENSIONS


@dataclass
class InputListing:
    """The files the inputs name, in the order given, and the symlinks left out."""

    paths: list[str]
    skipped_links: list[str]


def _inside(path: str, root: str) -> bool:
    """``path`` (symlinks resolved) lies under the real folder ``root``."""
    real = os.path.realpath(path)
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _glob_base(pattern: str) -> str:
    """The folder a glob pattern starts from: its longest leading part without wildcards."""
    parts = Path(pattern).parts
    fixed = list(itertools.takewhile(lambda part: not _GLOB_CHARS.search(part), parts))
    return os.path.realpath(os.path.join(*fixed)) if fixed else os.path.realpath(os.curdir)


def scan_inputs(inputs: Sequence[str | os.PathLike[str]], *, follow_symlinks: bool = False) -> InputListing:
    """Absolute paths of every file the inputs name, in the order given, without repeats.

    A file is taken as given (whatever its extension: it was named explicitly); a folder is walked
    recursively for PDFs and images (by extension), in sorted order; a glob pattern (``*``, ``?``, ``[``;
    ``**`` recursive) is expanded the same way. Paths are absolute but not resolved: a symlink is recorded
    under its own path. A symlink met while walking a folder or expanding a pattern is followed only when
    it stays inside that folder (the pattern's fixed part), unless ``follow_symlinks``; the others are
    listed in ``skipped_links``.

    Raises:
        InputError: no input given, an input that does not exist, or inputs that contain no PDF or image.
    """
    if not inputs:
        raise InputError("no input given; pass files, folders or glob patterns (e.g. hd4k ingest docs/ --out out/).")
    found: dict[str, None] = {}  # insertion-ordered set: the first path given comes first
    skipped: list[str] = []
    for item in inputs:
        text = os.fspath(item)
        if _GLOB_CHARS.search(text) and not os.path.lexists(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise ImageNotFoundError(f"the pattern {text!r} matches no file; check the path and quoting.")
            root = _glob_base(text)
            for match in matches:
                if not follow_symlinks and not _inside(match, root):
                    skipped.append(os.path.abspath(match))
                    continue
                found.update(dict.fromkeys(_expand(match, False, follow_symlinks, skipped, root)))
            continue
        if not os.path.exists(text):
            raise ImageNotFoundError(f"{text} does not exist; pass existing files, folders or glob patterns.")
        found.update(dict.fromkeys(_expand(text, True, follow_symlinks, skipped, os.path.realpath(text))))
    if not found:
        extensions = ", ".join(sorted(SUPPORTED_EXTENSIONS))
        raise InputError(f"the inputs contain no PDF or image (looked for {extensions}); check the paths.")
    return InputListing(list(found), sorted(set(skipped)))


def list_inputs(inputs: Sequence[str | os.PathLike[str]], *, follow_symlinks: bool = False) -> list[str]:
    """The paths of :func:`scan_inputs` (the files, in the order given)."""
    return scan_inputs(inputs, follow_symlinks=follow_symlinks).paths


def _expand(path: str, explicit: bool, follow: bool, skipped: list[str], root: str) -> list[str]:
    if not os.path.isdir(path):
        if os.path.isfile(path) and (explicit or _supported(Path(path))):
            return [os.path.abspath(path)]
        return []
    files: list[str] = []
    visited: set[str] = set()
    for folder, dirs, names in os.walk(path, followlinks=follow):
        if follow:  # a symlink loop would walk forever: each real folder once
            real = os.path.realpath(folder)
            if real in visited:
                dirs[:] = []
                continue
            visited.add(real)
        else:
            for name in dirs:
                if os.path.islink(os.path.join(folder, name)) and not _inside(os.path.join(folder, name), root):
                    skipped.append(os.path.abspath(os.path.join(folder, name)))
        for name in names:
            candidate = os.path.join(folder, name)
            if not (_supported(Path(name)) and os.path.isfile(candidate)):
                continue
            if not follow and os.path.islink(candidate) and not _inside(candidate, root):
                skipped.append(os.path.abspath(candidate))
                continue
            files.append(os.path.abspath(candidate))
    return sorted(files)


def content_hash(data: bytes) -> str:
    """SHA-256 of a file's bytes, as ``sha256:<hex>``."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _unread_hash(source: str) -> str:
    """Stands in for the content hash of a file that could not be read (refused path, over max_bytes):
    derived from its path, since its bytes are not ours to read."""
    return f"path:{hashlib.sha256(os.fsencode(source)).hexdigest()}"


@dataclass(frozen=True)
class FileInfo:
    """One input file: its content hash, kind, page count and the 1-based pages to ingest.

    ``error`` (a :class:`RecordError` as a dict) is set when the file cannot be used at all.
    """

    source: str
    content_hash: str
    kind: str  # "pdf" | "image" | "unknown"
    page_count: int | None
    pages: tuple[int, ...]
    error: dict[str, object] | None = None

    def to_row(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict[str, object]) -> FileInfo:
        error = row.get("error")
        return cls(
            source=str(row["source"]),
            content_hash=str(row["content_hash"]),
            kind=str(row["kind"]),
            page_count=None if row.get("page_count") is None else int(row["page_count"]),  # type: ignore[arg-type]
            pages=tuple(int(p) for p in row["pages"]),  # type: ignore[union-attr]
            error=None if error is None else dict(error),  # type: ignore[call-overload]
        )


def clip_pages(spec: PageSpec, num_pages: int) -> list[int]:
    """0-based indices ``spec`` selects in a document of ``num_pages``, keeping only pages it has.

    Over a corpus, ``--pages 1-3`` means "the first three pages of each document": a shorter document
    contributes what it has instead of failing.
    """
    if num_pages < 1:
        return []
    if spec is None or isinstance(spec, str | int | list | tuple):
        numbers = [int(n) for n in re.findall(r"\d+", str(spec))] if isinstance(spec, str) else []
        if isinstance(spec, int) and not isinstance(spec, bool):
            numbers = [spec]
        elif isinstance(spec, list | tuple):
            numbers = [n for n in spec if isinstance(n, int)]
        upper = max([num_pages, *numbers])
        return [i for i in parse_page_range(spec, upper) if i < num_pages]
    return parse_page_range(spec, num_pages)


def what_it_is(data: bytes) -> str:
    """A few words naming what bytes that are neither a PDF nor an image we read look like."""
    head = data[:4096]
    for magic, name in _OTHER_MAGIC:
        if head.startswith(magic):
            return name
    stripped = head.lstrip().lower()
    if stripped.startswith((b"<!doctype html", b"<html")):
        return "an HTML file"
    if stripped.startswith(b"<?xml") or stripped.startswith(b"<svg"):
        return "an XML or SVG file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the 4 KiB boundary
            return "a binary file of an unknown format"
    return "a text file"


_OTHER_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"PK\x03\x04", "a ZIP archive (or an Office document: .docx, .xlsx, .pptx, .odt)"),
    (b"\xd0\xcf\x11\xe0", "an old Microsoft Office document (.doc, .xls, .ppt)"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"{\\rtf", "an RTF document"),
    (b"\x7fELF", "an executable"),
)


def describe_file(source: str, pages: PageSpec, policy: ImagePolicy) -> FileInfo:
    """Read ``source`` under ``policy``, hash it, and find what it contributes: the selected pages of a
    PDF, or page 1 of an image.

    Input problems (refused path, too large, corrupt, encrypted, not a PDF or image) come back in
    ``error``, so the caller records them and goes on.
    """
    try:
        raw = read_source_bytes(Path(source), policy=policy)
    except HD4KError as err:
        return FileInfo(source, _unread_hash(source), "unknown", None, (), RecordError.from_exception(err).model_dump())
    # The hash is of the very bytes the policy let through, read once; rendering checks it again.
    digest = content_hash(raw.data)
    try:
        if raw.kind == "pdf":
            total = page_count(raw, policy=policy)
            chosen = clip_pages(pages, total)
            return FileInfo(source, digest, "pdf", total, tuple(i + 1 for i in chosen))
        if raw.kind != "image":
            raise UnsupportedFormatError(
                f"{display_path(source)[0]} is {what_it_is(raw.data)}, not a PDF or an image; leave it out of the "
                "inputs (folders and patterns take only PDF and image extensions)."
            )
        chosen = clip_pages(pages, 1)
        return FileInfo(source, digest, "image", 1, tuple(i + 1 for i in chosen))
    except HD4KError as err:
        return FileInfo(source, digest, "unknown", None, (), RecordError.from_exception(err).model_dump())
