"""The steps both pipelines share: which engine to open, which pages to do, rendering a page (CPU),
transcribing a batch of pages (the engine), and turning either outcome into a :class:`PageRecord`.

Local mode calls these in one process; Ray mode runs :func:`render_rows` as CPU tasks and
:class:`Transcriber` in an actor pool. Rows that travel between Ray stages are plain dicts of JSON
strings and bytes, so no stage depends on Arrow's type inference.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from hd4k_tools.errors import CancelledError, HD4KError, InputError
from hd4k_tools.hd4k import HD4K
from hd4k_tools.ingestion.corpus import FileInfo, content_hash
from hd4k_tools.ingestion.records import (
    ENGINES,
    Engine,
    PageRecord,
    RecordError,
    RecordTimings,
    RecordTokens,
    display_path,
    ingest_prompt,
    record_key,
)
from hd4k_tools.ingestion.render import (
    DEFAULT_RENDER_MEMORY_MB,
    DEFAULT_RENDER_TIMEOUT_S,
    PageFailed,
    RenderPool,
    SourceChangedError,
)
from hd4k_tools.inputs.images import load_image, read_source_bytes
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.runtime.runner import BatchRunner, RunnerResult


@dataclass(frozen=True)
class EngineSpec:
    """How to open the model; picklable, so each Ray actor opens its own.

    ``model`` is the checkpoint folder or hub id (native, vllm) or the model name on the server
    (remote); it is the ``model`` of every record, and :meth:`identity` its canonical form in the key.
    """

    engine: Engine = "native"
    model: str = ""
    remote_url: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    # Other options of the engine (e.g. vLLM's enforce_eager, max_model_len), as (name, value) pairs.
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise InputError(f"engine={self.engine!r} is not supported; use one of {', '.join(ENGINES)}.")
        if not self.model:
            raise InputError("no model given; pass model= (a checkpoint folder, hub id or remote model name).")
        if self.engine == "remote" and not self.remote_url:
            raise InputError("engine='remote' needs the server's base URL (--remote URL).")
        if self.engine != "remote" and self.remote_url:
            raise InputError(f"a remote URL was given with engine={self.engine!r}; use engine='remote'.")

    def identity(self) -> str:
        """The model's canonical identity (see :func:`model_identity`)."""
        return model_identity(self.model, remote=self.engine == "remote")

    def open(self, *, progress: bool | None = False) -> Any:
        """The :class:`hd4k_tools.HD4K` this spec describes."""
        if self.engine == "remote":
            return HD4K.remote(self.remote_url or "", self.model, api_key=os.environ.get("HD4K_API_KEY"))
        # The engine registry (hd4k_tools.runtime.engines) loads the runner or names the extra to install.
        if self.engine == "native":
            options: dict[str, Any] = {"device": self.device, "dtype": self.dtype, "progress": progress}
        else:  # other engines pick their own defaults; a device or dtype they do not take is refused
            options = {k: v for k, v in (("device", self.device), ("dtype", self.dtype)) if v != "auto"}
        return HD4K.from_pretrained(self.model, engine=self.engine, **options, **dict(self.options))


def model_identity(model: str, *, remote: bool = False) -> str:
    """The canonical identity of a model, as the resume key uses it.

    A checkpoint folder is its real path (symlinks resolved, relative paths made absolute) plus the
    SHA-256 of its ``config.json``, so ``tiny``, ``./tiny`` and ``/abs/tiny`` are one model and a folder
    whose checkpoint was replaced by another architecture is not. A hub id is itself; a model on a
    remote server is ``remote:<name>``.
    """
    if remote:
        return f"remote:{model}"
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    config = path / "config.json"
    digest = hashlib.sha256(config.read_bytes()).hexdigest()[:16] if config.is_file() else "no-config"
    return f"{path.resolve()}#config-sha256:{digest}"


@dataclass(frozen=True)
class PageSettings:
    """What every page is read with. ``hd_num`` (as requested) and the prompt are in the resume key;
    ``dpi`` and ``generation`` must match the output folder's earlier runs (checked on resume)."""

    hd_num: int | str | None = None
    dpi: int = 200
    output: str = "markdown"
    generation: Mapping[str, Any] | None = None
    policy: ImagePolicy = field(default_factory=ImagePolicy)
    render_timeout_s: float = DEFAULT_RENDER_TIMEOUT_S
    render_memory_mb: int = DEFAULT_RENDER_MEMORY_MB

    @property
    def prompt(self) -> str:
        return ingest_prompt(self.output)

    def fingerprint(self) -> dict[str, Any]:
        """The settings outside the key that change a transcription (stored in the manifest)."""
        return {"dpi": self.dpi, "output": self.output, "generation": dict(self.generation or {})}


@dataclass(frozen=True)
class PageTask:
    """One page to transcribe (``page`` 1-based; 1 for an image)."""

    key: str
    source: str
    content_hash: str
    kind: str
    page: int
    page_count: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> PageTask:
        return cls(**json.loads(text))


