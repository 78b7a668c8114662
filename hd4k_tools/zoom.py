"""Look closer: regions of a page, the detail lost to the HD-N plan, and pages read in windows (torch-free).

HD-N fits any image into at most N 336x336 tiles, so a large page is shrunk before the model sees it. This
module says by how much (:class:`DetailLoss`: source pixels per model pixel along each axis), tells an
agent in one line when that is too much (:func:`detail_note`, with a suggested ``region``), crops a
``region`` (a box in page fractions, :func:`check_region`, :func:`region_box`), splits a page into
overlapping windows (:func:`plan_windows`) and merges the windows' texts (:func:`merge_window_texts`).

The threshold and the wording live here, once (:data:`DETAIL_LOSS_THRESHOLD`, :func:`detail_note`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw
from pydantic import BaseModel, ConfigDict

from hd4k_tools.errors import InvalidRegionError
from hd4k_tools.tiling import MAX_AUTO_HD_NUM, HDPlan, plan

__all__ = [
    "DETAIL_LOSS_THRESHOLD",
    "MAX_WINDOWS",
    "WINDOW_OVERLAP",
    "DetailLoss",
    "Region",
    "Window",
    "check_region",
    "check_windows",
    "compose_region",
    "crop_region",
    "detail_loss",
    "detail_note",
    "draw_windows",
    "merge_window_texts",
    "parse_region",
    "plan_windows",
    "region_box",
    "snap_region",
]

Region = tuple[float, float, float, float]

# Pixels: a box edge this close to a whole pixel is on it (float noise of fraction * size).
_EDGE_EPS = 1e-6

#: Source pixels per model pixel (along the worse axis) above which an answer says that detail was lost.
#: At 1.5 a 9-px glyph becomes 6 model px, about the smallest the model reads reliably at 336-px tiles.
DETAIL_LOSS_THRESHOLD = 1.5
#: Overlap of neighbouring windows, as a fraction of a window's width or height: a text line cut by one
#: window's edge is whole in its neighbour.
WINDOW_OVERLAP = 0.12
#: Most windows ``windows="auto"`` (or ``N``) splits one page into.
MAX_WINDOWS = 16


# ----------------------------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------------------------
def check_region(region: Any) -> Region:
    """``region`` as ``(x0, y0, x1, y1)`` page fractions (0 = left/top, 1 = right/bottom).

    Raises:
        InvalidRegionError: not four numbers, outside [0, 1], empty or inverted (``x0 >= x1`` or ``y0 >= y1``).
    """
    if isinstance(region, str):
        return parse_region(region)
    example = "e.g. [0, 0, 0.5, 0.5] for the top-left quarter"
    if not isinstance(region, Sequence) or len(region) != 4:
        raise InvalidRegionError(
            f"region must be four numbers [x0, y0, x1, y1] in fractions of the page, got {region!r:.80}; {example}."
        )
    values = []
    for v in region:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise InvalidRegionError(f"region values must be numbers between 0 and 1, got {v!r:.40}; {example}.")
        values.append(float(v))
    x0, y0, x1, y1 = values
    if not all(0.0 <= v <= 1.0 for v in values):
        raise InvalidRegionError(
            f"region {values} is outside the page: every value must be between 0 and 1 (fractions); {example}."
        )
    if x0 >= x1 or y0 >= y1:
        raise InvalidRegionError(
            f"region {values} is empty or inverted: it needs x0 < x1 and y0 < y1 (left, top, right, bottom); {example}."
        )
    return (x0, y0, x1, y1)


def parse_region(text: str) -> Region:
    """``"x0,y0,x1,y1"`` (commas and/or spaces, optional brackets) as a checked region."""
    parts = [p for p in re.split(r"[\s,]+", text.strip().strip("[]()")) if p]
    try:
        numbers = [float(p) for p in parts]
    except ValueError:
        raise InvalidRegionError(
            f"region {text!r:.80} is not four numbers; write it as x0,y0,x1,y1 in page fractions, e.g. 0,0,0.5,0.5."
        ) from None
    return check_region(numbers)


def region_box(width: int, height: int, region: Region) -> tuple[int, int, int, int]:
    """The pixel box ``(left, top, right, bottom)`` of ``region`` on a ``width x height`` image: the
    fractions scaled outward to whole pixels (never empty). The one rounding rule for crops and PDF clips."""
    x0, y0, x1, y1 = region
    # A fraction within float noise of a pixel edge is on it, so a box read back (snap_region) is the same box.
    left = min(math.floor(x0 * width + _EDGE_EPS), width - 1)
    top = min(math.floor(y0 * height + _EDGE_EPS), height - 1)
    right = max(math.ceil(x1 * width - _EDGE_EPS), left + 1)
    bottom = max(math.ceil(y1 * height - _EDGE_EPS), top + 1)
    return left, top, min(right, width), min(bottom, height)


def snap_region(width: int, height: int, region: Region) -> Region:
    """``region`` snapped outward to whole pixels of a ``width x height`` image, in page fractions: the box
    actually read (what results report as ``region``); :func:`region_box` of it gives the same pixels."""
    left, top, right, bottom = region_box(width, height, region)
    return (left / width, top / height, right / width, bottom / height)


def sub_region(outer: Region | None, size: tuple[int, int], box: tuple[int, int, int, int]) -> Region:
    """The pixel ``box`` of an image of ``size`` that shows ``outer`` (page fractions; ``None``: the page),
    as page fractions, unrounded (e.g. a window of a region, as read)."""
    x0, y0, x1, y1 = outer or (0.0, 0.0, 1.0, 1.0)
    fx, fy = (x1 - x0) / size[0], (y1 - y0) / size[1]
    return (x0 + box[0] * fx, y0 + box[1] * fy, x0 + box[2] * fx, y0 + box[3] * fy)


def compose_region(outer: Region | None, inner: Region) -> Region:
    """``inner`` (fractions of ``outer``) as fractions of the page; ``outer=None``: the page itself."""
    if outer is None:
        return inner
    x0, y0, x1, y1 = outer
    w, h = x1 - x0, y1 - y0
    box = (x0 + inner[0] * w, y0 + inner[1] * h, x0 + inner[2] * w, y0 + inner[3] * h)
    return (round(box[0], 6), round(box[1], 6), round(box[2], 6), round(box[3], 6))


def crop_region(image: Image.Image, region: Region | None) -> Image.Image:
    """``image`` cropped to ``region`` (the pixels themselves, no resampling); ``None``: the image."""
    if region is None:
        return image
    return image.crop(region_box(image.width, image.height, check_region(region)))


# ----------------------------------------------------------------------------------------------------
# Detail loss
# ----------------------------------------------------------------------------------------------------
class DetailLoss(BaseModel):
    """How much the source was shrunk to fit its HD-N plan (reported on every result).

    ``scale_x``/``scale_y``: source pixels per model pixel along each axis (1.0: every pixel kept; 4.0: a
    4x4 block of source pixels became one). ``render_scale``: for a PDF page, rendered pixels per PDF point
    (dpi / 72); ``effective_dpi``: what the model saw of the page, in model pixels per inch.
    """

    model_config = ConfigDict(frozen=True)

    source_size: tuple[int, int]
    model_size: tuple[int, int]
    scale_x: float
    scale_y: float
    render_scale: float | None = None
    effective_dpi: float | None = None
    region: Region | None = None

    @property
    def scale(self) -> float:
        """The worse axis."""
        return max(self.scale_x, self.scale_y)

    @property
    def lost(self) -> bool:
        """More than :data:`DETAIL_LOSS_THRESHOLD` source pixels per model pixel."""
        return self.scale > DETAIL_LOSS_THRESHOLD


def detail_loss(hd_plan: HDPlan, *, render_scale: float | None = None, region: Region | None = None) -> DetailLoss:
    """The :class:`DetailLoss` of an image planned as ``hd_plan`` (``render_scale``: a PDF's pixels per point)."""
    w, h = hd_plan.width, hd_plan.height
    mw, mh = hd_plan.resized_size
    sx, sy = w / max(mw, 1), h / max(mh, 1)
    dpi = None if render_scale is None else round(render_scale * 72.0 / max(sx, sy), 1)
    return DetailLoss(
        source_size=(w, h),
        model_size=(mw, mh),
        scale_x=round(sx, 3),
        scale_y=round(sy, 3),
        render_scale=render_scale,
        effective_dpi=dpi,
        region=region,
    )


def _fmt(v: float) -> str:
    return f"{v:.3f}".rstrip("0").rstrip(".") if v not in (0.0, 1.0) else str(int(v))


def suggested_grid(loss: DetailLoss) -> tuple[int, int]:
    """(rows, cols) of a grid whose cells would each be seen at about full detail (at least 2x2)."""
    cols = max(2, min(4, math.ceil(loss.scale_x / DETAIL_LOSS_THRESHOLD)))
    rows = max(2, min(4, math.ceil(loss.scale_y / DETAIL_LOSS_THRESHOLD)))
    return rows, cols


def detail_note(loss: DetailLoss | None, *, what: str = "the image") -> str | None:
    """The ONE line an agent reads when detail was lost (``None`` when it was not): how much, and a
    ``region`` call to look closer (the first cell of a grid that would keep the detail)."""
    if loss is None or not loss.lost:
        return None
    rows, cols = suggested_grid(loss)
    x0, y0, x1, y1 = loss.region or (0.0, 0.0, 1.0, 1.0)
    cell = [x0, y0, x0 + (x1 - x0) / cols, y0 + (y1 - y0) / rows]
    box = "[" + ", ".join(_fmt(v) for v in cell) + "]"
    sw, sh = loss.source_size
    mw, mh = loss.model_size
    return (
        f"[detail] {what} was shrunk {loss.scale:.1f}x to fit the tile budget ({sw}x{sh} -> {mw}x{mh} px), so "
        f"small print may be unreadable; to look closer call again with region=[x0, y0, x1, y1] in page "
        f"fractions, e.g. region={box} (top-left cell of a {rows}x{cols} grid)."
    )


# ----------------------------------------------------------------------------------------------------
# Windows
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Window:
    """One window of a page: its place in the grid, its region (page fractions) and its pixel box."""

    row: int
    col: int
    region: Region
    box: tuple[int, int, int, int]

    @property
    def size(self) -> tuple[int, int]:
        return self.box[2] - self.box[0], self.box[3] - self.box[1]


def _grid_regions(rows: int, cols: int, overlap: float) -> list[tuple[int, int, Region]]:
    out = []
    for r in range(rows):
        for c in range(cols):
            # Each cell grows by half the overlap on each inner side (clamped to the page).
            ox, oy = overlap / cols / 2, overlap / rows / 2
            x0, x1 = max(0.0, c / cols - ox), min(1.0, (c + 1) / cols + ox)
            y0, y1 = max(0.0, r / rows - oy), min(1.0, (r + 1) / rows + oy)
            out.append((r, c, (round(x0, 6), round(y0, 6), round(x1, 6), round(y1, 6))))
    return out


def _grid_for(width: int, height: int, hd_num: int, count: int | None) -> tuple[int, int]:
    """(rows, cols): for ``count`` windows the factorisation whose cells are closest to the tiles' square;
    for ``None`` (auto) the fewest windows whose detail loss stays within the threshold."""
    if count is not None:
        pairs = [(r, count // r) for r in range(1, count + 1) if count % r == 0]
        return min(pairs, key=lambda rc: abs(math.log((width / rc[1]) / (height / rc[0]))))
    for n in range(1, MAX_WINDOWS + 1):
        # Fewest columns first: text lines run across, so bands cut fewer lines than columns do.
        for cols in range(1, n + 1):
            if n % cols:
                continue
            rows = n // cols
            boxes = [region_box(width, height, region) for _, _, region in _grid_regions(rows, cols, WINDOW_OVERLAP)]
            # Inner windows overlap on both sides, so they are the largest: every window must keep the detail.
            sizes = {(right - left, bottom - top) for left, top, right, bottom in boxes}
            if all(detail_loss(plan(w, h, hd_num)).scale <= DETAIL_LOSS_THRESHOLD for w, h in sizes):
                return rows, cols
    # Not reachable within MAX_WINDOWS windows: as many as allowed, as square as the page allows.
    return _grid_for(width, height, hd_num, MAX_WINDOWS)


def check_windows(windows: int | str) -> int | str:
    """``windows`` as ``"auto"`` or an int in ``[1, MAX_WINDOWS]`` (a digit string is read as one).

    Raises:
        InvalidRegionError: anything else.
    """
    if isinstance(windows, str) and windows.strip().lower() == "auto":
        return "auto"
    if isinstance(windows, str) and windows.strip().isdigit():
        windows = int(windows)
    if isinstance(windows, int) and not isinstance(windows, bool) and 1 <= windows <= MAX_WINDOWS:
        return windows
    raise InvalidRegionError(f"windows must be 'auto' or a number of windows from 1 to {MAX_WINDOWS}, got {windows!r}.")


def plan_windows(
    width: int, height: int, hd_num: int | str | None, windows: int | str, *, overlap: float = WINDOW_OVERLAP
) -> list[Window]:
    """The overlapping windows of a ``width x height`` page, in reading order (row by row, left to right).

    ``windows="auto"``: one window (the page) when its detail loss at ``hd_num`` stays within
    :data:`DETAIL_LOSS_THRESHOLD`, else the fewest windows that keep it; an int: that many windows (up to
    :data:`MAX_WINDOWS`), as square as the page allows. ``hd_num`` ``"auto"``/``None`` plans with
    :data:`~hd4k_tools.models.xcomposer2_4khd.tiling.MAX_AUTO_HD_NUM`.

    Raises:
        InvalidRegionError: ``windows`` is neither ``"auto"`` nor an int in ``[1, MAX_WINDOWS]``.
    """
    n = hd_num if isinstance(hd_num, int) and not isinstance(hd_num, bool) else MAX_AUTO_HD_NUM
    if isinstance(windows, str) and windows.strip().lower() == "auto":
        count = None
    elif isinstance(windows, int) and not isinstance(windows, bool) and 1 <= windows <= MAX_WINDOWS:
        count = windows
    elif isinstance(windows, str) and windows.strip().isdigit() and 1 <= int(windows) <= MAX_WINDOWS:
        count = int(windows)
    else:
        raise InvalidRegionError(
            f"windows must be 'auto' or a number of windows from 1 to {MAX_WINDOWS}, got {windows!r}."
        )
    rows, cols = _grid_for(width, height, n, count)
    return [
        Window(r, c, region, region_box(width, height, region)) for r, c, region in _grid_regions(rows, cols, overlap)
    ]


_COLOURS = ("#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#008080", "#9a6324", "#800000")


def draw_windows(image: Image.Image, windows: Sequence[Window], hd_num: int, *, max_side: int = 1600) -> Image.Image:
    """A preview of ``windows`` on ``image``: each window's outline (one colour per window, numbered in
    reading order) and its own tile grid at ``hd_num``, drawn at most ``max_side`` px on the long side."""
    f = min(1.0, max_side / max(image.width, image.height))
    canvas = image.convert("RGB").resize((max(1, round(image.width * f)), max(1, round(image.height * f))))
    draw = ImageDraw.Draw(canvas)
    for i, w in enumerate(windows):
        colour = _COLOURS[i % len(_COLOURS)]
        left, top, right, bottom = w.box
        p = plan(right - left, bottom - top, hd_num)
        # Tile edges in the window's own pixels: the padded canvas's 336-px grid, scaled back from the resize.
        fx, fy = (right - left) / p.resized_size[0], (bottom - top) / p.resized_size[1]
        pad_left, pad_top = p.padding[0], p.padding[1]
        for k in range(1, p.cols):
            x = left + (k * 336 - pad_left) * fx
            if left < x < right:
                draw.line([(x * f, top * f), (x * f, bottom * f)], fill=colour, width=1)
        for k in range(1, p.rows):
            y = top + (k * 336 - pad_top) * fy
            if top < y < bottom:
                draw.line([(left * f, y * f), (right * f, y * f)], fill=colour, width=1)
        draw.rectangle([left * f, top * f, right * f - 1, bottom * f - 1], outline=colour, width=3)
        draw.text((left * f + 6, top * f + 4), f"{i + 1}: {p.rows}x{p.cols}", fill=colour)
    return canvas


# ----------------------------------------------------------------------------------------------------
# Merging the windows' texts
# ----------------------------------------------------------------------------------------------------
# Shortest fragment of a line that counts as "the same line, cut by a window edge".
_MIN_FRAGMENT = 4
# A line cut by a vertical window edge: the left part's end and the right part's start overlap by this much.
_MIN_JOIN = 6


def _norm(line: str) -> str:
    return " ".join(line.split()).casefold()


def _same_line(a: str, b: str, *, a_may_be_cut: bool, b_may_be_cut: bool) -> bool:
    """``a`` and ``b`` are the same line, either whole, or one of them a fragment of the other where it may
    have been cut by a window edge."""
    a, b = _norm(a), _norm(b)
    if a == b:
        return bool(a)
    if b_may_be_cut and len(b) >= _MIN_FRAGMENT and b in a:
        return True
    return a_may_be_cut and len(a) >= _MIN_FRAGMENT and a in b


def _line_overlap(prev: list[str], nxt: list[str]) -> int:
    """The most lines at the end of ``prev`` that start ``nxt`` (its first line may be cut at the top of its
    window, ``prev``'s last at the bottom of its own)."""
    for k in range(min(len(prev), len(nxt)), 0, -1):
        tail, head = prev[-k:], nxt[:k]
        if all(
            _same_line(a, b, a_may_be_cut=(i == k - 1), b_may_be_cut=(i == 0))
            for i, (a, b) in enumerate(zip(tail, head, strict=True))
        ):
            return k
    return 0


def _char_join(left: str, right: str) -> str | None:
    """``left`` and ``right`` as one line when the end of ``left`` is the start of ``right`` (a line cut by a
    vertical window edge, read in two overlapping parts); ``None`` when they do not overlap."""
    for k in range(min(len(left), len(right)), _MIN_JOIN - 1, -1):
        if left[-k:] == right[:k]:
            return left + right[k:]
    return None


def _merge_two(prev: list[str], nxt: list[str]) -> list[str]:
    k = _line_overlap(prev, nxt)
    if k:
        # The overlap once, each line in its longer (uncut) reading.
        overlap = [max(a, b, key=lambda s: len(_norm(s))) for a, b in zip(prev[-k:], nxt[:k], strict=True)]
        return prev[:-k] + overlap + nxt[k:]
    if prev and nxt and (joined := _char_join(prev[-1].rstrip(), nxt[0].lstrip())) is not None:
        return [*prev[:-1], joined, *nxt[1:]]
    return prev + nxt


def merge_window_texts(texts: Sequence[str]) -> str:
    """The windows' texts (in reading order) as one text, with the lines repeated by the overlaps removed.

    Neighbouring windows overlap, so the lines at the bottom of one window start the next one: they are
    kept once, in their uncut reading when a window edge cut one. A line cut by a vertical edge and read in
    two overlapping parts (``"The quick brown fo"`` + ``"brown fox jumps"``) is joined into one.
    """
    merged: list[str] = []
    for text in texts:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        merged = _merge_two(merged, lines) if merged else lines
    return "\n".join(merged)
