"""What every ``hd4k`` sub-command shares: the program name, exit codes, one-line errors, ``--hd-num``."""

from __future__ import annotations

import argparse
from typing import NoReturn

from hd4k_tools.errors import HD4KError, InvalidHDNumError

PROG = "hd4k"
EXIT_OK = 0
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class CommandError(HD4KError):
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


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse with usage errors as one line (like every other ``hd4k`` error), pointing at ``--help``.

    Sub-command parsers are made of the same class (argparse uses the parent's class by default).
    """

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see '{self.prog} --help')\n")
