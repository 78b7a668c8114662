"""Command-line argument helpers shared by every sub-command (``hd4k read/chart/describe/serve/mcp/ingest``):
the ``--model`` option and the ``--hd-num`` parser. A neutral module: ``cli/``, ``serve/``, ``mcp/`` and
``ingestion/`` all import it, and it imports none of them (argparse and the model registry only)."""

from __future__ import annotations

import argparse
import os

from hd4k_tools.errors import InvalidHDNumError
from hd4k_tools.models.registry import DEFAULT_FAMILY

__all__ = ["DEFAULT_MODEL_ID", "MODEL_ENV", "add_model_argument", "default_model", "parse_hd_num"]

#: The official checkpoint (the default family's row).
DEFAULT_MODEL_ID = DEFAULT_FAMILY.default_checkpoint
#: The environment variable that overrides the default model of every command.
MODEL_ENV = "HD4K_MODEL"


def default_model() -> str:
    """``$HD4K_MODEL`` or the official checkpoint id."""
    return os.environ.get(MODEL_ENV) or DEFAULT_MODEL_ID


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """``--model DIR|HUB_ID`` as every command that loads the model takes it (``hd4k read/chart/describe/serve/mcp``):
    ``$HD4K_MODEL`` or the official checkpoint by default."""
    parser.add_argument(
        "--model",
        default=default_model(),
        metavar="DIR|HUB_ID",
        help=f"checkpoint folder or hub id (default: ${MODEL_ENV} or {DEFAULT_MODEL_ID})",
    )


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
