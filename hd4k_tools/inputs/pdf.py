"""Render PDF pages to RGB images with pdfium (the ``pdf`` extra: ``pip install "hd4k-tools[pdf]"``).

Sources go through :func:`hd4k_tools.inputs.images.read_source_bytes`, so paths, bytes, file objects,
base64, ``data:application/pdf;base64,...`` and URLs obey the same :class:`ImagePolicy` as images
(``allowed_roots``, ``max_bytes``, URL rules). Pages are rendered lazily, one at a time, and each is
checked against ``max_pixels`` from its size in points before any pixel is allocated.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from hd4k_tools.errors import (
    EncryptedPDFError,
    ImageTooLargeError,
    MissingDependencyError,
    PageRangeError,
    PDFError,
    short_repr,
)
from hd4k_tools.inputs.images import ImageSource, SourceBytes, read_source_bytes, sniff_kind
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.progress import track
from hd4k_tools.zoom import region_box, snap_region

if TYPE_CHECKING:
    import pypdfium2

__all__ = [
    "RenderedPage",
    "is_pdf",
    "page_count",
    "page_labels",
    "page_sizes",
    "parse_page_range",
    "render_pages",
    "select_pages",
]

PageSpec = int | str | Sequence[int] | None

# pdfium is a C library that is not thread-safe: every call into it, from any thread, goes through this
# lock. It is the one module-level state in the package, and it must be shared by all callers to work.
# Re-entrant because an abandoned render iterator may be garbage-collected (its finally closes the
# document) between two pdfium calls of another iterator on the same thread, while the lock is held.
_PDFIUM_LOCK = threading.RLock()

_MAX_DPI = 1200
# pdfium refuses a bitmap of 4 GiB or more (its size is a uint32): 3-byte BGR pages up to ~1.4 G pixels.
_PDFIUM_MAX_BITMAP_BYTES = 2**32 - 1
# Form XObjects nested deeper than this are not searched for images (pypdfium2's own default depth).
_MAX_FORM_DEPTH = 15
_POINTS_PER_INCH = 72.0
# Page numbers have at most 9 digits: longer ones cannot be pages, and int() refuses 4,300+ digits.
_RANGE_PART = re.compile(r"^\s*(\d{0,9})\s*(-?)\s*(\d{0,9})\s*$")


@dataclass(frozen=True)
class RenderedPage:
    """One rendered page.

    Attributes:
        index: 0-based page index in the document.
        number: 1-based page number (``index + 1``), as people count pages.
        image: the page as an RGB PIL image.
        dpi: the resolution it was rendered at.
        region: the part of the page rendered (page fractions ``(x0, y0, x1, y1)``), or ``None``: all of it.
            This is the box actually rendered: the requested region snapped outward to whole pixels of the
            whole page at ``dpi`` (so ``region_box`` of it on that page gives exactly these pixels).
    """

    index: int
    number: int
    image: Image.Image
    dpi: float
    region: tuple[float, float, float, float] | None = None


def is_pdf(data: bytes) -> bool:
    """True if ``data`` starts (within its first KiB, as readers allow) with a ``%PDF-`` header."""
    return sniff_kind(bytes(data[:1024])) == "pdf"


def parse_page_range(spec: PageSpec, num_pages: int) -> list[int]:
    """Turn a 1-based page selection into sorted, unique 0-based indices.

    ``spec`` may be ``None`` or ``"all"`` (every page), an ``int`` (one page), a string of comma-separated
    pages and ranges (``"1-3,5"``, ``"2-"`` = page 2 to the end, ``"-3"`` = pages 1 to 3), or a list or
    tuple of ints.

    Raises:
        PageRangeError: a page is 0, past the end, a range runs backwards, or the spec cannot be read.
            The message names the document's page count.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("all", "*")):
        return list(range(num_pages))
    if isinstance(spec, bool):
        raise _range_error(f"pages={short_repr(spec)} is not a page selection", num_pages)
    if isinstance(spec, int):
        return [_page_index(spec, num_pages)]
    if isinstance(spec, str):
        return _parse_range_string(spec, num_pages)
    if isinstance(spec, Sequence) and all(isinstance(p, int) and not isinstance(p, bool) for p in spec):
        if not spec:
            raise _range_error("pages=[] selects no page", num_pages)
        return sorted({_page_index(page, num_pages) for page in spec})
    raise _range_error(f"pages={short_repr(spec)} is not a page selection", num_pages)


