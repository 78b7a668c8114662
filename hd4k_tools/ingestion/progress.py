"""Progress of an ingest run: a tqdm bar on a terminal (or notebook), plain lines otherwise.

A plain line is at most one every ``interval`` seconds, plus one at the end::

    hd4k ingest: 120/500 pages (24%), 31.5 pages/min, ETA 12m03s

``HD4K_NO_PROGRESS=1`` or ``progress=False`` turns both off.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, TextIO

from hd4k_tools.progress import progress_enabled


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class IngestProgress:
    """Counts pages done out of ``total`` and reports rate and ETA."""

    def __init__(
        self,
        total: int,
        *,
        progress: bool | None = None,
        interval: float = 10.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total = total
        self.done = 0
        self.interval = interval
        self.stream = stream or sys.stderr
        self._start = time.monotonic()
        self._last_line = self._start
        self._bar: Any = None
        silenced = progress is False or os.environ.get("HD4K_NO_PROGRESS", "") not in ("", "0")
        self._lines = not silenced and not progress_enabled(progress)
        if not silenced and progress_enabled(progress):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc="hd4k ingest", unit="page", file=self.stream, dynamic_ncols=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        rate = 60.0 * self.done / elapsed
        share = 100.0 * self.done / self.total if self.total else 100.0
        left = self.total - self.done
        eta = _duration(left * elapsed / self.done) if self.done else "?"
        return f"hd4k ingest: {self.done}/{self.total} pages ({share:.0f}%), {rate:.1f} pages/min, ETA {eta}"

    def update(self, pages: int) -> None:
        self.done += pages
        if self._bar is not None:
            self._bar.update(pages)
        elif self._lines and time.monotonic() - self._last_line >= self.interval:
            self._last_line = time.monotonic()
            print(self.line(), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._lines:
            print(self.line(), file=self.stream, flush=True)
