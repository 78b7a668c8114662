"""What every ``hd4k`` sub-command shares: the program name, exit codes, one-line errors, ``--hd-num``."""

from __future__ import annotations

import argparse
from typing import NoReturn

from hd4k_tools.arguments import parse_hd_num
from hd4k_tools.errors import HD4KError

PROG = "hd4k"
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

__all__ = ["EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "PROG", "CommandError", "OneLineErrorParser", "parse_hd_num"]


class CommandError(HD4KError):
    """A failure of the command itself (e.g. the preview file cannot be written)."""


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (like every other ``hd4k`` error), pointing at ``--help``.

    Sub-command parsers are made of the same class (argparse uses the parent's class by default).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")
