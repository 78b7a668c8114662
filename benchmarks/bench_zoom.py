"""Look closer, in numbers: what the model sees of a large page whole, in windows and as a region.

Arithmetic from the HD-N plans (no model, no timing): for portrait pages of 2k, 4k, 8k and 14k pixels on the
long side (A-series aspect, 1:sqrt(2)) at HD-25/55/65, the effective resolution (source pixels per model
pixel along the worse axis, and the model pixels the page's long side becomes) and the image tokens of

- the whole page,
- ``read_document(windows="auto")`` (the fewest overlapping windows that keep every window within
  ``hd4k_tools.zoom.DETAIL_LOSS_THRESHOLD``, at most ``MAX_WINDOWS``), and
- a region, the top-left quarter ``[0, 0, 0.5, 0.5]`` (tiled with the whole budget).

No claim about answer quality is made (that needs the real weights). Writes its section of RESULTS.md.

    .venv/bin/python benchmarks/bench_zoom.py
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import kept_subsection, write_section

from hd4k_tools.tiling import plan
from hd4k_tools.zoom import DETAIL_LOSS_THRESHOLD, MAX_WINDOWS, detail_loss, plan_windows, region_box

SECTION = "## Look closer: whole page, windows and regions"
WINDOWS_SUBSECTION = "### Windowed read: vLLM vs native"
REGION_SUBSECTION = "### PDF region render: exact vs clipped vs whole page"
LONG_SIDES = (2000, 4000, 8000, 14000)
HD_NUMS = (25, 55, 65)
QUARTER = (0.0, 0.0, 0.5, 0.5)


def _row(long_side: int, hd_num: int) -> str:
    width, height = round(long_side / math.sqrt(2)), long_side
    whole = plan(width, height, hd_num)
    whole_loss = detail_loss(whole)
    windows = plan_windows(width, height, hd_num, "auto")
    window_plans = [plan(*w.size, hd_num) for w in windows]
    window_scale = max(detail_loss(p).scale for p in window_plans)
    window_tokens = sum(p.num_tokens for p in window_plans)
    left, top, right, bottom = region_box(width, height, QUARTER)
    quarter = plan(right - left, bottom - top, hd_num)
    quarter_scale = detail_loss(quarter).scale
    return (
        f"| {width}×{height} | HD-{hd_num} | {whole_loss.scale:.2f}x ({round(height / whole_loss.scale)} px) | "
        f"{whole.num_tokens} | {len(windows)} | {window_scale:.2f}x ({round(height / window_scale)} px) | "
        f"{window_tokens} (+{window_tokens - whole.num_tokens}, {window_tokens / whole.num_tokens:.1f}x) | "
        f"{quarter_scale:.2f}x | {quarter.num_tokens} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-write", action="store_true", help="print the section only")
    args = parser.parse_args()
    lines = [
        SECTION,
        "",
        f"`benchmarks/bench_zoom.py` — {datetime.date.today().isoformat()}; arithmetic from the HD-N plans "
        "(no model, machine-independent). Effective resolution: source pixels per model pixel along the worse "
        "axis (1.00x keeps every pixel), and in brackets the model pixels the page's long side becomes. "
        f'Windows: `read_document(windows="auto")`, the fewest overlapping windows (at most {MAX_WINDOWS}) '
        f"that keep every window within {DETAIL_LOSS_THRESHOLD}x, read at the same HD-N; tokens are image tokens "
        "of all windows, + what they add over the whole page. Region: the top-left quarter `[0, 0, 0.5, 0.5]`, "
        "tiled with the whole budget (its effective resolution is for that quarter only).",
        "",
        "| page (px) | budget | whole page: detail | whole page: tokens | windows | windows: worst detail | "
        "windows: tokens | region: detail | region: tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row(long_side, hd) for long_side in LONG_SIDES for hd in HD_NUMS]
    lines += [
        "",
        f"Detail loss above {DETAIL_LOSS_THRESHOLD}x is reported to the agent in one line with a `region` to "
        "call. A 14k page at HD-25 needs more than the window cap; it is read in the maximum number of windows "
        "and still reports its loss. Timing of a windowed read on the vLLM engine vs the native one: the "
        "subsection below (`bench_windows_engines.py`, run in the vLLM environment).",
        "",
    ]
    # The vLLM timing and the PDF render cost are measured by other scripts (bench_windows_engines.py in the
    # vLLM environment, bench_pdf_region.py): keep them.
    for title in (WINDOWS_SUBSECTION, REGION_SUBSECTION):
        if kept := kept_subsection(title):
            lines += [kept, ""]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        write_section(SECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