def _parse_range_string(spec: str, num_pages: int) -> list[int]:
    selected: set[int] = set()
    for part in spec.split(","):
        match = _RANGE_PART.match(part)
        if match is None or not (match.group(1) or match.group(3)):
            raise _range_error(f"cannot read {part.strip()!r} in pages={short_repr(spec)}", num_pages)
        start_text, dash, end_text = match.groups()
        if not dash:
            if end_text and start_text:  # "1 2": two numbers without a separator
                raise _range_error(f"cannot read {part.strip()!r} in pages={short_repr(spec)}", num_pages)
            selected.add(_page_index(int(start_text or end_text), num_pages))
            continue
        start = int(start_text) if start_text else 1
        end = int(end_text) if end_text else num_pages
        first, last = _page_index(start, num_pages), _page_index(end, num_pages)
        if first > last:
            raise _range_error(f"the range {part.strip()!r} runs backwards", num_pages)
        selected.update(range(first, last + 1))
    return sorted(selected)


def _page_index(number: int, num_pages: int) -> int:
    if number < 1:
        raise _range_error(f"page {short_repr(number)} does not exist (pages are numbered from 1)", num_pages)
    if number > num_pages:
        raise _range_error(f"page {short_repr(number)} does not exist", num_pages)
    return number - 1


def _range_error(problem: str, num_pages: int) -> PageRangeError:
    plural = "page" if num_pages == 1 else "pages"
    return PageRangeError(
        f"{problem}: the document has {num_pages} {plural}. Pass pages as 1-based numbers within "
        f"1-{num_pages}, e.g. pages='1-3,5', pages='2-', pages=[1, 4] or pages=None for all."
    )


def page_count(source: ImageSource | SourceBytes, *, policy: ImagePolicy | None = None) -> int:
    """Number of pages in the PDF ``source`` (read under ``policy``).

    Raises:
        PDFError, EncryptedPDFError, MissingDependencyError, and the input errors of
        :func:`hd4k_tools.inputs.images.read_source_bytes`.
    """
    raw = _read_pdf_bytes(source, policy)
    with _open_document(raw) as document:
        return len(document)


def select_pages(
    source: ImageSource | SourceBytes,
    pages: PageSpec = None,
    *,
    policy: ImagePolicy | None = None,
    max_pages: int = 200,
) -> list[int]:
    """The 0-based indices that ``pages`` selects in the PDF ``source``, checked against the document and
    ``max_pages`` without rendering anything (e.g. to read the pages one call at a time).

    Raises:
        PageRangeError, PDFError (not a PDF, or more selected pages than ``max_pages``), and the errors of
        :func:`page_count`.
    """
    raw = _read_pdf_bytes(source, policy if policy is not None else ImagePolicy())
    return _selected_indices(raw, pages, max_pages)


def page_labels(
    source: ImageSource | SourceBytes, indices: Sequence[int], *, policy: ImagePolicy | None = None
) -> list[str]:
    """The printed labels (``"iv"``, ``"A-3"``) of the 0-based pages ``indices``, as the PDF's page-label
    tree names them; a page without a label gets its 1-based number as text (what viewers show)."""
    raw = _read_pdf_bytes(source, policy if policy is not None else ImagePolicy())
    with _open_document(raw) as document, _PDFIUM_LOCK:
        total = len(document)
        labels = []
        for index in indices:
            if not 0 <= index < total:
                raise _range_error(f"page {index + 1} does not exist", total)
            labels.append(document.get_page_label(index) or str(index + 1))
    return labels


