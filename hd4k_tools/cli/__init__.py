"""The ``hd4k`` command line (entry point ``hd4k_tools.cli:main``)."""

from hd4k_tools.cli.main import main

__all__ = ["main"]
