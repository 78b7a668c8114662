"""HD-N dynamic tiling of InternLM-XComposer2-4KHD: the plan, the padded canvas and the model inputs.

The arithmetic mirrors the reference ``HD_transform``/``padding_336`` exactly, Python float semantics
included (spec ``shared/spec/ixc2_4khd.md`` §1); the tile split, the global view and the token count
follow the vision tower (§2). Everything here is deterministic and free of global state.

Pipeline for one image of ``W×H`` pixels and a budget ``hd_num``::

    plan(W, H, hd_num)          -> HDPlan      (pure arithmetic, no pixels)
    hd_transform(image, hd_num) -> PIL canvas  (resized + white-padded, sides multiples of 336)
    to_model_inputs(image, ...) -> ModelInputs (normalised tiles [R*C,3,336,336] + global view [1,3,336,336])
    draw_plan(image, hd_num)    -> PIL preview (grid, tile numbers, padding, caption) for people

``torch`` is imported only by :func:`to_model_inputs`, so planning (and the ``hd4k tiles`` command)
stays cheap.
"""

from __future__ import annotations

import math
import operator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from hd4k_tools.errors import InputError, InvalidHDNumError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "HD_COMPARISON",
    "MAX_TILES",
    "TILE",
    "HDNum",
    "HDPlan",
    "ModelInputs",
    "auto_hd_num",
    "draw_plan",
    "hd_transform",
    "image_tokens",
    "plan",
    "resolve_hd_num",
    "to_model_inputs",
]

#: Side of one ViT crop in pixels (CLIP ViT-L/14-336; spec §1, §2).
TILE = 336
#: CLIP normalisation constants used by the reference ``vis_processor`` (spec §1.9).
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
#: hd_num values people usually compare (16: MMMU-style, 25: default, 55: documents; spec §4).
HD_COMPARISON: tuple[int, ...] = (9, 16, 25, 55)
#: Largest tile grid the pixel functions build. A plan is pure arithmetic and accepts any hd_num, but a
#: canvas of more tiles than this (HD-400 is ~62k image tokens, four times the model's 16k context) is
#: almost certainly a mistake that would only exhaust memory.
MAX_TILES = 400

HDNum: TypeAlias = int | Literal["auto"]

_WHITE = (255, 255, 255)


# ----------------------------------------------------------------------------------------------------
# Plan: pure arithmetic
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HDPlan:
    """How one ``width×height`` image is resized, padded and cut into 336-px tiles at ``hd_num``.

    Sizes are ``(width, height)`` in the image's own orientation. ``padding`` is
    ``(left, top, right, bottom)``: top/bottom for landscape and square inputs, left/right for
    portrait ones (which the reference computes transposed). ``clamped`` is True when the reference
    would crash because the resized short side is 0 px (see :func:`plan`).
    """

    width: int
    height: int
    hd_num: int
    transposed: bool
    scale: int
    resized_size: tuple[int, int]
    padded_size: tuple[int, int]
    padding: tuple[int, int, int, int]
    rows: int
    cols: int
    num_tiles: int
    num_tokens: int
    clamped: bool

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def grid(self) -> str:
        """``"rows×cols"``, e.g. ``"5×11"``."""
        return f"{self.rows}×{self.cols}"

    def summary(self) -> str:
        """One line, e.g. ``HD-55: 5×11 tiles + global view · 8137 image tokens · 3840×1600 → 3696×1680``."""
        return (
            f"HD-{self.hd_num}: {self.grid} tiles + global view · {self.num_tokens} image tokens · "
            f"{self.width}×{self.height} → {self.padded_size[0]}×{self.padded_size[1]}"
        )


def image_tokens(rows: int, cols: int) -> int:
    """Number of LLM tokens the vision tower emits for a ``rows×cols`` tile grid.

    ``(rows*cols + 1)*144 + 1 + (rows + 1)*12`` (spec §2, asserted in the reference ``build_mlp.py``):
    144 merged tokens per crop (the tiles plus the global view), 12 ``sub_GN`` newlines per row of
    crops (``rows`` tile rows plus the global view's), and one ``glb_GN`` separator. Newlines follow
    rows, so a portrait grid costs more than its landscape transpose.
    """
    return (rows * cols + 1) * 144 + 1 + (rows + 1) * 12