@dataclass
class WorkPlan:
    """What a run does: pages to transcribe, records already known (files that failed), duplicates."""

    tasks: list[PageTask]
    failed_files: list[PageRecord]
    duplicates: dict[str, list[str]]
    skipped: int
    total: int
    skipped_failed: int = 0  # of the skipped pages, those an earlier run recorded as failed for good


def plan_work(
    files: Sequence[FileInfo], settings: PageSettings, model: str, done: Mapping[str, bool], model_id: str = ""
) -> WorkPlan:
    """Deduplicate ``files`` by content (the first path given wins; the others are listed as duplicates),
    and list every selected page whose key is not in ``done`` (key -> whether that record is an error)."""
    model_id = model_id or model
    seen: dict[str, FileInfo] = {}
    sources_by_hash: dict[str, list[str]] = {}
    for info in files:
        sources_by_hash.setdefault(info.content_hash, []).append(info.source)
        seen.setdefault(info.content_hash, info)
    duplicates = {h: [display_path(p)[0] for p in paths] for h, paths in sources_by_hash.items() if len(paths) > 1}
    tasks: list[PageTask] = []
    failed: list[PageRecord] = []
    skipped = skipped_failed = total = 0
    for info in seen.values():
        # A file that could not be read is one record (page None), whatever pages were asked for.
        for page in (None,) if info.error is not None else info.pages:
            total += 1
            key = record_key(info.content_hash, page, settings.hd_num, model_id, settings.prompt)
            if key in done:
                skipped += 1
                skipped_failed += done[key]
            elif info.error is not None:
                source, source_bytes = display_path(info.source)
                failed.append(
                    PageRecord(
                        key=key,
                        source=source,
                        source_bytes=source_bytes,
                        content_hash=info.content_hash,
                        page=None,
                        page_count=None,
                        model=model,
                        model_id=model_id,
                        error=RecordError(**info.error),
                    )
                )
            else:
                tasks.append(PageTask(key, info.source, info.content_hash, info.kind, page, info.page_count or 1))
    return WorkPlan(tasks, failed, duplicates, skipped, total, skipped_failed)


# ----------------------------------------------------------------------------------------------------
# Rendering (CPU)
# ----------------------------------------------------------------------------------------------------
@dataclass
class RenderedPage:
    """A page ready for the model, or the error that kept it from being rendered."""

    task: PageTask
    image: Image.Image | None
    render_s: float
    error: RecordError | None = None


def render_tasks(tasks: Iterable[PageTask], settings: PageSettings, pool: RenderPool) -> list[RenderedPage]:
    """Render ``tasks``: PDF pages in ``pool``'s worker processes (time and memory limits), images here;
    both from bytes whose hash matches the plan's. A page that fails carries its typed error."""
    out: list[RenderedPage] = []
    with pool.worker() as worker:
        for task in tasks:
            start = time.perf_counter()
            try:
                if task.kind == "pdf":
                    image = worker.render(task.source, task.content_hash, task.page, settings.dpi, settings.policy)
                else:
                    raw = read_source_bytes(Path(task.source), policy=settings.policy)
                    if content_hash(raw.data) != task.content_hash:
                        raise SourceChangedError(
                            f"{display_path(task.source)[0]} changed after it was planned (its content hash "
                            "differs); run again to ingest its current content."
                        )
                    image = load_image(raw, policy=settings.policy)
                out.append(RenderedPage(task, image, time.perf_counter() - start))
            except PageFailed as failed:
                out.append(RenderedPage(task, None, time.perf_counter() - start, failed.error))
            except HD4KError as err:
                out.append(RenderedPage(task, None, time.perf_counter() - start, RecordError.from_exception(err)))
    return out


def rendered_to_row(page: RenderedPage) -> dict[str, Any]:
    """A Ray row: the task and error as JSON, the pixels as raw RGB bytes (H x W x 3, uint8)."""
    image = page.image
    return {
        "task": page.task.to_json(),
        "render_s": page.render_s,
        "error": "" if page.error is None else page.error.model_dump_json(),
        "pixels": b"" if image is None else image.tobytes(),
        "width": 0 if image is None else image.width,
        "height": 0 if image is None else image.height,
    }


def row_to_rendered(row: Mapping[str, Any]) -> RenderedPage:
    task = PageTask.from_json(str(row["task"]))
    error = RecordError.model_validate_json(row["error"]) if row["error"] else None
    image = None
    if error is None:
        size = (int(row["width"]), int(row["height"]))
        image = Image.frombytes("RGB", size, bytes(row["pixels"]))
    return RenderedPage(task, image, float(row["render_s"]), error)