def page_sizes(
    source: ImageSource | SourceBytes, indices: Sequence[int], *, dpi: float, policy: ImagePolicy | None = None
) -> list[tuple[int, int]]:
    """The ``(width, height)`` in pixels that the 0-based pages ``indices`` will have when rendered at
    ``dpi``, read from the page boxes without rendering (e.g. to plan the tiling before loading a model).

    Raises:
        ImageTooLargeError: a page over ``policy.max_pixels`` at ``dpi`` (as :func:`render_pages` would).
        PageRangeError, PDFError, and the errors of :func:`page_count`.
    """
    policy = policy if policy is not None else ImagePolicy()
    raw = _read_pdf_bytes(source, policy)
    scale = dpi / _POINTS_PER_INCH
    sizes = []
    with _open_document(raw) as document, _PDFIUM_LOCK:
        total = len(document)
        for index in indices:
            if not 0 <= index < total:
                raise _range_error(f"page {index + 1} does not exist", total)
            page = document[index]
            try:
                points = page.get_size()
            finally:
                page.close()
            width, height = math.ceil(points[0] * scale), math.ceil(points[1] * scale)
            if width * height > policy.max_pixels:
                raise _page_too_large(raw.name, index, (width, height), points, dpi, policy)
            sizes.append((width, height))
    return sizes


def _selected_indices(raw: SourceBytes, pages: PageSpec, max_pages: int) -> list[int]:
    if isinstance(max_pages, bool) or not isinstance(max_pages, int) or max_pages < 1:
        raise PDFError(f"max_pages={short_repr(max_pages)} is not usable; pass an int >= 1 (e.g. 200).")
    with _open_document(raw) as document:
        total = len(document)
    indices = parse_page_range(pages, total)
    if len(indices) > max_pages:
        raise PDFError(
            f"{raw.name} has {total} pages and {len(indices)} are selected, more than max_pages="
            f"{max_pages}; pass pages=... to pick fewer (e.g. pages='1-{min(max_pages, total)}'), or "
            "raise max_pages."
        )
    return indices


def render_pages(
    source: ImageSource | SourceBytes,
    *,
    pages: PageSpec = None,
    dpi: float = 200,
    policy: ImagePolicy | None = None,
    max_pages: int = 200,
    progress: bool | None = None,
    cancel: threading.Event | None = None,
    region: tuple[float, float, float, float] | None = None,
    region_pixels: int | None = None,
) -> Iterator[RenderedPage]:
    """Render the selected pages of a PDF, lazily, one :class:`RenderedPage` at a time.

    With ``region`` (page fractions ``(x0, y0, x1, y1)``) only that part of each page is rendered, from the
    vector page, at a scale high enough for it to have about ``region_pixels`` pixels (never below ``dpi``,
    and bounded by ``policy.max_pixels``): zooming in gains real detail, not upscaled pixels. The region is
    the pixel box :func:`hd4k_tools.zoom.region_box` gives on the whole page rendered at that scale, and its
    pixels are exactly those of the whole page rendered at that scale (see ``_render_box``);
    :attr:`RenderedPage.region` is that box in page fractions.

    The document is read and the selection validated when this is called (errors surface here, not
    at the first ``next()``); pages are rendered as the iterator is consumed, so only one page is held
    at a time. Close the iterator (or exhaust it) to release the document promptly.

    Args:
        source: a PDF as a path, bytes, binary file object, base64, ``data:application/pdf`` URL or URL.
        pages: the selection, see :func:`parse_page_range` (1-based); ``None`` = every page.
        dpi: render resolution (pixels per inch); 200 reads small print well.
        policy: input limits; each page must fit ``policy.max_pixels`` at this ``dpi``.
        max_pages: refuse a selection of more pages than this.
        progress: progress bar on stderr; ``None`` = only when a person is watching.
        cancel: set this event to stop between pages with :class:`CancelledError`.

    Raises:
        PDFError: not a PDF, damaged, bad ``dpi``, or more selected pages than ``max_pages``.
        EncryptedPDFError: the PDF needs a password.
        PageRangeError: ``pages`` names pages the document does not have.
        ImageTooLargeError: a page would have more than ``max_pixels`` pixels at this ``dpi``.
        CancelledError: ``cancel`` was set.
        MissingDependencyError: pypdfium2 is not installed.
    """
    policy = policy if policy is not None else ImagePolicy()
    if isinstance(dpi, bool) or not isinstance(dpi, int | float) or not 0 < dpi <= _MAX_DPI:
        raise PDFError(f"dpi={short_repr(dpi)} is not usable; pass a number between 1 and {_MAX_DPI} (e.g. 150-200).")
    raw = _read_pdf_bytes(source, policy)
    indices = _selected_indices(raw, pages, max_pages)
    return _render_lazily(raw, indices, float(dpi), policy, progress, cancel, region, region_pixels)