def _as_int(value: object) -> int | None:
    """``value`` as an int if it is an integer (int, numpy integer), else None.

    bool is refused (True as a tile budget or a size is a bug, not a 1), and so are floats and strings,
    even integral ones: an hd_num of 2.0 or "55" signals a caller that should be fixed.
    """
    if isinstance(value, bool | float | str | bytes):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_hd_num(hd_num: object) -> int:
    value = _as_int(hd_num)
    if value is None:
        raise InvalidHDNumError(f"hd_num must be a positive integer (or 'auto' with max_tokens), got {hd_num!r}.")
    if value < 1:
        raise InvalidHDNumError(
            f"hd_num must be at least 1 (it is the maximum number of 336-px tiles), got {value}; "
            "typical values are 9, 16, 25 (default) and 55 (documents)."
        )
    return value


def _check_side(name: str, value: object) -> int:
    side = _as_int(value)
    if side is None:
        raise InputError(f"image {name} must be a positive integer number of pixels, got {value!r}.")
    if side < 1:
        raise InputError(f"image {name} must be at least 1 pixel, got {side}.")
    return side


def _scale(ratio: float, hd_num: int) -> int:
    """Largest ``s >= 1`` with ``s * ceil(s / ratio) <= hd_num`` (spec §1.3).

    The reference finds it with ``while scale * np.ceil(scale / ratio) <= hd_num: scale += 1`` and then
    ``scale -= 1``. ``f(s) = s * ceil(s / ratio)`` is strictly increasing in ``s`` (``s / ratio`` is a
    correctly rounded, hence monotone, float division and ``ceil`` keeps the order), and ``f(1) = 1``
    because ``ratio >= 1``; so the loop's answer is exactly the largest ``s`` in ``[1, hd_num]`` with
    ``f(s) <= hd_num``, which bisection finds in O(log hd_num) steps with the same float expression.
    """
    lo, hi = 1, hd_num  # f(lo) <= hd_num always; the answer lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if mid * math.ceil(mid / ratio) <= hd_num:
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(width: int, height: int, hd_num: int) -> HDPlan:
    """Compute the HD-N partition of a ``width×height`` image, exactly as the reference does.

    In the working frame (the image transposed when ``width < height``, so that ``w >= h``):
    ``ratio = w / h``; ``scale`` is the largest ``s`` with ``s * ceil(s / ratio) <= hd_num``;
    ``new_w = int(scale * 336)``; ``new_h = int(new_w / ratio)`` (float division, truncated, so a few
    sizes come out 1 px shorter than exact rational arithmetic would give); the height is padded to
    ``ceil(new_h / 336) * 336`` with ``top = int((tar - new_h) / 2)`` and the odd pixel at the bottom
    (spec §1.2–§1.8). Portrait inputs are transposed back, so their padding is left/right.

    Deviation from the reference: when the aspect ratio exceeds ``336 * scale`` (e.g. 10000×10 at
    ``hd_num=1``), ``new_h`` truncates to 0 and the reference crashes inside PIL. Here the resized short
    side is clamped to 1 px and ``clamped=True`` is set; the grid then has a single row.

    Args:
        width: input width in pixels (>= 1).
        height: input height in pixels (>= 1).
        hd_num: maximum number of 336-px tiles (>= 1). Resolve ``"auto"`` first with
            :func:`resolve_hd_num`.

    Raises:
        InputError: a side that is not a positive integer.
        InvalidHDNumError: ``hd_num`` not a positive integer (bool, float and str are refused).
    """
    width = _check_side("width", width)
    height = _check_side("height", height)
    hd_num = _check_hd_num(hd_num)

    transposed = width < height  # square images are not transposed (spec §1.1)
    w, h = (height, width) if transposed else (width, height)
    ratio = w / h
    scale = _scale(ratio, hd_num)
    new_w = int(scale * TILE)
    new_h = int(new_w / ratio)
    clamped = new_h < 1
    if clamped:
        new_h = 1
    tar = int(math.ceil(new_h / TILE) * TILE)
    top = int((tar - new_h) / 2)
    bottom = tar - new_h - top

    if transposed:
        resized_size, padded_size = (new_h, new_w), (tar, new_w)
        padding = (top, 0, bottom, 0)
    else:
        resized_size, padded_size = (new_w, new_h), (new_w, tar)
        padding = (0, top, 0, bottom)
    rows, cols = padded_size[1] // TILE, padded_size[0] // TILE
    return HDPlan(
        width=width,
        height=height,
        hd_num=hd_num,
        transposed=transposed,
        scale=scale,
        resized_size=resized_size,
        padded_size=padded_size,
        padding=padding,
        rows=rows,
        cols=cols,
        num_tiles=rows * cols,
        num_tokens=image_tokens(rows, cols),
        clamped=clamped,
    )