def render_rows(batch: Mapping[str, Any], settings: PageSettings) -> dict[str, list[Any]]:
    """Ray ``map_batches`` step: a batch of ``{"task": [json...]}`` to rendered rows."""
    tasks = [PageTask.from_json(str(t)) for t in batch["task"]]
    with RenderPool(1, settings.render_timeout_s, settings.render_memory_mb) as pool:
        rows = [rendered_to_row(p) for p in render_tasks(tasks, settings, pool)]
    return {name: [row[name] for row in rows] for name in ("task", "render_s", "error", "pixels", "width", "height")}


# ----------------------------------------------------------------------------------------------------
# Transcription (the engine)
# ----------------------------------------------------------------------------------------------------
class Transcriber:
    """Holds one engine (:class:`hd4k_tools.HD4K`) and turns rendered pages into records.

    Pages go to the runner's ``generate_batch`` when it is a ``BatchRunner`` (engines that batch, e.g.
    vLLM), otherwise one by one. A page whose call fails with a typed error becomes an error record.
    """

    def __init__(self, hd: Any, settings: PageSettings, model: str, model_id: str = "") -> None:
        self.hd = hd
        self.settings = settings
        self.model = model
        self.model_id = model_id or model

    def __call__(self, pages: Sequence[RenderedPage], cancel: threading.Event | None = None) -> list[PageRecord]:
        records: dict[int, PageRecord] = {}
        ready: list[tuple[int, RenderedPage, Any]] = []
        for i, page in enumerate(pages):
            if page.error is not None or page.image is None:
                records[i] = self._record(page, error=page.error)
                continue
            try:
                request = self.hd.document_request(
                    page.image,
                    hd_num=self.settings.hd_num,
                    output=self.settings.output,
                    generation=self.settings.generation,
                )
            except HD4KError as err:
                records[i] = self._record(page, error=RecordError.from_exception(err))
                continue
            ready.append((i, page, request))
        for (i, page, _), outcome in zip(ready, self._generate([r for _, _, r in ready], cancel), strict=True):
            if isinstance(outcome, RunnerResult):
                records[i] = self._record(page, result=outcome)
            else:
                records[i] = self._record(page, error=RecordError.from_exception(outcome))
        return [records[i] for i in range(len(pages))]

    def _generate(self, requests: list[Any], cancel: threading.Event | None) -> list[RunnerResult | HD4KError]:
        if not requests:
            return []
        runner = self.hd.runner
        if isinstance(runner, BatchRunner):
            try:
                return list(runner.generate_batch(requests, cancel=cancel))
            except CancelledError:
                raise
            except HD4KError:
                pass  # find out which page failed: one by one below
        outcomes: list[RunnerResult | HD4KError] = []
        for request in requests:
            try:
                outcomes.append(runner.generate(request, cancel=cancel))
            except CancelledError:
                raise
            except HD4KError as err:
                outcomes.append(err)
        return outcomes

    def _record(
        self, page: RenderedPage, *, result: RunnerResult | None = None, error: RecordError | None = None
    ) -> PageRecord:
        task = page.task
        timings = RecordTimings(render_s=page.render_s)
        extra: dict[str, Any] = {}
        if result is not None:
            plan = result.plans[0] if result.plans else None
            t, usage = result.timings, result.usage
            timings = RecordTimings(
                render_s=page.render_s,
                vision_s=t.vision_s,
                prefill_s=t.prefill_s,
                decode_s=t.decode_s,
                model_s=t.total_s,
            )
            extra = {
                "hd_num": plan.hd_num if plan else None,
                "grid": plan.grid if plan else None,
                "tokens": RecordTokens(
                    image=usage.image_tokens, prompt=usage.prompt_tokens, completion=usage.completion_tokens
                ),
                "text": result.text,
                "finish_reason": result.finish_reason,
            }
        source, source_bytes = display_path(task.source)
        return PageRecord(
            key=task.key,
            source=source,
            source_bytes=source_bytes,
            content_hash=task.content_hash,
            page=task.page,
            page_count=task.page_count,
            model=self.model,
            model_id=self.model_id,
            timings=timings,
            error=error,
            **extra,
        )


class RayTranscriber:
    """Ray Data actor: opens one engine per actor and transcribes batches of rendered rows.

    Returns ``{"record": [json...]}``: one record per page, as the shard writer stores it.
    """

    def __init__(self, spec: EngineSpec, settings: PageSettings, torch_threads: int = 0) -> None:
        if torch_threads > 0:  # actors sharing a CPU-only node split its cores instead of fighting over them
            import torch

            torch.set_num_threads(torch_threads)
        self.transcribe = Transcriber(spec.open(progress=False), settings, spec.model, spec.identity())

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list[str]]:
        columns = ("task", "render_s", "error", "pixels", "width", "height")
        n = len(batch["task"])
        pages = [row_to_rendered({c: batch[c][i] for c in columns}) for i in range(n)]
        return {"record": [r.model_dump_json() for r in self.transcribe(pages)]}
