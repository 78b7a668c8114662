"""Local mode: the ingest pipeline in one process, no Ray.

Pages are rendered ahead of the model by ``workers`` threads (a bounded queue: at most ``workers + 1``
batches wait; PDF pages in worker processes with time and memory limits), transcribed by one engine (in
batches when its runner has ``generate_batch``, e.g. vLLM; page by page otherwise), and each engine call's
records are appended to disk at once (:class:`~hd4k_tools.ingestion.shards.ShardWriter`). On Ctrl-C,
SIGTERM or ``cancel`` the open part is closed before the error goes on.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hd4k_tools.errors import IngestError
from hd4k_tools.ingestion.progress import IngestProgress
from hd4k_tools.ingestion.records import PageRecord
from hd4k_tools.ingestion.render import RenderPool
from hd4k_tools.ingestion.shards import ShardWriter
from hd4k_tools.ingestion.work import PageSettings, PageTask, RenderedPage, Transcriber, WorkPlan, render_tasks
from hd4k_tools.progress import check_cancelled
from hd4k_tools.runtime.runner import BatchRunner

#: Pages in a row that fail the same retryable way (engine, connection) before a run stops.
DEFAULT_MAX_CONSECUTIVE_FAILURES = 8


class SystemicFailureError(IngestError):
    """Pages keep failing the same way (the engine or server is down, a setting fails every page): the
    run stops early instead of recording every page of the corpus as failed."""


class FailureWatch:
    """Stops a run when ``limit`` pages in a row fail with the same retryable error type (an engine or
    connection error, not a bad input file, which is final and says nothing about the next page)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.streak = 0
        self.kind = ""

    def see(self, records: Sequence[PageRecord]) -> None:
        for record in records:
            error = record.error
            if error is None:
                self.streak, self.kind = 0, ""
                continue
            if error.final:
                continue
            self.streak = self.streak + 1 if error.type == self.kind else 1
            self.kind = error.type
            if self.limit and self.streak >= self.limit:
                raise SystemicFailureError(
                    f"{self.streak} pages in a row failed with {error.type}: {error.message[:300]}; stopped early "
                    "(the pages done so far are kept). Fix the cause and run the same command again to resume."
                )


def _chunks(tasks: Sequence[PageTask], size: int) -> Iterator[Sequence[PageTask]]:
    for start in range(0, len(tasks), size):
        yield tasks[start : start + size]


def _rendered_ahead(
    tasks: Sequence[PageTask], settings: PageSettings, batch_size: int, workers: int, pool: RenderPool
) -> Iterator[list[RenderedPage]]:
    """Rendered batches in order, ``workers`` threads rendering up to ``workers + 1`` batches ahead."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hd4k-render") as executor:
        queued: deque[Future[list[RenderedPage]]] = deque()
        chunks = _chunks(tasks, batch_size)
        try:
            for chunk in chunks:
                queued.append(executor.submit(render_tasks, chunk, settings, pool))
                if len(queued) > workers:
                    yield queued.popleft().result()
            while queued:
                yield queued.popleft().result()
        finally:
            for future in queued:
                future.cancel()


def run_local(
    plan: WorkPlan,
    hd: Any,
    settings: PageSettings,
    model: str,
    writer: ShardWriter,
    *,
    batch_size: int,
    workers: int,
    progress: IngestProgress,
    cancel: threading.Event | None = None,
    model_id: str = "",
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES,
) -> None:
    """Transcribe ``plan`` with ``hd`` into ``writer`` (it keeps the counts and part names).

    Raises whatever stopped the run (``KeyboardInterrupt``, ``CancelledError``,
    :class:`SystemicFailureError`) after closing the open part.
    """
    watch = FailureWatch(max_consecutive_failures)
    try:
        writer.add(plan.failed_files)
        progress.update(len(plan.failed_files))
        if not plan.tasks:
            return
        transcribe = Transcriber(hd, settings, model, model_id)
        # Without a batching runner, pages go one at a time: an interruption loses at most one page.
        step = batch_size if isinstance(hd.runner, BatchRunner) else 1
        with RenderPool(workers, settings.render_timeout_s, settings.render_memory_mb) as pool:
            for rendered in _rendered_ahead(plan.tasks, settings, batch_size, workers, pool):
                for start in range(0, len(rendered), step):
                    check_cancelled(cancel, "hd4k ingest")
                    records = transcribe(rendered[start : start + step], cancel=cancel)
                    writer.add(records)
                    progress.update(len(records))
                    watch.see(records)
    finally:
        writer.close()
