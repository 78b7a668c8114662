"""A picture of an HD-N plan for people: the image with its tile grid, padding and a caption
(``hd4k tiles``, notebooks, the README figure)."""

from __future__ import annotations

from typing import TypeAlias

from PIL import Image, ImageDraw, ImageFont

from hd4k_tools.models.xcomposer2_4khd.tiling import PAD_WHITE, TILE, HDNum, HDPlan, as_rgb, plan_for_image

__all__ = ["draw_plan"]


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
    p = plan_for_image(image, hd_num, max_tokens)
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
    shown = as_rgb(image).resize(
        (max(1, content[2] - content[0]), max(1, content[3] - content[1])),
        Image.Resampling.BILINEAR,
        reducing_gap=2.0,
    )
    view = Image.new("RGB", size, PAD_WHITE)
    view.paste(shown, content[:2])
    view = Image.alpha_composite(view.convert("RGBA"), _draw_overlay(size, p, f, content)).convert("RGB")
    return _add_caption(view, p)