def _check_max_tokens(max_tokens: object) -> int:
    value = _as_int(max_tokens)
    if value is None or value < 1:
        raise InvalidHDNumError(f"max_tokens must be a positive integer, got {max_tokens!r}.")
    return value


def auto_hd_num(width: int, height: int, max_tokens: int, *, max_hd_num: int = 100) -> int:
    """The largest ``hd_num`` in ``1..max_hd_num`` whose plan costs at most ``max_tokens`` image tokens.

    Image tokens never decrease as ``hd_num`` grows (``scale`` is non-decreasing, hence so are
    ``new_w``, ``new_h`` and the grid), but every candidate is checked anyway, so the answer does not
    rest on that. Several budgets often give the same grid (a square image uses 7×7 tiles for every
    ``hd_num`` in 49..63); the largest is returned.

    Raises:
        InputError: a side that is not a positive integer.
        InvalidHDNumError: ``max_tokens``/``max_hd_num`` not positive integers, or a ``max_tokens`` below
            what ``hd_num=1`` needs (the message gives that minimum).
    """
    width = _check_side("width", width)
    height = _check_side("height", height)
    max_tokens = _check_max_tokens(max_tokens)
    max_hd_num = _check_hd_num(max_hd_num)
    fitting = [n for n in range(1, max_hd_num + 1) if plan(width, height, n).num_tokens <= max_tokens]
    if not fitting:
        need = plan(width, height, 1).num_tokens
        raise InvalidHDNumError(
            f"max_tokens={max_tokens} is too small: even hd_num=1 needs {need} image tokens for a "
            f"{width}×{height} image; allow at least {need} tokens."
        )
    return fitting[-1]


def resolve_hd_num(
    hd_num: HDNum | None,
    width: int,
    height: int,
    *,
    default: int,
    max_tokens: int | None,
) -> int:
    """Turn a user's ``hd_num`` (an int, ``"auto"`` or ``None``) into a concrete tile budget.

    ``None`` gives ``default``; ``"auto"`` (any case) gives :func:`auto_hd_num` under ``max_tokens``,
    which must then be given; an int is validated and returned.

    Raises:
        InvalidHDNumError: an invalid value, or ``"auto"`` without ``max_tokens``.
        InputError: a side that is not a positive integer (checked for ``"auto"``).
    """
    if hd_num is None:
        return _check_hd_num(default)
    if isinstance(hd_num, str) and hd_num.strip().lower() == "auto":
        if max_tokens is None:
            raise InvalidHDNumError(
                "hd_num='auto' needs a token budget: pass max_tokens (e.g. 8192), or give an integer hd_num."
            )
        return auto_hd_num(width, height, max_tokens)
    return _check_hd_num(hd_num)


def _resolve_for_image(image: Image.Image, hd_num: HDNum, max_tokens: int | None) -> HDPlan:
    if not isinstance(image, Image.Image):
        raise InputError(f"expected a PIL image, got {type(image).__name__}; load it with hd4k_tools.load_image first.")
    if hd_num is None:
        raise InvalidHDNumError("hd_num is required: a positive integer, or 'auto' with max_tokens.")
    n = resolve_hd_num(hd_num, image.width, image.height, default=1, max_tokens=max_tokens)
    p = plan(image.width, image.height, n)
    if p.num_tiles > MAX_TILES:
        raise InvalidHDNumError(
            f"hd_num={n} gives {p.num_tiles} tiles ({p.num_tokens} image tokens), more than the "
            f"{MAX_TILES} this library builds; the model's context is 16384 tokens, use hd_num <= 100."
        )
    return p


# ----------------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------------
def _resized_working(image: Image.Image, p: HDPlan) -> Image.Image:
    """The reference's resize, in the working (landscape) frame: ``(new_w, new_h)``.

    Portrait images are literally transposed first: Pillow resamples horizontally then vertically with
    uint8 rounding in between, so resizing the portrait directly is *not* pixel-identical (spec §1,
    bit-exactness notes).
    """
    img = image if image.mode == "RGB" else image.convert("RGB")
    if p.transposed:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    size = (p.resized_size[1], p.resized_size[0]) if p.transposed else p.resized_size
    # torchvision F.resize on a PIL image == PIL BILINEAR (always area-aware on downscale; spec §1.5).
    return img.resize(size, Image.Resampling.BILINEAR)