def _render_lazily(
    raw: SourceBytes,
    indices: list[int],
    dpi: float,
    policy: ImagePolicy,
    progress: bool | None,
    cancel: threading.Event | None,
    region: tuple[float, float, float, float] | None = None,
    region_pixels: int | None = None,
) -> Iterator[RenderedPage]:
    with _open_document(raw) as document:
        steps = track(indices, total=len(indices), desc="PDF pages", unit="page", progress=progress, cancel=cancel)
        for index in steps:
            if region is None:
                image, page_dpi, read = _render_page(document, index, dpi, policy, raw.name), dpi, None
            else:
                image, page_dpi, read = _render_region(document, index, dpi, policy, raw.name, region, region_pixels)
            yield RenderedPage(index=index, number=index + 1, image=image, dpi=page_dpi, region=read)


def _render_page(document: Any, index: int, dpi: float, policy: ImagePolicy, name: str) -> Image.Image:
    scale = dpi / _POINTS_PER_INCH
    with _PDFIUM_LOCK:
        try:
            page = document[index]
        except Exception as err:
            raise PDFError(f"page {index + 1} of {name} could not be loaded ({err}); the PDF may be damaged.") from err
        try:
            width_pt, height_pt = page.get_size()
            # The bitmap is ceil(points * scale) pixels, as pdfium sizes a page; check exactly that first.
            width, height = math.ceil(width_pt * scale), math.ceil(height_pt * scale)
            if width * height > policy.max_pixels:
                raise _page_too_large(name, index, (width, height), (width_pt, height_pt), dpi, policy)
            return _render_box(page, scale, (0, 0, width, height))
        except (ImageTooLargeError, PDFError):
            raise
        except Exception as err:
            raise PDFError(
                f"page {index + 1} of {name} could not be rendered ({type(err).__name__}: {err}); the "
                "PDF may be damaged: re-export it, or skip the page with pages=..."
            ) from err
        finally:
            page.close()


def region_scale(
    points: tuple[float, float],
    region: tuple[float, float, float, float],
    dpi: float,
    region_pixels: int | None,
    max_pixels: int,
) -> float:
    """Pixels per point to render ``region`` of a page of ``points`` at: enough for ``region_pixels`` pixels,
    never below ``dpi``, never above what ``max_pixels`` (or the largest dpi) allows."""
    x0, y0, x1, y1 = region
    area = max((x1 - x0) * points[0] * (y1 - y0) * points[1], 1e-9)
    scale = dpi / _POINTS_PER_INCH
    if region_pixels is not None:
        scale = max(scale, math.sqrt(region_pixels / area))
    # The clip is whole pixels rounded outward: keep a margin of one pixel per side under max_pixels.
    limit = math.sqrt(max_pixels / area) * 0.98
    return max(min(scale, limit, _MAX_DPI / _POINTS_PER_INCH), 1e-3)


