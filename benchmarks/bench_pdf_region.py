"""The cost of an exact PDF region render: time and peak memory, next to the clipped render and the whole page.

A region of a PDF page is rendered by pdfium on a bitmap the size of the whole page at the region's scale
(only the clip differs from a whole-page render, so the pixels are bit-identical to the whole page cropped);
that bitmap is address space only, and memory is committed just for the rows and columns pdfium writes
(``hd4k_tools.inputs.pdf._render_box``). This script measures, for a quadrant ``[0, 0, 0.5, 0.5]`` and a 1/16
region ``[0.25, 0.25, 0.5, 0.5]`` of a drawing-like letter page (a line grid, diagonal strokes, 4-pt labels),
at two scales:

- **exact**: ``render_pages(..., region=...)`` (the shipped method);
- **clipped**: the region on a bitmap of its own size (the method before; strokes the edge cuts differ by a
  few LSB);
- **whole page**: ``render_pages(...)`` at the same scale, then the crop.

Each measurement runs in a fresh process (so peak RSS is that render's own): wall time of the call and the
peak resident memory it added (VmHWM after minus VmRSS before), also given as "pixels" (bytes / 3). Rounds
alternate the order of the methods (ABC, CBA, ...); medians and per-round ranges are reported with the load
average. Writes a subsection of RESULTS.md's "Look closer" section.

    .venv/bin/python benchmarks/bench_pdf_region.py --rounds 4
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from results import cpu_name, write_subsection

from hd4k_tools.testing import pdf_file

PARENT = "## Look closer: whole page, windows and regions"
SUBSECTION = "### PDF region render: exact vs clipped vs whole page"
REGIONS = {"quadrant": (0.0, 0.0, 0.5, 0.5), "1/16": (0.25, 0.25, 0.5, 0.5)}
DPIS = (200, 600)
METHODS = ("exact", "clipped", "whole page")


def drawing_pdf() -> bytes:
    """A letter page like a technical drawing: a 10-pt line grid, long diagonal strokes, 4-pt labels."""
    ops = ["0 0 0 RG 0.1 w"]
    ops += [f"{x} 0 m {x} 792 l S" for x in range(0, 613, 10)] + [f"0 {y} m 612 {y} l S" for y in range(0, 793, 10)]
    ops.append("0.6 0 0 RG 0.5 w")
    for i in range(60):
        t = math.radians(3 * i + 0.7)
        ops.append(
            f"{306 - 500 * math.cos(t):.2f} {396 - 500 * math.sin(t):.2f} m "
            f"{306 + 500 * math.cos(t):.2f} {396 + 500 * math.sin(t):.2f} l S"
        )
    ops.append("BT /F1 4 Tf 0 0 0 rg")
    ops += [f"1 0 0 1 {12 + (i % 12) * 50} {780 - (i // 12) * 9} Tm (A-{i:03d} 0.25) Tj" for i in range(12 * 86)]
    ops.append("ET")
    stream = "\n".join(ops).encode()
    bodies = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
        b"/Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    return pdf_file(bodies)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(method: str, region_name: str, dpi: int) -> dict[str, float]:
    """One render in this (fresh) process: its wall time and the peak resident memory it added."""
    from hd4k_tools.inputs import pdf
    from hd4k_tools.inputs.policy import ImagePolicy
    from hd4k_tools.zoom import region_box

    data, region = drawing_pdf(), REGIONS[region_name]
    policy = ImagePolicy(max_pixels=400_000_000)
    list(pdf.render_pages(data, dpi=72, policy=policy))  # load pdfium and its fonts before measuring
    if method == "clipped":
        pdf._lazy_buffer = lambda size: None  # no whole-page address space: the region-sized bitmap
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    start = time.perf_counter()
    if method == "whole page":
        (page,) = pdf.render_pages(data, dpi=dpi, policy=policy)
        image = page.image.crop(region_box(page.image.width, page.image.height, region))
    else:
        (page,) = pdf.render_pages(data, dpi=dpi, policy=policy, region=region)
        image = page.image
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") - before
    return {"s": seconds, "peak_mib": peak / 1024, "peak_px": peak * 1024 / 3, "region_px": image.width * image.height}


def _measure(method: str, region_name: str, dpi: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", method, region_name, str(dpi)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_px(px: float) -> str:
    return f"{px / 1e6:.1f} M" if px >= 1e6 else f"{px / 1e3:.0f} k"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print the subsection only")
    parser.add_argument("--machine-note", default="", help="what else ran on the machine (e.g. 'otherwise idle')")
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "REGION", "DPI"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], int(args.child[2]))))
        return 0
    load_start = os.getloadavg()
    rows = []
    for region_name in REGIONS:
        for dpi in DPIS:
            runs: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
            for r in range(args.rounds):
                for method in METHODS if r % 2 == 0 else tuple(reversed(METHODS)):
                    runs[method].append(_measure(method, region_name, dpi))
            rows.append((region_name, dpi, runs))
            print(region_name, dpi, {m: [round(x["s"], 3) for x in v] for m, v in runs.items()}, flush=True)
    load_end = os.getloadavg()
    lines = [
        SUBSECTION,
        "",
        f"`benchmarks/bench_pdf_region.py --rounds {args.rounds}` — {datetime.date.today().isoformat()}, "
        f"{cpu_name()} ({os.cpu_count()} cores{', ' + args.machine_note if args.machine_note else ''}); "
        f"1-min load average {load_start[0]:.1f} at the start and {load_end[0]:.1f} at the end. A drawing-like "
        "letter page (line grid, diagonal strokes, 4-pt labels); each render in a fresh process; time = median "
        "of the rounds (range in brackets), alternating the methods' order each round; peak = resident memory "
        "the render added (VmHWM), also as 3-byte pixels. Exact: the shipped region render (bit-identical to "
        "the whole page cropped); clipped: the region on a bitmap of its own size (the method before, within a "
        "few LSB); whole page: the page at that scale, then cropped.",
        "",
        "| region | dpi | region px | exact: time | clipped: time | whole page: time | exact / clipped | "
        "exact / whole | exact: peak | clipped: peak | whole page: peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for region_name, dpi, runs in rows:
        med = {m: statistics.median(x["s"] for x in runs[m]) for m in METHODS}
        rng = {m: (min(x["s"] for x in runs[m]), max(x["s"] for x in runs[m])) for m in METHODS}
        peak = {m: statistics.median(x["peak_px"] for x in runs[m]) for m in METHODS}
        peak_mib = {m: statistics.median(x["peak_mib"] for x in runs[m]) for m in METHODS}
        ratios_c = [a["s"] / b["s"] for a, b in zip(runs["exact"], runs["clipped"], strict=True)]
        ratios_w = [a["s"] / b["s"] for a, b in zip(runs["exact"], runs["whole page"], strict=True)]
        cells = [f"{med[m]:.3f} s ({rng[m][0]:.3f}-{rng[m][1]:.3f})" for m in METHODS]
        peaks = [f"{peak_mib[m]:.0f} MiB ({_fmt_px(peak[m])})" for m in METHODS]
        lines.append(
            f"| {region_name} | {dpi} | {_fmt_px(runs['exact'][0]['region_px'])} | " + " | ".join(cells) + " | "
            f"{statistics.median(ratios_c):.2f}x ({min(ratios_c):.2f}-{max(ratios_c):.2f}) | "
            f"{statistics.median(ratios_w):.2f}x ({min(ratios_w):.2f}-{max(ratios_w):.2f}) | "
            + " | ".join(peaks)
            + " |"
        )
    lines += [
        "",
        "Exact costs more time than clipped because pdfium's rasteriser, clipped to the whole page, walks the "
        "full outline of every path that reaches into the region (here the grid lines and diagonals that "
        "cross the page), not just the part inside; it stays well under the whole page, whose pixels it "
        "does not fill. Its peak memory is the region's own plus the few mapping pages each row touches, "
        "not the page's.",
    ]
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        write_subsection(PARENT, SUBSECTION, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