def hd_transform(image: Image.Image, hd_num: HDNum, *, max_tokens: int | None = None) -> Image.Image:
    """The reference ``HD_transform``: resize to the plan and pad with white to multiples of 336 px.

    Pixel-identical to the reference (transpose portrait, BILINEAR resize, white pad top/bottom,
    transpose back). Non-RGB images are converted to RGB first. Returns an RGB image of
    ``plan.padded_size``.

    Args:
        image: the input image.
        hd_num: tile budget, or ``"auto"`` together with ``max_tokens``.
        max_tokens: image-token budget for ``hd_num="auto"``.

    Raises:
        InvalidHDNumError, InputError: see :func:`plan` and :func:`resolve_hd_num`.
    """
    p = _resolve_for_image(image, hd_num, max_tokens)
    resized = _resized_working(image, p)
    if p.transposed:
        # Transposing is an exact permutation, so transposing the (smaller) resized image and padding
        # left/right equals the reference's pad-top/bottom-then-transpose.
        resized = resized.transpose(Image.Transpose.TRANSPOSE)
    canvas = Image.new("RGB", p.padded_size, _WHITE)
    canvas.paste(resized, (p.padding[0], p.padding[1]))
    return canvas


@dataclass(frozen=True)
class ModelInputs:
    """What the vision tower consumes for one image.

    Attributes:
        tiles: ``[rows*cols, 3, 336, 336]``, row-major tile order (tile ``k`` is row ``k // cols``,
            column ``k % cols``), CLIP-normalised.
        global_view: ``[1, 3, 336, 336]``, the whole normalised padded canvas squashed to 336×336.
        plan: the :class:`HDPlan` these were built from.
    """

    tiles: torch.Tensor
    global_view: torch.Tensor
    plan: HDPlan

    @property
    def num_tokens(self) -> int:
        """Image tokens the vision tower will produce (``plan.num_tokens``)."""
        return self.plan.num_tokens


