"""Progress bars and cancellation for long work (PDF pages, checkpoint shards, batches of tiles).

Progress goes to stderr through tqdm (its notebook widget inside Jupyter, via ``tqdm.auto``). It is on
when stderr is a terminal or a notebook runs us, off otherwise and whenever ``HD4K_NO_PROGRESS=1``.
Asked for explicitly (``progress=True``) while stderr is not a terminal (a log file, a pipe, CI), it is
written as plain lines (``Loading shards: 1/2 shard (0.4 s)``) instead of a bar full of carriage returns.
Cancellation is a ``threading.Event`` passed down explicitly; work checks it between steps.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from hd4k_tools.errors import CancelledError

T = TypeVar("T")


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and shell.__class__.__name__ == "ZMQInteractiveShell"


def progress_enabled(progress: bool | None) -> bool:
    """Resolve a ``progress`` argument: ``None`` means "when a person is watching"."""
    if progress is not None:
        return progress
    if os.environ.get("HD4K_NO_PROGRESS", "") not in ("", "0"):
        return False
    return _in_notebook() or sys.stderr.isatty()


def track(
    items: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    progress: bool | None = None,
    cancel: threading.Event | None = None,
) -> Iterator[T]:
    """Yield ``items`` with an optional progress bar, raising :class:`CancelledError` between items
    as soon as ``cancel`` is set."""
    bar = None
    lines = False
    if progress_enabled(progress):
        if _in_notebook() or sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)
        else:
            lines = True
    start = time.perf_counter()
    done = 0
    try:
        for item in items:
            check_cancelled(cancel, desc or "work")
            yield item
            done += 1
            if bar is not None:
                bar.update(1)
            elif lines:
                print(progress_line(desc, done, total, unit, time.perf_counter() - start), file=sys.stderr, flush=True)
    finally:
        if bar is not None:
            bar.close()


def progress_line(desc: str, done: int, total: int | None, unit: str, elapsed_s: float) -> str:
    """One plain progress line: ``"Reading pages: 2/5 page (3.1 s)"``."""
    count = f"{done}/{total}" if total is not None else str(done)
    return f"{desc or 'Progress'}: {count} {unit} ({elapsed_s:.1f} s)"


def check_cancelled(cancel: threading.Event | None, what: str = "work") -> None:
    """Raise :class:`CancelledError` if ``cancel`` is set."""
    if cancel is not None and cancel.is_set():
        raise CancelledError(f"{what} was cancelled (the cancel event was set); start a new call to retry.")
