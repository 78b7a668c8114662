"""The ``hd4k`` command line: the parser of every sub-command and the entry point.

One module per group of sub-commands registers its parsers (``register(commands)``) and sets ``func``:
:mod:`~hd4k_tools.cli.tiles` (``tiles``), :mod:`~hd4k_tools.cli.model_commands` (``read``, ``chart``,
``describe``, ``serve``, ``make-tiny-checkpoint``) and :mod:`~hd4k_tools.mcp.cli` (``mcp``). Errors the
library raises on purpose (:class:`~hd4k_tools.errors.HD4KError`) are printed as one line,
``hd4k: error: <message>`` with the error's command-line hint (:meth:`HD4KError.render`), exit code 2;
so are argparse usage errors. Ctrl-C exits with 130 and no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from hd4k_tools import __version__
from hd4k_tools.arguments import default_model
from hd4k_tools.cli import model_commands, tiles
from hd4k_tools.cli.args import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, PROG, OneLineErrorParser
from hd4k_tools.errors import CLI, HD4KError
from hd4k_tools.ingestion import cli as ingest_command
from hd4k_tools.mcp import cli as mcp_cli
from hd4k_tools.tasks import TaskRegistry


def build_parser(tasks: TaskRegistry | None = None) -> argparse.ArgumentParser:
    """The ``hd4k`` parser; each sub-command sets ``func``. ``tasks``: the tasks that get a sub-command
    (default :data:`hd4k_tools.tasks.TASKS`)."""
    parser = OneLineErrorParser(
        prog=PROG,
        description="Let agents see high-resolution documents, charts and images (InternLM-XComposer2-4KHD).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    tiles.register(commands)
    model_commands.register(commands, tasks)
    mcp_cli.register(commands)
    ingest_command.register(commands, default_model=default_model())
    return parser


def main(argv: Sequence[str] | None = None, *, tasks: TaskRegistry | None = None) -> int:
    """Run ``hd4k`` with ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    parser = build_parser(tasks)
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
        # The command-line hint (``--model DIR``, ``hd4k read``), not the Python one.
        message = " ".join(err.render(CLI).split()) or type(err).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
