"""``hd4k tiles IMAGE``: the HD-N plan of an image, its token cost and a preview PNG (no model needed).

hd4k tiles examples/page.png                 # plan, token table, preview PNG
hd4k tiles scan.jpg --hd-num auto --max-tokens 4096 --json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hd4k_tools.cli.args import EXIT_OK, CommandError, parse_hd_num
from hd4k_tools.errors import InvalidHDNumError
from hd4k_tools.inputs.images import load_image
from hd4k_tools.tasks import TASKS
from hd4k_tools.tiling import HD_COMPARISON, HDPlan, draw_plan, plan, resolve_hd_num
from hd4k_tools.zoom import Window, check_windows, detail_loss, draw_windows, plan_windows

# The preview plans a page as read_document would (its default hd_num, one fact in tasks.py).
DEFAULT_TILES_HD_NUM = TASKS["read_document"].default_hd_num
DEFAULT_AUTO_MAX_TOKENS = 8192


def _cmd_tiles(args: argparse.Namespace) -> int:

    # --max-tokens alone means "fit this budget", i.e. --hd-num auto.
    if args.hd_num is not None:
        hd_num: int | str | None = parse_hd_num(args.hd_num)
    else:
        hd_num = "auto" if args.max_tokens is not None else None
    if args.max_tokens is not None and args.max_tokens < 1:
        raise InvalidHDNumError(f"--max-tokens must be a positive integer, got {args.max_tokens}.")
    image = load_image(args.image)
    max_tokens = args.max_tokens if args.max_tokens is not None else DEFAULT_AUTO_MAX_TOKENS
    n = resolve_hd_num(hd_num, image.width, image.height, default=DEFAULT_TILES_HD_NUM, max_tokens=max_tokens)
    chosen = plan(image.width, image.height, n)
    budgets = sorted({*HD_COMPARISON, n})
    comparison = [plan(image.width, image.height, b) for b in budgets]

    windows = plan_windows(image.width, image.height, n, args.windows) if args.windows is not None else None
    out: Path | None = None
    if not args.no_preview:
        out = Path(args.out) if args.out else Path.cwd() / f"{Path(args.image).stem}.tiles.png"
        preview = draw_plan(image, n) if windows is None else draw_windows(image, windows, n)
        try:
            preview.save(out, format="PNG")
        except (OSError, ValueError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise CommandError(f"cannot write the preview to {out}: {reason}") from err

    if args.json:
        payload = _tiles_payload(args, hd_num, max_tokens, chosen, comparison, out, windows, n)
        print(json.dumps(payload, ensure_ascii=False))
        return EXIT_OK

    print(_format_plan(str(args.image), chosen, hd_num, max_tokens))
    print()
    print(_format_comparison(comparison, n))
    if windows is not None:
        print()
        print(_format_windows(windows, n))
    if out is not None:
        print()
        print(f"Preview written to {out}")
    return EXIT_OK


def _tiles_payload(
    args: argparse.Namespace,
    hd_num: int | str | None,
    max_tokens: int,
    chosen: HDPlan,
    comparison: list[HDPlan],
    out: Path | None,
    windows: list[Window] | None,
    n: int,
) -> dict[str, Any]:
    """The ``--json`` output of ``hd4k tiles``."""
    payload: dict[str, Any] = {
        "image": str(args.image),
        "hd_num_requested": hd_num,
        "max_tokens": max_tokens if hd_num == "auto" else args.max_tokens,
        "plan": chosen.to_dict(),
        "summary": chosen.summary(),
        "comparison": [
            {
                "hd_num": p.hd_num,
                "rows": p.rows,
                "cols": p.cols,
                "num_tiles": p.num_tiles,
                "num_tokens": p.num_tokens,
                "padded_size": list(p.padded_size),
            }
            for p in comparison
        ],
        "preview": str(out) if out else None,
        "detail": detail_loss(chosen).model_dump(),
    }
    if windows is not None:
        payload["windows"] = [_window_dict(w, n) for w in windows]
    return payload


def _window_dict(w: Window, n: int) -> dict[str, Any]:
    p = plan(*w.size, n)
    return {
        "row": w.row,
        "col": w.col,
        "region": list(w.region),
        "box": list(w.box),
        "grid": f"{p.rows}x{p.cols}",
        "num_tokens": p.num_tokens,
        "detail": detail_loss(p).scale,
    }


def _format_windows(windows: Sequence[Window], n: int) -> str:
    """The windows ``read_document(windows=...)`` would read, each with its grid, tokens and detail."""
    whole = sum(plan(*w.size, n).num_tokens for w in windows)
    lines = [f"Read in {len(windows)} window(s) at HD-{n} ({whole} image tokens in all):"]
    lines.append(
        f"{'#':>3}  {'region [x0, y0, x1, y1]':<30}  {'pixels':>11}  {'grid':>5}  {'tokens':>6}  {'detail':>6}"
    )
    for i, w in enumerate(windows, 1):
        p = plan(*w.size, n)
        region = "[" + ", ".join(f"{v:.3f}" for v in w.region) + "]"
        lines.append(
            f"{i:>3}  {region:<30}  {_size(w.size):>11}  {p.rows}x{p.cols:<3}  {p.num_tokens:>6}  "
            f"{detail_loss(p).scale:>5.2f}x"
        )
    return "\n".join(lines)


def _size(wh: tuple[int, int]) -> str:
    return f"{wh[0]}×{wh[1]}"


def _format_plan(name: str, p: Any, requested: int | str | None, max_tokens: int) -> str:
    orientation = "portrait" if p.transposed else ("square" if p.width == p.height else "landscape")
    if requested == "auto":
        how = f"auto: largest budget within {max_tokens} image tokens"
    else:
        how = "default" if requested is None else "given"
    left, top, right, bottom = p.padding
    rows = [
        ("image", f"{name}  ({_size((p.width, p.height))} px, {orientation})"),
        ("hd_num", f"{p.hd_num}  ({how}; at most {p.hd_num} tiles of 336×336)"),
        ("grid", f"{p.rows} rows × {p.cols} cols = {p.num_tiles} tiles + 1 global view"),
        ("resized", _size(p.resized_size) + ("  (short side clamped to 1 px)" if p.clamped else "")),
        ("padded", _size(p.padded_size)),
        ("padding", f"left {left}, top {top}, right {right}, bottom {bottom} (white)"),
        ("tokens", f"{p.num_tokens} image tokens"),
        (
            "detail",
            f"{detail_loss(p).scale:.2f} source px per model px" + (" (detail lost)" if detail_loss(p).lost else ""),
        ),
    ]
    return "\n".join(f"{label:<9}{value}" for label, value in rows)


def _format_comparison(plans: Sequence[Any], chosen: int) -> str:
    header = f"{'hd_num':>6}  {'grid':>7}  {'tiles':>5}  {'padded':>11}  {'tokens':>6}"
    lines = ["Token cost at other budgets:", header]
    for p in plans:
        mark = "  ← this plan" if p.hd_num == chosen else ""
        grid = f"{p.rows}×{p.cols}"
        lines.append(f"{p.hd_num:>6}  {grid:>7}  {p.num_tiles:>5}  {_size(p.padded_size):>11}  {p.num_tokens:>6}{mark}")
    return "\n".join(lines)


def register(commands: Any) -> None:
    """Add ``tiles`` to the ``hd4k`` sub-command parsers."""
    tiles = commands.add_parser(
        "tiles",
        help="show how an image is cut into 336-px tiles and what it costs in tokens (no model needed)",
        description=(
            "Plan the HD-N tiling of IMAGE: resized and padded size, tile grid, image tokens, a comparison "
            "with HD 9/16/25/55, and a preview PNG with the grid drawn on the image."
        ),
    )
    tiles.add_argument("image", metavar="IMAGE", help="image file (PNG, JPEG, WebP, TIFF, ...)")
    tiles.add_argument(
        "--hd-num",
        default=None,
        metavar="N|auto",
        help=(
            f"maximum number of tiles, or 'auto' to fit --max-tokens (default {DEFAULT_TILES_HD_NUM}; "
            "auto when only --max-tokens is given)"
        ),
    )
    tiles.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="T",
        help=f"image-token budget for --hd-num auto (default {DEFAULT_AUTO_MAX_TOKENS})",
    )
    tiles.add_argument("--out", metavar="PNG", help="where to write the preview (default: <image stem>.tiles.png here)")
    tiles.add_argument(
        "--windows",
        default=None,
        type=check_windows,
        metavar="auto|N",
        help="show the overlapping windows read_document(windows=...) reads, each with its grid",
    )
    tiles.add_argument("--no-preview", action="store_true", help="do not write the preview PNG")
    tiles.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    tiles.set_defaults(func=_cmd_tiles)
