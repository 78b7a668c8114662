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
from hd4k_tools.tiling import HD_COMPARISON, draw_plan, plan, resolve_hd_num

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

    out: Path | None = None
    if not args.no_preview:
        out = Path(args.out) if args.out else Path.cwd() / f"{Path(args.image).stem}.tiles.png"
        preview = draw_plan(image, n)
        try:
            preview.save(out, format="PNG")
        except (OSError, ValueError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise CommandError(f"cannot write the preview to {out}: {reason}") from err

    if args.json:
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
        }
        print(json.dumps(payload, ensure_ascii=False))
        return EXIT_OK

    print(_format_plan(str(args.image), chosen, hd_num, max_tokens))
    print()
    print(_format_comparison(comparison, n))
    if out is not None:
        print()
        print(f"Preview written to {out}")
    return EXIT_OK


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
    tiles.add_argument("--no-preview", action="store_true", help="do not write the preview PNG")
    tiles.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    tiles.set_defaults(func=_cmd_tiles)
