"""Rendering PDF pages in worker processes, each page under a time and a memory limit.

A PDF page is a program: a few kilobytes of drawing operators can keep pdfium busy for minutes and take
gigabytes. In a corpus of thousands of files one such page must become an error record, not a stalled
run. So every PDF page is rendered in a worker process (a new interpreter running :func:`main`, one
per rendering thread, reused from page to page; a plain subprocess, so a caller's script without a
``__main__`` guard is never imported again) that the caller waits for at most ``timeout_s``; past that, or when the
worker dies (its address space is capped at ``memory_mb`` above its start-up size with
``RLIMIT_AS``), the worker is killed and restarted and the page gets a :class:`RenderLimitError` record.

The worker reads the file itself and checks its bytes against the content hash the plan recorded: a file
changed since planning gets a :class:`SourceChangedError` record (retried by the next run, which hashes
it again), never a record of new pixels under the old hash.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from PIL import Image

from hd4k_tools.errors import HD4KError, IngestError, PDFError
from hd4k_tools.ingestion.corpus import content_hash
from hd4k_tools.ingestion.records import RecordError, display_path
from hd4k_tools.inputs.images import read_source_bytes
from hd4k_tools.inputs.pdf import render_pages
from hd4k_tools.inputs.policy import ImagePolicy

#: Seconds one PDF page may take to render (``--render-timeout``).
DEFAULT_RENDER_TIMEOUT_S = 60.0
#: Memory (MiB) one PDF page may take to render, above the worker's own (``--render-memory``).
DEFAULT_RENDER_MEMORY_MB = 2048
# A fresh worker imports pdfium and PIL before its first page; that is not the page's time.
_START_TIMEOUT_S = 120.0
_WORKER = "from hd4k_tools.ingestion.render import main; main()"


class RenderLimitError(PDFError):
    """A PDF page that took longer than the render time limit, or more memory than the render memory
    limit (a "content bomb"); the page is recorded as failed and the run goes on."""


class SourceChangedError(IngestError):
    """A file whose bytes changed between planning (hashing) and rendering; the next run hashes it again."""


def _serve(conn: Any, memory_bytes: int) -> None:
    """The worker: render ``(path, content_hash, page, dpi, policy)`` jobs until the pipe closes."""
    if memory_bytes > 0 and os.path.exists("/proc/self/statm"):  # Linux: cap the address space
        with open("/proc/self/statm") as f:
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + memory_bytes, resource.RLIM_INFINITY))
    conn.send(("ready",))
    cached: tuple[str, str, Any] | None = None
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        path, expected, page, dpi, policy = job
        try:
            if cached is None or cached[:2] != (path, expected):
                cached = None
                raw = read_source_bytes(Path(path), policy=policy)
                if content_hash(raw.data) != expected:
                    raise SourceChangedError(
                        f"{display_path(path)[0]} changed after it was planned (its content hash differs); "
                        "run again to ingest its current content."
                    )
                cached = (path, expected, raw)
            rendered = render_pages(cached[2], pages=[page], dpi=dpi, policy=policy, max_pages=1, progress=False)
            image = next(iter(rendered)).image
            conn.send(("ok", image.mode, image.size, image.tobytes()))
        except MemoryError:
            cached = None
            conn.send(("error", _limit_error(path, page, f"needed more than {memory_bytes >> 20} MiB").model_dump()))
        except HD4KError as err:
            conn.send(("error", RecordError.from_exception(err).model_dump()))
        except Exception as err:  # pdfium or PIL failing on this page: the page's error, not the run's
            conn.send(("error", RecordError(type="PDFError", message=f"{type(err).__name__}: {err}", final=True)
                       .model_dump()))  # fmt: skip


def _limit_error(path: str, page: int, what: str) -> RecordError:
    return RecordError.from_exception(
        RenderLimitError(
            f"page {page} of {display_path(path)[0]} {what} to render, over the limit (a PDF page full of drawing "
            "operators?); it was stopped. Raise --render-timeout / --render-memory to allow it."
        )
    )


class RenderWorker:
    """One worker process; :meth:`render` gives a page's image or the error that kept it from rendering."""

    def __init__(self, timeout_s: float, memory_mb: int) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._process: subprocess.Popen[bytes] | None = None
        self._send: Any = None
        self._conn: Any = None

    def _start(self) -> None:
        # A new interpreter, not a fork of a process holding a model and threads.
        self._process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(self.memory_mb << 20)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._send = Connection(os.dup(self._process.stdin.fileno()), readable=False)
        self._conn = Connection(os.dup(self._process.stdout.fileno()), writable=False)
        try:
            if not self._conn.poll(_START_TIMEOUT_S):
                raise EOFError
            self._conn.recv()
        except (EOFError, OSError):
            self.close()
            raise IngestError(
                "the PDF rendering worker (hd4k_tools.ingestion.render.main) did not start within 120 s; is the "
                "machine overloaded or out of memory?"
            ) from None

    def render(self, path: str, content_hash: str, page: int, dpi: int, policy: ImagePolicy) -> Image.Image:
        """Page ``page`` (1-based) of the PDF at ``path``.

        Raises:
            PageFailed: the page could not be rendered (carries its :class:`RecordError`).
        """
        if self._process is None or self._process.poll() is not None:
            self.close()
            self._start()
        try:
            self._send.send((path, content_hash, page, dpi, policy))
        except OSError:  # the worker died between two pages: the next call starts another
            self.close()
            raise PageFailed(_limit_error(path, page, "crashed the renderer")) from None
        if not self._conn.poll(self.timeout_s):
            self.close()
            raise PageFailed(_limit_error(path, page, f"took longer than {self.timeout_s:g} s"))
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            code = self._process.poll() if self._process is not None else None
            self.close()
            raise PageFailed(
                _limit_error(path, page, f"crashed the renderer (exit code {code}; more than {self.memory_mb} MiB?)")
            ) from None
        if message[0] == "error":
            raise PageFailed(RecordError(**message[1]))
        _, mode, size, data = message
        return Image.frombytes(mode, size, data)

    def close(self) -> None:
        """Stop the worker process (a new one starts on the next :meth:`render`)."""
        for conn in (self._send, self._conn):
            if conn is not None:
                conn.close()
        self._send = self._conn = None
        process, self._process = self._process, None
        if process is None:
            return
        for stream in (process.stdin, process.stdout):  # EOF on stdin: the worker returns
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        try:
            process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # still rendering a page past its limit
            process.kill()
            process.wait()