def _render_region(
    document: Any,
    index: int,
    dpi: float,
    policy: ImagePolicy,
    name: str,
    region: tuple[float, float, float, float],
    region_pixels: int | None,
) -> tuple[Image.Image, float, tuple[float, float, float, float]]:
    """``region`` of page ``index`` rendered alone, its dpi, and the box read (``region`` snapped outward to
    whole pixels of the whole page at that dpi, in page fractions)."""
    with _PDFIUM_LOCK:
        page = document[index]
        try:
            width_pt, height_pt = page.get_size()
            scale = region_scale((width_pt, height_pt), region, dpi, region_pixels, policy.max_pixels)
            full_w, full_h = math.ceil(width_pt * scale), math.ceil(height_pt * scale)
            box = region_box(full_w, full_h, region)
            if (box[2] - box[0]) * (box[3] - box[1]) > policy.max_pixels:
                raise _page_too_large(
                    name, index, (box[2] - box[0], box[3] - box[1]), (width_pt, height_pt), dpi, policy
                )
            clip = _widened(box, _image_margin(page, scale), (full_w, full_h), policy.max_pixels)
            image = _render_box(page, scale, box, clip)
        finally:
            page.close()
    return image, scale * _POINTS_PER_INCH, snap_region(full_w, full_h, region)


def _image_margin(page: Any, scale: float) -> int:
    """How far (page pixels at ``scale``) a region's clip must reach past the region for pdfium to draw the
    images in it as on the whole page: an interpolated image upscaled by pdfium blends each pixel with its
    source neighbours, but only with those inside the clip. The most pixels one source pixel of any image on
    the page (in Form XObjects too) covers, plus 2; 0 without images."""
    raw = _pdfium().raw
    margin = 0
    count = raw.FPDFPage_CountObjects(page.raw)
    todo = [(raw.FPDFPage_GetObject(page.raw, i), (1.0, 0.0, 0.0, 1.0), 0) for i in range(count)]
    while todo:
        obj, outer, depth = todo.pop()
        kind, matrix = raw.FPDFPageObj_GetType(obj), raw.FS_MATRIX()
        if kind not in (raw.FPDF_PAGEOBJ_IMAGE, raw.FPDF_PAGEOBJ_FORM) or not raw.FPDFPageObj_GetMatrix(obj, matrix):
            continue
        # The object's linear part in page space: its own matrix, then its forms' (PDF's row-vector order).
        a, b, c, d = _linear_product((matrix.a, matrix.b, matrix.c, matrix.d), outer)
        if kind == raw.FPDF_PAGEOBJ_FORM:
            if depth < _MAX_FORM_DEPTH:
                inner = raw.FPDFFormObj_CountObjects(obj)
                todo += [(raw.FPDFFormObj_GetObject(obj, i), (a, b, c, d), depth + 1) for i in range(inner)]
            continue
        width, height = ctypes.c_uint(), ctypes.c_uint()
        if raw.FPDFImageObj_GetImagePixelSize(obj, ctypes.byref(width), ctypes.byref(height)):
            # An axis of one source pixel has no neighbour to blend with (a 1x1 background image): no margin.
            per_x = math.hypot(a, b) / width.value if width.value > 1 else 0.0
            per_pixel = max(per_x, math.hypot(c, d) / height.value if height.value > 1 else 0.0)
            margin = max(margin, math.ceil(per_pixel * scale) + 2)
    return margin


