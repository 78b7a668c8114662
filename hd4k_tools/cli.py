"""The ``hd4k`` command line.

One sub-command per task, each a ``_cmd_<name>(args) -> int`` registered in :func:`build_parser`.
Errors the library raises on purpose (:class:`~hd4k_tools.errors.HD4KError`) are printed as one line,
``hd4k: error: <message>``, with exit code 2; so are argparse usage errors (argparse's own format).
Ctrl-C exits with 130 and no traceback.

    hd4k tiles examples/page.png                 # plan, token table, preview PNG
    hd4k tiles scan.jpg --hd-num auto --max-tokens 4096 --json

The model commands (``read``, ``chart``, ``describe``, ``serve``, ``make-tiny-checkpoint``) live in
:mod:`hd4k_tools.cli_model`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hd4k_tools import __version__
from hd4k_tools.errors import HD4KError, InvalidHDNumError

PROG = "hd4k"
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
DEFAULT_TILES_HD_NUM = 55
DEFAULT_AUTO_MAX_TOKENS = 8192


class _CommandError(HD4KError):
    """A failure of the command itself (e.g. the preview file cannot be written)."""


def parse_hd_num(text: str) -> int | str:
    """Parse a ``--hd-num`` value: a positive integer or ``auto``.

    Validation happens here rather than in argparse so that a bad value gives the same one-line
    error as every other input problem.

    Raises:
        InvalidHDNumError: anything else.
    """
    value = text.strip()
    if value.lower() == "auto":
        return "auto"
    try:
        number = int(value, 10)
    except ValueError:
        raise InvalidHDNumError(
            f"--hd-num must be a positive integer or 'auto', got {text!r} (e.g. --hd-num 25)."
        ) from None
    if number < 1:
        raise InvalidHDNumError(f"--hd-num must be at least 1, got {number} (e.g. --hd-num 25).")
    return number


# ----------------------------------------------------------------------------------------------------
# hd4k tiles
# ----------------------------------------------------------------------------------------------------
def _cmd_tiles(args: argparse.Namespace) -> int:
    from hd4k_tools.imaging import load_image
    from hd4k_tools.tiling import HD_COMPARISON, draw_plan, plan, resolve_hd_num

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
            raise _CommandError(f"cannot write the preview to {out}: {reason}") from err

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


# ----------------------------------------------------------------------------------------------------
# Parser and entry point
# ----------------------------------------------------------------------------------------------------
class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (like every other ``hd4k`` error), pointing at ``--help``.

    Sub-command parsers are made of the same class (argparse uses the parent's class by default).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``hd4k`` parser; each sub-command sets ``func`` to its ``_cmd_<name>``."""
    parser = _OneLineErrorParser(
        prog=PROG,
        description="Let agents see high-resolution documents, charts and images (InternLM-XComposer2-4KHD).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

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

    from hd4k_tools import cli_model

    cli_model.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hd4k`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args))
    except SystemExit as exc:  # argparse: --help/--version (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `hd4k tiles x.png | head -1`: the reader left, nothing to report
        return EXIT_OK
    except HD4KError as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
