"""Regenerate the sample images in ``examples/`` (deterministic; no network, no model).

    .venv/bin/python examples/make_examples.py

``page.png`` is a synthetic 1700×2200 document page (a US-letter page at 200 dpi): a title, paragraphs
of small text, a bar chart and a table, all drawn with Pillow. Small text is exactly what HD-N tiling
is for: try ``hd4k tiles examples/page.png``.
"""

from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT = 1700, 2200
MARGIN = 130
INK = (28, 28, 30)
MUTED = (95, 99, 104)
RULE = (200, 203, 208)
BARS = ((37, 99, 235), (234, 88, 12))

QUARTERS = ("Q1", "Q2", "Q3", "Q4")
REVENUE = {"2023": (41.2, 44.8, 47.1, 52.6), "2024": (49.5, 53.0, 58.4, 63.9)}
TABLE = (
    ("Region", "Units", "Revenue ($M)", "Margin", "YoY"),
    ("North", "18,240", "21.4", "31.2%", "+12.4%"),
    ("South", "11,905", "13.8", "27.9%", "+8.1%"),
    ("East", "15,377", "17.6", "29.5%", "+15.0%"),
    ("West", "9,812", "11.1", "24.3%", "-2.7%"),
    ("Total", "55,334", "63.9", "28.9%", "+10.3%"),
)
_WORD_TEXT = (
    "tiling resolution document model token budget global view padding aspect ratio crop grid "
    "vision encoder patch layout scan chart table figure caption margin column quarterly revenue "
    "growth region estimate baseline forecast variance sample metric accuracy latency throughput"
)
WORDS = _WORD_TEXT.split()


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def paragraph(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(9, 18))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def wrap(draw: ImageDraw.ImageDraw, text: str, f: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> list[str]:
    """Greedy word wrap to the text column's pixel width."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=f) <= WIDTH - 2 * MARGIN or not current:
            current = candidate
        else:
            lines.append(current)
            current = word
    return [*lines, current] if current else lines


def draw_text_block(draw: ImageDraw.ImageDraw, y: int, text: str, size: int) -> int:
    f = font(size)
    for line in wrap(draw, text, f):
        draw.text((MARGIN, y), line, font=f, fill=INK)
        y += round(size * 1.45)
    return y


def draw_chart(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int]) -> None:
    x0, y0, x1, y1 = box
    draw.text((x0, y0), "Figure 1. Quarterly revenue ($M), 2023 vs 2024", font=font(26), fill=INK)
    top, bottom, left = y0 + 60, y1 - 50, x0 + 70
    vmax = 70.0
    for v in range(0, 71, 10):
        y = bottom - (bottom - top) * v / vmax
        draw.line((left, y, x1, y), fill=RULE, width=1)
        draw.text((x0, y - 10), f"{v}", font=font(18), fill=MUTED)
    group_w = (x1 - left) / len(QUARTERS)
    bar_w = group_w * 0.3
    for i, q in enumerate(QUARTERS):
        gx = left + i * group_w + group_w * 0.18
        for j, values in enumerate(REVENUE.values()):
            bx = gx + j * (bar_w + 8)
            by = bottom - (bottom - top) * values[i] / vmax
            draw.rectangle((bx, by, bx + bar_w, bottom), fill=BARS[j])
            draw.text((bx + 4, by - 26), f"{values[i]:.1f}", font=font(17), fill=INK)
        draw.text((gx + bar_w - 8, bottom + 12), q, font=font(20), fill=INK)
    for j, year in enumerate(REVENUE):
        lx = x1 - 230 + j * 115
        draw.rectangle((lx, y0 + 8, lx + 22, y0 + 30), fill=BARS[j])
        draw.text((lx + 30, y0 + 7), year, font=font(20), fill=INK)


def draw_table(draw: ImageDraw.ImageDraw, x0: int, y0: int, x1: int) -> int:
    draw.text((x0, y0), "Table 2. Revenue by region, Q4 2024", font=font(26), fill=INK)
    y = y0 + 50
    col_w = (x1 - x0) / len(TABLE[0])
    row_h = 46
    for r, row in enumerate(TABLE):
        if r == 0:
            draw.rectangle((x0, y, x1, y + row_h), fill=(238, 241, 246))
        for c, cell in enumerate(row):
            f = font(21)
            tx = x0 + c * col_w + 14 if c == 0 else x0 + (c + 1) * col_w - 14 - draw.textlength(cell, font=f)
            draw.text((tx, y + 12), cell, font=f, fill=INK if r else MUTED)
        y += row_h
        draw.line((x0, y, x1, y), fill=INK if r in (0, len(TABLE) - 2) else RULE, width=2 if r == 0 else 1)
    return y


def make_page() -> Image.Image:
    rng = random.Random(4096)
    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(img)
    draw.text((MARGIN, 120), "Quarterly Report: High-Resolution Reading", font=font(56), fill=INK)
    draw.text((MARGIN, 195), "Internal memo · synthetic sample page for hd4k-tools", font=font(26), fill=MUTED)
    draw.line((MARGIN, 245, WIDTH - MARGIN, 245), fill=INK, width=3)
    y = 280
    for heading in ("1. Summary", "2. Method"):
        draw.text((MARGIN, y), heading, font=font(32), fill=INK)
        y = draw_text_block(draw, y + 52, paragraph(rng, 6), 20) + 24
    draw_chart(draw, (MARGIN, y + 10, WIDTH - MARGIN, y + 600))
    y += 640
    y = draw_table(draw, MARGIN, y, WIDTH - MARGIN) + 40
    draw.text((MARGIN, y), "3. Notes", font=font(32), fill=INK)
    y += 52
    for _ in range(3):
        y = draw_text_block(draw, y, paragraph(rng, 5), 16) + 14
    footer = "Page 3 of 12 · figures in millions of US dollars · generated by examples/make_examples.py"
    draw.text((MARGIN, HEIGHT - 90), footer, font=font(16), fill=MUTED)
    return img


def main() -> None:
    path = HERE / "page.png"
    make_page().save(path, optimize=True)
    print(f"wrote {path} ({path.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
