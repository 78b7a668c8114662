"""The corpus: inputs (files, folders, glob patterns) to a sorted list of files, their content hashes,
duplicates, and the pages each file contributes.

Nothing here loads a model. :func:`describe_file` is the per-file CPU step (hash, kind, page count and
selection) that local mode calls in process and Ray mode runs as tasks.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hd4k_tools.errors import HD4KError, ImageNotFoundError, InputError
from hd4k_tools.ingestion.records import RecordError
from hd4k_tools.inputs.images import read_source_bytes
from hd4k_tools.inputs.pdf import PageSpec, page_count, parse_page_range
from hd4k_tools.inputs.policy import ImagePolicy

PDF_EXTENSIONS = frozenset({".pdf"})
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"})
SUPPORTED_EXTENSIONS = PDF_EXTENSIONS | IMAGE_EXTENSIONS
_GLOB_CHARS = re.compile(r"[*?\[]")


def _supported(path: Path) -> bool:
    return path.suffix.lower() in SUPPORTED_EXTENSIONS


def list_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Absolute paths of every file the inputs name, sorted and without repeats.

    A file is taken as given (whatever its extension: it was named explicitly); a folder is walked
    recursively for PDFs and images (by extension); a glob pattern (``*``, ``?``, ``[``; ``**``
    recursive) is expanded the same way.

    Raises:
        InputError: no input given, an input that does not exist, or inputs that contain no PDF or image.
    """
    if not inputs:
        raise InputError("no input given; pass files, folders or glob patterns (e.g. hd4k ingest docs/ --out out/).")
    found: set[str] = set()
    for item in inputs:
        text = os.fspath(item)
        if _GLOB_CHARS.search(text) and not Path(text).exists():
            matches = [Path(m) for m in glob.glob(text, recursive=True)]
            if not matches:
                raise ImageNotFoundError(f"the pattern {text!r} matches no file; check the path and quoting.")
            for match in matches:
                found.update(_expand(match, explicit=False))
            continue
        path = Path(text)
        if not path.exists():
            raise ImageNotFoundError(f"{text} does not exist; pass existing files, folders or glob patterns.")
        found.update(_expand(path, explicit=True))
    if not found:
        extensions = ", ".join(sorted(SUPPORTED_EXTENSIONS))
        raise InputError(f"the inputs contain no PDF or image (looked for {extensions}); check the paths.")
    return sorted(found)


def _expand(path: Path, *, explicit: bool) -> Iterable[str]:
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                candidate = Path(root) / name
                if _supported(candidate) and candidate.is_file():
                    yield str(candidate.resolve())
    elif path.is_file() and (explicit or _supported(path)):
        yield str(path.resolve())


def content_hash(data: bytes) -> str:
    """SHA-256 of a file's bytes, as ``sha256:<hex>``."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _unread_hash(source: str) -> str:
    """Stands in for the content hash of a file that could not be read (refused path, over max_bytes):
    derived from its path, since its bytes are not ours to read."""
    return f"path:{hashlib.sha256(source.encode('utf-8')).hexdigest()}"


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


def describe_file(source: str, pages: PageSpec, policy: ImagePolicy) -> FileInfo:
    """Read ``source`` under ``policy``, hash it, and find what it contributes: the selected pages of a
    PDF, or page 1 of an image.

    Input problems (refused path, too large, corrupt, encrypted) come back in ``error``, so the caller
    records them and goes on.
    """
    try:
        raw = read_source_bytes(Path(source), policy=policy)
    except HD4KError as err:
        return FileInfo(source, _unread_hash(source), "unknown", None, (), RecordError.from_exception(err).model_dump())
    # The hash is of the very bytes the policy let through, read once.
    digest = content_hash(raw.data)
    try:
        if raw.kind == "pdf":
            total = page_count(raw, policy=policy)
            chosen = clip_pages(pages, total)
            return FileInfo(source, digest, "pdf", total, tuple(i + 1 for i in chosen))
        chosen = clip_pages(pages, 1)
        return FileInfo(source, digest, "image", 1, tuple(i + 1 for i in chosen))
    except HD4KError as err:
        return FileInfo(source, digest, "unknown", None, (), RecordError.from_exception(err).model_dump())