def _linear_product(
    inner: tuple[float, float, float, float], outer: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """``inner`` then ``outer`` (2x2 linear parts ``(a, b, c, d)`` of PDF matrices, row vectors)."""
    a, b, c, d = inner
    oa, ob, oc, od = outer
    return (a * oa + b * oc, a * ob + b * od, c * oa + d * oc, c * ob + d * od)


def _widened(
    box: tuple[int, int, int, int], margin: int, size: tuple[int, int], max_pixels: int
) -> tuple[int, int, int, int]:
    """``box`` grown by ``margin`` pixels on each side, within the page of ``size`` and ``max_pixels``."""
    while True:
        clip = (
            max(0, box[0] - margin),
            max(0, box[1] - margin),
            min(size[0], box[2] + margin),
            min(size[1], box[3] + margin),
        )
        if margin == 0 or (clip[2] - clip[0]) * (clip[3] - clip[1]) <= max_pixels:
            return clip
        margin //= 2


def _render_box(
    page: Any, scale: float, box: tuple[int, int, int, int], clip: tuple[int, int, int, int] | None = None
) -> Image.Image:
    """The pixels ``box`` (left, top, right, bottom) of ``page`` rendered at ``scale`` (pixels per point; the
    page is ``ceil(points * scale)`` pixels), as an RGB image; pdfium draws ``clip`` (default: ``box``), which
    holds ``box``.

    A whole page and a region go through this one call, so a region is bit-identical to the whole page
    rendered at that size and cropped: pdfium is given a bitmap the size of the WHOLE page and the same
    matrix every time, and only the clip differs. (A bitmap of the region's size would make pdfium's
    rasteriser clip every path at the region's edges, in 1/256-pixel fixed point, which tilts a cut stroke
    by a few LSB.) For a region the whole-page bitmap is address space only (:func:`_lazy_buffer`): pdfium
    writes inside the clip and nowhere else, so only the clip's rows and columns are ever backed by memory.
    The clip is wider than the region only for interpolated images (:func:`_image_margin`).
    """
    raw = _pdfium().raw
    points = page.get_size()
    width, height = math.ceil(points[0] * scale), math.ceil(points[1] * scale)
    left, top, right, bottom = box
    clip = box if clip is None else clip
    stride = width * 3
    nbytes = stride * height
    mapping = None
    if clip != (0, 0, width, height):
        mapping = _lazy_buffer(nbytes) if nbytes <= _PDFIUM_MAX_BITMAP_BYTES else None
        if mapping is None:
            return _render_clipped(page, scale, (width, height), box)
    array_type = ctypes.c_ubyte * nbytes
    buffer = array_type() if mapping is None else array_type.from_buffer(mapping)
    bitmap = raw.FPDFBitmap_CreateEx(width, height, raw.FPDFBitmap_BGR, buffer, stride)
    try:
        if not bitmap:
            raise MemoryError(f"pdfium could not create a {width}x{height} bitmap")
        raw.FPDFBitmap_FillRect(bitmap, clip[0], clip[1], clip[2] - clip[0], clip[3] - clip[1], 0xFFFFFFFF)
        # Page points to pixels: the page fills the bitmap exactly (ceil'd size / points on each axis).
        matrix = raw.FS_MATRIX(width / points[0], 0, 0, height / points[1], 0, 0)
        raw.FPDF_RenderPageBitmapWithMatrix(bitmap, page.raw, matrix, raw.FS_RECTF(*clip), raw.FPDF_ANNOT)
        rows = np.frombuffer(buffer, dtype=np.uint8).reshape(height, stride)[top:bottom, left * 3 : right * 3]
        # BGR -> RGB; the copy owns its pixels, so the buffer can go.
        image = Image.fromarray(np.ascontiguousarray(rows.reshape(bottom - top, right - left, 3)[:, :, ::-1]))
        del rows
    finally:
        if bitmap:
            raw.FPDFBitmap_Destroy(bitmap)
        del buffer
        if mapping is not None:
            with contextlib.suppress(BufferError):  # a view still held (an error mid-copy): freed with it
                mapping.close()
    return image


def _render_clipped(page: Any, scale: float, size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    """``box`` rendered on a bitmap of its own size, for a page too large for a whole-page bitmap (see
    :func:`_render_box`): the same pixel grid, but a stroke cut by the box's edge can differ by a few LSB."""
    left, top, right, bottom = box
    # pypdfium2 turns each crop side into ceil(points * scale) pixels; half a pixel less than the wanted
    # count rounds up to exactly it, whatever float error the division leaves.
    crop = tuple(max(0.0, (px - 0.5) / scale) if px else 0.0 for px in (left, size[1] - bottom, size[0] - right, top))
    bitmap = page.render(scale=scale, crop=crop)
    try:
        return bitmap.to_pil().convert("RGB")  # convert() copies: the image owns its pixels
    finally:
        bitmap.close()


def _lazy_buffer(size: int) -> mmap.mmap | None:
    """``size`` bytes of address space whose pages get memory only when written (an anonymous mapping), or
    ``None`` when the system will not map that much."""
    try:
        if hasattr(mmap, "MAP_PRIVATE"):
            return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return mmap.mmap(-1, size)  # Windows: pagefile-backed, committed page by page as written
    except (OSError, ValueError, OverflowError):
        return None


def _page_too_large(
    name: str,
    index: int,
    pixels: tuple[int, int],
    points: tuple[float, float],
    dpi: float,
    policy: ImagePolicy,
) -> ImageTooLargeError:
    fitting = _fitting_dpi(points, policy.max_pixels)
    return ImageTooLargeError(
        f"page {index + 1} of {name} would be {pixels[0]}x{pixels[1]} = {pixels[0] * pixels[1]:,} pixels "
        f"at dpi={dpi:g}, more than max_pixels={policy.max_pixels:,}; render it at dpi={fitting} "
        "or lower, or raise max_pixels in the ImagePolicy."
    )


def _pixels_at(points: tuple[float, float], dpi: float) -> int:
    scale = dpi / _POINTS_PER_INCH
    return math.ceil(points[0] * scale) * math.ceil(points[1] * scale)


def _fitting_dpi(points: tuple[float, float], max_pixels: int) -> int:
    """The highest whole dpi at which a page of ``points`` fits ``max_pixels`` (at least 1)."""
    dpi = math.floor(_POINTS_PER_INCH * math.sqrt(max_pixels / max(points[0] * points[1], 1e-9)))
    while dpi > 1 and _pixels_at(points, dpi) > max_pixels:  # ceil() rounding can push it just over
        dpi -= 1
    return max(dpi, 1)


# ----------------------------------------------------------------------------------------------------
# Opening documents
# ----------------------------------------------------------------------------------------------------
def _pdfium() -> Any:
    try:
        import pypdfium2
    except ImportError as err:
        raise MissingDependencyError(
            'rendering PDFs needs pypdfium2, which is not installed; pip install "hd4k-tools[pdf]"'
        ) from err
    return pypdfium2


def _read_pdf_bytes(source: ImageSource | SourceBytes, policy: ImagePolicy | None) -> SourceBytes:
    raw = read_source_bytes(source, policy=policy)
    if raw.kind == "pdf":
        return raw
    if raw.kind == "image":
        raise PDFError(f"{raw.name} is an image, not a PDF; use load_image for images.")
    raise PDFError(f"{raw.name} is not a PDF (no %PDF- header); pass a PDF file, or re-download it if it is damaged.")


@contextmanager
def _open_document(raw: SourceBytes) -> Iterator[pypdfium2.PdfDocument]:
    pdfium = _pdfium()
    with _PDFIUM_LOCK:
        try:
            document = pdfium.PdfDocument(raw.data)
        except pdfium.PdfiumError as err:
            raise _open_error(pdfium, raw.name, err) from err
        except Exception as err:
            raise PDFError(f"{raw.name} could not be opened as a PDF ({err}); it may be damaged.") from err
    try:
        yield document
    finally:
        with _PDFIUM_LOCK:
            document.close()


def _open_error(pdfium: Any, name: str, err: Any) -> PDFError:
    raw_api = pdfium.raw
    if err.err_code in (raw_api.FPDF_ERR_PASSWORD, raw_api.FPDF_ERR_SECURITY):
        return EncryptedPDFError(
            f"{name} is password-protected (encrypted), so its pages cannot be rendered; remove the "
            "password first (e.g. qpdf --decrypt --password=... in.pdf out.pdf) and pass the result."
        )
    return PDFError(
        f"{name} could not be opened as a PDF ({err}); it is damaged or not a PDF. Re-export or "
        "re-download it and try again."
    )