def _build_inputs(image: Image.Image, p: HDPlan, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised canvas ``[3, R*336, C*336]`` (float32) and tiles ``[R*C, 3, 336, 336]`` (``dtype``).

    Equal, value for value, to ToTensor + Normalize(CLIP) of the reference ``HD_transform`` canvas
    (spec §1.9), without building the padded PIL canvas: the resized pixels are converted once
    (uint8 -> float32) straight into their place in the canvas, the padding is set to 255.0, and the
    whole canvas then goes through the very operations of ToTensor + Normalize (``/255``, ``-mean``,
    ``/std``), so padding and content are bit-identical to the reference.

    Few, large operations on purpose: a cache-blocked loop of small ones was faster on an idle machine
    but many times slower on a busy one, where every small parallel region waits for a time slice.
    """
    import torch

    # [h, w, 3] uint8 in the working frame; np.array (not asarray) gives a writable copy, which
    # torch.from_numpy needs to stay silent.
    working = torch.from_numpy(np.array(_resized_working(image, p)))
    pixels = working.permute(1, 0, 2) if p.transposed else working  # [ch, cw, 3] final frame (view)
    pad_w, pad_h = p.padded_size
    left, top = p.padding[0], p.padding[1]
    right, bottom = left + p.resized_size[0], top + p.resized_size[1]  # content box, exclusive

    canvas = torch.empty((3, pad_h, pad_w), dtype=torch.float32)
    for strip in (
        canvas[:, :top],
        canvas[:, bottom:],
        canvas[:, top:bottom, :left],
        canvas[:, top:bottom, right:],
    ):
        if strip.numel():
            strip.fill_(255.0)
    canvas[:, top:bottom, left:right].copy_(pixels.permute(2, 0, 1))  # [3, ch, cw] <- uint8
    mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=torch.float32).view(3, 1, 1)
    canvas.div_(255).sub_(mean).div_(std)

    rows, cols = p.rows, p.cols
    # [3, R*336, C*336] -> [3, R, 336, C, 336] -> permute -> [R, C, 3, 336, 336] == [R*C, 3, 336, 336]
    blocks = canvas.view(3, rows, TILE, cols, TILE).permute(1, 3, 0, 2, 4)
    tiles = torch.empty((rows * cols, 3, TILE, TILE), dtype=dtype)
    tiles.view(rows, cols, 3, TILE, TILE).copy_(blocks)  # one pass: reorder (+ cast)
    return canvas, tiles


def to_model_inputs(
    image: Image.Image,
    hd_num: HDNum,
    *,
    dtype: torch.dtype | None = None,
    max_tokens: int | None = None,
) -> ModelInputs:
    """Preprocess ``image`` for the vision tower: normalised tiles and the global view (spec §1, §2).

    Equal to the reference: ``HD_transform`` -> ToTensor -> Normalize(CLIP) gives a float32 canvas
    ``[3, R*336, C*336]``; the tiles are its row-major 336×336 blocks
    (``reshape(3, R, 336, C, 336).permute(1, 3, 0, 2, 4)``); the global view is
    ``F.interpolate(canvas[None], size=(336, 336), mode="bicubic", align_corners=False)`` (no antialias)
    of the *normalised, padded* canvas. Both are computed in float32 and then cast to ``dtype``.

    Args:
        image: the input image (converted to RGB if needed).
        hd_num: tile budget, or ``"auto"`` together with ``max_tokens``.
        dtype: dtype of the returned tensors; ``None`` means ``torch.float32``.
        max_tokens: image-token budget for ``hd_num="auto"``.

    Raises:
        InvalidHDNumError, InputError: see :func:`plan` and :func:`resolve_hd_num`.
    """
    import torch
    import torch.nn.functional as F

    p = _resolve_for_image(image, hd_num, max_tokens)
    dtype = torch.float32 if dtype is None else dtype
    canvas, tiles = _build_inputs(image, p, dtype)  # [3, R*336, C*336] f32, [R*C, 3, 336, 336] dtype
    # The reference interpolates in float32 and casts back to the tower's dtype (spec §2).
    global_view = F.interpolate(canvas[None], size=(TILE, TILE), mode="bicubic", align_corners=False)
    return ModelInputs(tiles=tiles, global_view=global_view.to(dtype), plan=p)  # global: [1, 3, 336, 336]


# ----------------------------------------------------------------------------------------------------
# Preview for people
# ----------------------------------------------------------------------------------------------------
_PREVIEW_BG = (241, 243, 245)
_GRID = (37, 99, 235)
_CAPTION_BG = (31, 41, 55)
_CAPTION_FG = (255, 255, 255)
_CAPTION_DIM = (156, 163, 175)
_PAD_SHADE = (100, 116, 139, 110)
_MIN_WIDTH = 560
_BORDER = 16

_Font: TypeAlias = "ImageFont.FreeTypeFont | ImageFont.ImageFont"


def _font(size: int) -> _Font:
    return ImageFont.load_default(size=size)


def _font_size(font: _Font) -> int:
    return int(getattr(font, "size", 11))  # the bitmap fallback (no FreeType) is about 11 px


def _caption_lines(draw: ImageDraw.ImageDraw, p: HDPlan, width: int) -> tuple[list[str], _Font]:
    """Fit the caption into ``width`` px: one line if a readable size fits, else one line per part."""
    # Pillow's bundled font (Aileron) has no glyphs for × and →.
    text = p.summary().replace("×", "x").replace(" → ", " -> ")
    for size in range(22, 14, -1):
        font = _font(size)
        if draw.textlength(text, font=font) <= width:
            return [text], font
    parts = text.split(" · ")
    for size in range(20, 9, -1):
        font = _font(size)
        if all(draw.textlength(part, font=font) <= width for part in parts):
            return parts, font
    return parts, _font(10)


def _draw_overlay(size: tuple[int, int], p: HDPlan, f: float, content: tuple[int, int, int, int]) -> Image.Image:
    """Transparent RGBA layer: shaded padding, grid lines and numbered tile badges."""
    canvas_w, canvas_h = size
    overlay = Image.new("RGBA", size, (0, 0, 0, 0))
    od = ImageDraw.Draw(overlay)
    # Padding = the canvas minus the content box: strips above/below, or left/right for portraits.
    for box in (
        (0, 0, canvas_w, content[1]),
        (0, content[3], canvas_w, canvas_h),
        (0, 0, content[0], canvas_h),
        (content[2], 0, canvas_w, canvas_h),
    ):
        if box[2] > box[0] and box[3] > box[1]:
            od.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=_PAD_SHADE)

    tile_px = TILE * f
    line = min(3, max(1, round(tile_px / 80)))
    grid = (*_GRID, 255)
    for c in range(1, p.cols):
        x = round(c * tile_px)
        od.line((x, 0, x, canvas_h), fill=grid, width=line)
    for r in range(1, p.rows):
        y = round(r * tile_px)
        od.line((0, y, canvas_w, y), fill=grid, width=line)
    od.rectangle((0, 0, canvas_w - 1, canvas_h - 1), outline=grid, width=line)

    if tile_px < 16:  # badges would hide the tiles
        return overlay
    font = _font(max(9, min(28, round(tile_px * 0.16))))
    margin = max(2, round(tile_px * 0.04))
    pad = max(2, round(_font_size(font) * 0.25))
    for k in range(p.num_tiles):
        r, c = divmod(k, p.cols)
        x0, y0 = round(c * tile_px) + line + margin, round(r * tile_px) + line + margin
        label = str(k + 1)
        left, top, right, bottom = od.textbbox((x0, y0), label, font=font)
        od.rounded_rectangle((left - pad, top - pad, right + pad, bottom + pad), radius=pad, fill=(*_GRID, 215))
        od.text((x0, y0), label, font=font, fill=(255, 255, 255, 255))
    return overlay


def _add_caption(view: Image.Image, p: HDPlan) -> Image.Image:
    """Frame ``view`` and add a dark caption bar; the frame is at least ``_MIN_WIDTH`` wide so the
    caption stays readable under tall, narrow grids."""
    out_w = max(_MIN_WIDTH, view.width + 2 * _BORDER)
    lines, font = _caption_lines(ImageDraw.Draw(view), p, out_w - 2 * _BORDER)
    line_h = round(_font_size(font) * 1.45)
    note = "tiles numbered row by row · grey = white padding"
    if p.clamped:
        note += " · short side clamped to 1 px"
    note_font = _font(max(10, round(_font_size(font) * 0.7)))
    bar_h = line_h * len(lines) + round(_font_size(note_font) * 1.5) + 20
    out = Image.new("RGB", (out_w, view.height + 2 * _BORDER + bar_h), _PREVIEW_BG)
    out.paste(view, ((out_w - view.width) // 2, _BORDER))
    draw = ImageDraw.Draw(out)
    y = view.height + 2 * _BORDER
    draw.rectangle((0, y, out_w, out.height), fill=_CAPTION_BG)
    y += 10
    for text in lines:
        draw.text((_BORDER, y), text, font=font, fill=_CAPTION_FG)
        y += line_h
    if draw.textlength(note, font=note_font) <= out_w - 2 * _BORDER:
        draw.text((_BORDER, y), note, font=note_font, fill=_CAPTION_DIM)
    return out


def draw_plan(
    image: Image.Image,
    hd_num: HDNum,
    *,
    max_tokens: int | None = None,
    max_side: int = 1600,
) -> Image.Image:
    """A preview of the tiling for people to look at (e.g. in a notebook).

    The padded canvas with the tile grid, tile numbers (row-major, from 1), the padding shaded grey,
    and a caption bar: ``HD-55: 5x11 tiles + global view · 8137 image tokens · 3840x1600 -> 3696x1680``.
    The canvas is drawn at most ``max_side`` px on its long side; it is resized from the input directly,
    so it is fast but not the model's exact pixels (use :func:`hd_transform` for those).

    Raises:
        InvalidHDNumError, InputError: see :func:`plan` and :func:`resolve_hd_num`.
    """
    p = _resolve_for_image(image, hd_num, max_tokens)
    pad_w, pad_h = p.padded_size
    f = min(1.0, max_side / max(pad_w, pad_h))
    size = (max(1, round(pad_w * f)), max(1, round(pad_h * f)))
    left, top = p.padding[0], p.padding[1]
    content = (
        round(left * f),
        round(top * f),
        round((left + p.resized_size[0]) * f),
        round((top + p.resized_size[1]) * f),
    )
    img = image if image.mode == "RGB" else image.convert("RGB")
    shown = img.resize(
        (max(1, content[2] - content[0]), max(1, content[3] - content[1])),
        Image.Resampling.BILINEAR,
        reducing_gap=2.0,
    )
    view = Image.new("RGB", size, _WHITE)
    view.paste(shown, content[:2])
    view = Image.alpha_composite(view.convert("RGBA"), _draw_overlay(size, p, f, content)).convert("RGB")
    return _add_caption(view, p)
