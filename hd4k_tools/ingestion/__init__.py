"""``hd4k_tools.ingestion``: a corpus of PDFs and images to RAG-ready page records, on one machine or Ray.

    >>> manifest = ingest(["archive/", "scans/*.png"], "out/", model="/models/ixc2-4khd")  # doctest: +SKIP
    >>> for record in manifest.records():                                                   # doctest: +SKIP
    ...     print(record.source, record.page, record.text[:80])

Modules: :mod:`.records` (the record and its resume key), :mod:`.corpus` (inputs, hashes, pages),
:mod:`.work` (engine, rendering, transcription), :mod:`.render` (PDF pages in worker processes under
time and memory limits), :mod:`.shards` (output folder, dataset and manifest), :mod:`.local` (one process)
and :mod:`.ray_pipeline` (Ray Data, extra ``ray``). Settings are one :class:`IngestOptions`.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from hd4k_tools.errors import CancelledError, InputError, InvalidHDNumError, RemoteError
from hd4k_tools.ingestion.corpus import clip_pages, describe_file, scan_inputs
from hd4k_tools.ingestion.local import DEFAULT_MAX_CONSECUTIVE_FAILURES, SystemicFailureError, run_local
from hd4k_tools.ingestion.progress import IngestProgress
from hd4k_tools.ingestion.ray_pipeline import describe_files, ray_session, run_ray
from hd4k_tools.ingestion.records import (
    ENGINES,
    RECORD_FORMAT,
    SCHEMA_VERSION,
    PageRecord,
    RecordError,
    display_path,
    record_arrow_schema,
    record_key,
    requested_hd_num,
)
from hd4k_tools.ingestion.render import DEFAULT_RENDER_MEMORY_MB, DEFAULT_RENDER_TIMEOUT_S, RenderLimitError
from hd4k_tools.ingestion.shards import (
    FaultPoints,
    IngestOutputError,
    Manifest,
    RunSummary,
    ShardWriter,
    check_compatible,
    earlier_runs,
    iter_records,
    prepare_output,
    repair_output,
    shard_paths,
)
from hd4k_tools.ingestion.shards import iter_records as iter_ingest_records
from hd4k_tools.ingestion.work import EngineSpec, PageSettings, WorkPlan, model_identity, plan_work
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.runtime.generation_config import GenerationConfig

__all__ = [
    "ENGINES",
    "RECORD_FORMAT",
    "SCHEMA_VERSION",
    "IngestOptions",
    "IngestOutputError",
    "Manifest",
    "PageRecord",
    "RecordError",
    "RenderLimitError",
    "SystemicFailureError",
    "Terminated",
    "ingest",
    "iter_ingest_records",
    "iter_records",
    "record_arrow_schema",
    "record_key",
]

DEFAULT_BATCH_SIZE = 8
DEFAULT_SHARD_SIZE = 64


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Terminated(KeyboardInterrupt):
    """The run got SIGTERM (a scheduler, a pre-empted VM): handled like Ctrl-C, finished pages are kept."""


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises :class:`Terminated` in the main thread while a run is on (no handler elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _positive(name: str, value: Any, kind: type = int) -> None:
    if isinstance(value, bool) or not isinstance(value, kind | int) or value <= 0:
        raise InputError(f"{name}={value!r} must be a positive {'integer' if kind is int else 'number'}.")


@dataclass(frozen=True)
class IngestOptions:
    """Every setting of an ingest run, checked when built (so a bad one is refused before any model loads).

    ``ingest(inputs, out, IngestOptions(model=...))`` and ``ingest(inputs, out, model=...)`` are the same.
    The fields:

    * ``model``: checkpoint folder or hub id (native, vllm) or the model name on the server
      (remote); required unless ``ingest(hd=...)`` is given. The resume key uses its canonical identity
      (a folder: real path + config hash).
    * ``engine``: ``"native"`` (default), ``"vllm"`` or ``"remote"``; ``remote``: the server's base
      URL (implies ``engine="remote"``; another engine with it is refused).
    * ``hd_num``: tiles per page (default 55, the document task's; ``"auto"`` fits the context).
    * ``pages``: 1-based page selection applied to every PDF (``"1-3"``: the first three pages of
      each); an image is page 1. ``dpi``: PDF render resolution.
    * ``workers``: Ray mode: transcription actors (one engine each). Local mode: rendering threads.
    * ``ray``: ``None``/``False`` = local mode; ``True`` = start a local Ray; a string = join that
      Ray cluster address (``"auto"``, ``"ray://head:10001"``); a head that does not answer is
      refused in seconds.
    * ``batch_size``: pages per rendering task and engine batch (in Ray mode also per shard).
    * ``shard_size``: records per JSONL/Parquet part in local mode.
    * ``generation``: decoding options (e.g. ``{"max_new_tokens": 2048}``), checked up front.
    * ``device``, ``dtype``: for the native engine. ``policy``: input limits (bytes, pixels).
    * ``progress``: a bar on a terminal, plain lines otherwise; ``False`` = silent.
    * ``follow_symlinks``: follow symlinks that lead out of the folders and patterns given.
    * ``max_consecutive_failures``: stop (``SystemicFailureError``) after this many pages in a row
      fail the same retryable way (0: never).
    * ``render_timeout_s``, ``render_memory_mb``: limits for rendering one PDF page.
    * ``engine_options``: other options for opening the engine (each Ray actor opens its own),
      e.g. ``{"gpu_memory_utilization": 0.85}`` or ``{"enforce_eager": True}`` for vLLM.
    """

    model: str | None = None
    engine: str | None = None
    remote: str | None = None
    hd_num: int | str | None = None
    pages: Any = None
    dpi: int = 200
    workers: int = 1
    ray: bool | str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    shard_size: int = DEFAULT_SHARD_SIZE
    generation: Mapping[str, Any] | None = None
    device: str = "auto"
    dtype: str = "auto"
    policy: ImagePolicy | None = None
    progress: bool | None = None
    follow_symlinks: bool = False
    max_consecutive_failures: int = DEFAULT_MAX_CONSECUTIVE_FAILURES
    render_timeout_s: float = DEFAULT_RENDER_TIMEOUT_S
    render_memory_mb: int = DEFAULT_RENDER_MEMORY_MB
    engine_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        hd_num = self.hd_num
        if not (hd_num is None or (isinstance(hd_num, str) and hd_num.strip().lower() == "auto")) and (
            isinstance(hd_num, bool) or not isinstance(hd_num, int) or hd_num < 1
        ):
            raise InvalidHDNumError(f"hd_num={hd_num!r} is not usable; pass a positive integer or 'auto' (e.g. 55).")
        clip_pages(self.pages, 1)  # a selection that cannot be read is refused here, not recorded for every file
        for name in ("workers", "batch_size", "shard_size", "dpi", "render_memory_mb"):
            _positive(name, getattr(self, name))
        _positive("render_timeout_s", self.render_timeout_s, float)
        if (
            isinstance(self.max_consecutive_failures, bool)
            or not isinstance(self.max_consecutive_failures, int)
            or (self.max_consecutive_failures < 0)
        ):
            raise InputError(
                f"max_consecutive_failures={self.max_consecutive_failures!r} must be >= 0 (0: never stop)."
            )
        if self.engine is not None and self.engine not in ENGINES:
            raise InputError(f"engine={self.engine!r} is not supported; use one of {', '.join(ENGINES)}.")
        if self.remote and self.engine not in (None, "remote"):
            raise InputError(
                f"engine={self.engine!r} and remote={self.remote!r} conflict: the pages would go to the server, not "
                "to that engine; drop --remote, or use --engine remote."
            )
        if self.engine == "remote" and not self.remote:
            raise InputError("engine='remote' needs the server's base URL: --remote http://host:8000/v1")
        generation = dict(self.generation or {})
        try:  # the engine checks the same options per page: every page would fail with them
            GenerationConfig().replace(**generation)
        except TypeError as err:
            known = ", ".join(f.name for f in dataclasses.fields(GenerationConfig))
            raise InputError(f"generation={generation!r} has an unknown option; known: {known}.") from err

    @property
    def engine_name(self) -> str:
        """The engine the pages go to: ``remote`` when a server is given, otherwise ``native`` by default."""
        return self.engine or ("remote" if self.remote else "native")

    @property
    def use_ray(self) -> bool:
        return self.ray is not None and self.ray is not False


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _probe_remote(url: str) -> None:
    """Refuse a server that cannot be reached at all, before any page is sent (one try, 5 s)."""
    try:
        httpx.get(url.rstrip("/") + "/models", timeout=5.0)
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as err:
        raise InputError(f"--remote {url!r} is not an http(s) URL ({err}); e.g. --remote http://host:8000/v1") from err
    except httpx.HTTPError as err:
        raise SystemicFailureError(
            f"cannot reach the server at {url} ({type(err).__name__}: {' '.join(str(err).split())[:200]}); every "
            "page would fail. Start it (hd4k serve) or fix --remote, then run the same command again."
        ) from err


def _engine_spec(options: IngestOptions, hd: Any, cancel: threading.Event | None) -> tuple[str, str, EngineSpec | None]:
    """``(model, engine, spec)`` of a run; ``spec`` is ``None`` when a ready ``hd`` object is used."""
    if cancel is not None and options.use_ray:
        raise InputError("cancel= works in local mode only; stop a Ray run with Ctrl-C (finished shards are kept).")
    if hd is not None and options.use_ray:
        raise InputError("hd= (an object in this process) cannot be shipped to Ray actors; pass model= and engine=.")
    model = options.model
    if model is None:
        if hd is None:
            raise InputError("no model given; pass model= (a checkpoint folder, hub id or remote model name).")
        model = str(hd.model_id)
    engine = options.engine_name
    spec = (
        None
        if hd is not None
        else EngineSpec(
            engine=engine,
            model=model,
            remote_url=options.remote,
            device=options.device,
            dtype=options.dtype,
            options=tuple((options.engine_options or {}).items()),
        )
    )
    return model, engine, spec


def _new_manifest(
    root: Path,
    options: IngestOptions,
    engine: str,
    model: str,
    identity: str,
    page_settings: PageSettings,
    listing: Any,
    history: list[RunSummary],
) -> Manifest:
    """The manifest of a run that starts now (not yet written)."""
    return Manifest(
        out=str(root),
        engine=engine,
        model=model,
        model_id=identity,
        hd_num=requested_hd_num(options.hd_num),
        prompt=page_settings.prompt,
        settings=page_settings.fingerprint(),
        mode="ray" if options.use_ray else "local",
        workers=options.workers,
        inputs=[display_path(p)[0] for p in listing.paths],
        files=len(listing.paths),
        skipped_links=[display_path(p)[0] for p in listing.skipped_links],
        started_at=_now(),
        runs=history,
    )


def _run_and_record(
    manifest: Manifest,
    paths: Sequence[Path],
    options: IngestOptions,
    page_settings: PageSettings,
    spec: EngineSpec | None,
    hd: Any,
    done: dict[Any, bool],
    root: Path,
    history: list[RunSummary],
    faults: FaultPoints,
    cancel: threading.Event | None,
) -> None:
    """Run the pages (locally or on Ray), then record how the run ended in ``manifest`` and write it."""
    writer = ShardWriter(root, options.shard_size, faults=faults)
    start = time.monotonic()
    try:
        if options.use_ray:
            _run_ray(manifest, paths, options, page_settings, spec, done, writer, faults)  # type: ignore[arg-type]
        else:
            _run_local(manifest, paths, options, page_settings, spec, hd, done, writer, faults, cancel)
    except (KeyboardInterrupt, CancelledError):
        manifest.status = "interrupted"
        raise
    except Exception:
        manifest.status = "failed"
        raise
    else:
        manifest.status = "complete"
    finally:
        _close_manifest(manifest, writer, root, history, start, faults)


def _close_manifest(
    manifest: Manifest, writer: ShardWriter, root: Path, history: list[RunSummary], start: float, faults: FaultPoints
) -> None:
    """Record a run's counts, errors, time and shards in ``manifest`` and write it."""
    manifest.pages_done, manifest.pages_failed = writer.ok, writer.failed
    manifest.errors = dict(sorted(writer.errors.items()))
    manifest.elapsed_s = round(time.monotonic() - start, 3)
    manifest.finished_at = _now()
    manifest.shards = [p.stem for p in shard_paths(root)]
    manifest.runs = [*history, manifest.summary()]
    manifest.write(faults)


def ingest(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    options: IngestOptions | None = None,
    *,
    hd: Any = None,
    cancel: threading.Event | None = None,
    **settings: Any,
) -> Manifest:
    """Transcribe every PDF page and image of ``inputs`` into page records under ``out``.

    Args:
        inputs: files, folders (walked recursively for PDFs and images) and glob patterns. A file named
            in several inputs, or the same content under several paths, is read once: the first path
            given keeps the records, the others are listed in ``manifest.duplicates``.
        out: the output folder; a rerun over the same folder skips every page already done (keyed by
            content hash, page, hd_num, model identity and prompt) and ends with the same records.
        options: an :class:`IngestOptions` (each field is described there); or its fields as keywords
            (``settings``), or both (keywords replace fields).
        hd: a ready :class:`hd4k_tools.HD4K` to use instead of opening one (local mode only).
        cancel: set it to stop between pages (local mode only); finished records are kept.

    Returns:
        The run's :class:`Manifest` (also in ``out/manifest.json``); ``manifest.records()`` iterates the
        records of the whole folder. ``manifest.pages_failed`` and ``manifest.errors`` say what failed.

    Raises:
        InputError: bad arguments or inputs that name nothing usable (bad files inside the corpus
            become error records instead).
        IngestOutputError: ``out`` cannot be used or written, or holds records made with other settings.
        SystemicFailureError: pages kept failing the same way (engine or server down): stopped early.
        CancelledError, KeyboardInterrupt (:class:`Terminated` for SIGTERM): the run was stopped; every
            finished page is on disk.
    """
    options = dataclasses.replace(options, **settings) if options is not None else IngestOptions(**settings)
    model, engine, spec = _engine_spec(options, hd, cancel)
    identity = spec.identity() if spec is not None else model_identity(model)
    page_settings = PageSettings(
        hd_num=options.hd_num,
        dpi=options.dpi,
        generation=dict(options.generation or {}),
        policy=options.policy or ImagePolicy(),
        render_timeout_s=float(options.render_timeout_s),
        render_memory_mb=options.render_memory_mb,
    )
    listing = scan_inputs(
        [inputs] if isinstance(inputs, str | Path) else list(inputs), follow_symlinks=options.follow_symlinks
    )
    root = prepare_output(out)
    check_compatible(root, page_settings.fingerprint())
    history = earlier_runs(root)
    faults = FaultPoints()
    with _sigterm_as_interrupt():
        done = {k: not r.ok for k, r in repair_output(root, faults).items() if r.done}
        manifest = _new_manifest(
            root, options, engine if hd is None else "object", model, identity, page_settings, listing, history
        )
        manifest.write(faults)
        _run_and_record(manifest, listing.paths, options, page_settings, spec, hd, done, root, history, faults, cancel)
    return manifest


def _plan(
    manifest: Manifest, files: Any, settings: PageSettings, done: dict[str, bool], faults: FaultPoints
) -> WorkPlan:
    plan = plan_work(files, settings, manifest.model, done, manifest.model_id)
    manifest.pages_total = plan.total
    manifest.pages_skipped = plan.skipped
    manifest.pages_failed_before = plan.skipped_failed
    manifest.duplicates = plan.duplicates
    manifest.write(faults)
    return plan


def _open(spec: EngineSpec | None, hd: Any, progress: bool | None) -> Any:
    if spec is None:
        return hd
    if spec.engine == "remote":
        _probe_remote(spec.remote_url or "")
    try:
        return spec.open(progress=progress)
    except RemoteError as err:
        raise SystemicFailureError(f"cannot use the server at {spec.remote_url}: {err}") from err


def _run_local(
    manifest: Manifest,
    paths: list[str],
    options: IngestOptions,
    settings: PageSettings,
    spec: EngineSpec | None,
    hd: Any,
    done: dict[str, bool],
    writer: ShardWriter,
    faults: FaultPoints,
    cancel: threading.Event | None,
) -> None:
    plan = _plan(manifest, [describe_file(p, options.pages, settings.policy) for p in paths], settings, done, faults)
    bar = IngestProgress(len(plan.tasks) + len(plan.failed_files), progress=options.progress)
    owned = spec is not None and bool(plan.tasks)
    engine = _open(spec, hd, options.progress) if owned else hd
    try:
        run_local(
            plan,
            engine,
            settings,
            manifest.model,
            writer,
            batch_size=options.batch_size,
            workers=options.workers,
            progress=bar,
            cancel=cancel,
            model_id=manifest.model_id,
            max_consecutive_failures=options.max_consecutive_failures,
        )
    finally:
        bar.close()
        if owned:
            engine.close()


def _run_ray(
    manifest: Manifest,
    paths: list[str],
    options: IngestOptions,
    settings: PageSettings,
    spec: EngineSpec,
    done: dict[str, bool],
    writer: ShardWriter,
    faults: FaultPoints,
) -> None:
    if spec.engine == "remote":
        _probe_remote(spec.remote_url or "")
    with ray_session(options.ray if isinstance(options.ray, str) else None, options.workers):
        plan = _plan(manifest, describe_files(paths, options.pages, settings.policy), settings, done, faults)
        bar = IngestProgress(len(plan.tasks) + len(plan.failed_files), progress=options.progress)
        try:
            run_ray(
                plan,
                spec,
                settings,
                writer,
                workers=options.workers,
                batch_size=options.batch_size,
                progress=bar,
                max_consecutive_failures=options.max_consecutive_failures,
            )
        finally:
            bar.close()
