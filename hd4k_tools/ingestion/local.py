"""Local mode: the ingest pipeline in one process, no Ray.

Pages are rendered ahead of the model by ``workers`` threads (a bounded queue: at most
``workers + 1`` batches wait), transcribed by one engine (in batches when its runner has
``generate_batch``, e.g. vLLM; page by page otherwise), and written as shards of ``shard_size``
records. On Ctrl-C or ``cancel`` the records already finished are written before the error goes on.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from hd4k_tools.ingestion.progress import IngestProgress
from hd4k_tools.ingestion.records import PageRecord
from hd4k_tools.ingestion.shards import write_shard
from hd4k_tools.ingestion.work import PageSettings, PageTask, RenderedPage, Transcriber, WorkPlan, render_tasks
from hd4k_tools.progress import check_cancelled
from hd4k_tools.runtime.runner import BatchRunner


class ShardBuffer:
    """Collects finished records and writes a shard every ``shard_size`` of them (and on :meth:`flush`)."""

    def __init__(self, out: str, shard_size: int) -> None:
        self.out = out
        self.shard_size = shard_size
        self.pending: list[PageRecord] = []
        self.written: list[str] = []
        self.ok = 0
        self.failed = 0

    def add(self, records: Sequence[PageRecord]) -> None:
        self.pending.extend(records)
        while len(self.pending) >= self.shard_size:
            self._write(self.pending[: self.shard_size])
            self.pending = self.pending[self.shard_size :]

    def flush(self) -> None:
        if self.pending:
            self._write(self.pending)
            self.pending = []

    def _write(self, records: list[PageRecord]) -> None:
        self.written.append(write_shard(self.out, records))
        self.failed += sum(1 for r in records if r.error is not None)
        self.ok += sum(1 for r in records if r.error is None)


def _chunks(tasks: Sequence[PageTask], size: int) -> Iterator[Sequence[PageTask]]:
    for start in range(0, len(tasks), size):
        yield tasks[start : start + size]


def _rendered_ahead(
    tasks: Sequence[PageTask], settings: PageSettings, batch_size: int, workers: int
) -> Iterator[list[RenderedPage]]:
    """Rendered batches in order, ``workers`` threads rendering up to ``workers + 1`` batches ahead."""
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="hd4k-render") as pool:
        queued: deque[Future[list[RenderedPage]]] = deque()
        chunks = _chunks(tasks, batch_size)
        try:
            for chunk in chunks:
                queued.append(pool.submit(render_tasks, chunk, settings))
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
    buffer: ShardBuffer,
    *,
    batch_size: int,
    workers: int,
    progress: IngestProgress,
    cancel: threading.Event | None = None,
) -> None:
    """Transcribe ``plan`` with ``hd`` into ``buffer``'s shards (it keeps the counts and shard names).

    Raises whatever stopped the run (``KeyboardInterrupt``, ``CancelledError``) after writing every
    finished record.
    """
    try:
        buffer.add(plan.failed_files)
        progress.update(len(plan.failed_files))
        if not plan.tasks:
            return
        transcribe = Transcriber(hd, settings, model)
        # Without a batching runner, pages go one at a time: an interruption loses at most one page.
        step = batch_size if isinstance(hd.runner, BatchRunner) else 1
        for rendered in _rendered_ahead(plan.tasks, settings, batch_size, workers):
            for start in range(0, len(rendered), step):
                check_cancelled(cancel, "hd4k ingest")
                records = transcribe(rendered[start : start + step], cancel=cancel)
                buffer.add(records)
                progress.update(len(records))
    finally:
        buffer.flush()