class PageFailed(Exception):
    """A page that could not be rendered; ``error`` is its record's error."""

    def __init__(self, error: RecordError) -> None:
        super().__init__(error.message)
        self.error = error


class RenderPool:
    """Up to ``size`` workers shared by the rendering threads (one thread uses one worker at a time)."""

    def __init__(self, size: int, timeout_s: float, memory_mb: int) -> None:
        self._idle: queue.SimpleQueue[RenderWorker] = queue.SimpleQueue()
        for _ in range(size):
            self._idle.put(RenderWorker(timeout_s, memory_mb))

    @contextlib.contextmanager
    def worker(self) -> Iterator[RenderWorker]:
        worker = self._idle.get()
        try:
            yield worker
        finally:
            self._idle.put(worker)

    def close(self) -> None:
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return

    def __enter__(self) -> RenderPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    """The worker process (``MEMORY_BYTES`` in ``sys.argv[1]``), speaking over its stdin and stdout."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    out_fd = os.dup(1)
    os.dup2(2, 1)  # anything printed goes to stderr, never into the pipe
    reader = Connection(os.dup(0), writable=False)
    writer = Connection(out_fd, readable=False)
    _serve(_Duplex(reader, writer), int(sys.argv[1]) if len(sys.argv) > 1 else 0)


class _Duplex:
    def __init__(self, reader: Connection, writer: Connection) -> None:
        self.recv = reader.recv
        self.send = writer.send
