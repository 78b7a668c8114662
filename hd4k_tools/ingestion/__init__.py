"""``hd4k_tools.ingestion``: a corpus of PDFs and images to RAG-ready page records, on one machine or Ray.

    >>> manifest = ingest(["archive/", "scans/*.png"], "out/", model="/models/ixc2-4khd")  # doctest: +SKIP
    >>> for record in manifest.records():                                                   # doctest: +SKIP
    ...     print(record.source, record.page, record.text[:80])

Modules: :mod:`.records` (the record and its resume key), :mod:`.corpus` (inputs, hashes, pages),
:mod:`.work` (engine, rendering, transcription), :mod:`.shards` (output folder and manifest),
:mod:`.local` (one process) and :mod:`.ray_pipeline` (Ray Data, extra ``ray``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hd4k_tools.errors import CancelledError, InputError, InvalidHDNumError
from hd4k_tools.ingestion.corpus import clip_pages, describe_file, list_inputs
from hd4k_tools.ingestion.local import ShardBuffer, run_local
from hd4k_tools.ingestion.progress import IngestProgress
from hd4k_tools.ingestion.ray_pipeline import describe_files, ray_session, run_ray
from hd4k_tools.ingestion.records import ENGINES, PageRecord, RecordError, record_key, requested_hd_num
from hd4k_tools.ingestion.shards import (
    IngestOutputError,
    Manifest,
    check_compatible,
    done_keys,
    iter_records,
    remove_stale_temporaries,
    shard_paths,
)
from hd4k_tools.ingestion.shards import iter_records as iter_ingest_records
from hd4k_tools.ingestion.work import EngineSpec, PageSettings, WorkPlan, plan_work
from hd4k_tools.inputs.policy import ImagePolicy

__all__ = [
    "ENGINES",
    "IngestOutputError",
    "Manifest",
    "PageRecord",
    "RecordError",
    "ingest",
    "iter_ingest_records",
    "iter_records",
    "record_key",
]

DEFAULT_BATCH_SIZE = 8
DEFAULT_SHARD_SIZE = 64


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _check_hd_num(hd_num: int | str | None) -> None:
    if hd_num is None or (isinstance(hd_num, str) and hd_num.strip().lower() == "auto"):
        return
    if isinstance(hd_num, bool) or not isinstance(hd_num, int) or hd_num < 1:
        raise InvalidHDNumError(f"hd_num={hd_num!r} is not usable; pass a positive integer or 'auto' (e.g. 55).")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name}={value!r} must be a positive integer.")


def ingest(
    inputs: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    model: str | None = None,
    engine: str = "native",
    remote: str | None = None,
    hd: Any = None,
    hd_num: int | str | None = None,
    pages: Any = None,
    dpi: int = 200,
    workers: int = 1,
    ray: bool | str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    shard_size: int = DEFAULT_SHARD_SIZE,
    generation: Mapping[str, Any] | None = None,
    device: str = "auto",
    dtype: str = "auto",
    policy: ImagePolicy | None = None,
    progress: bool | None = None,
    cancel: threading.Event | None = None,
    engine_options: Mapping[str, Any] | None = None,
) -> Manifest:
    """Transcribe every PDF page and image of ``inputs`` into page records under ``out``.

    Args:
        inputs: files, folders (walked recursively for PDFs and images) and glob patterns.
        out: the output folder; a rerun over the same folder skips every page already done (keyed by
            content hash, page, hd_num, model and prompt) and ends with the same records.
        model: checkpoint folder or hub id (native, vllm) or the model name on the server (remote);
            required unless ``hd`` is given. It is part of the resume key as given.
        engine: ``"native"`` (PyTorch in process), ``"vllm"`` (in-process vLLM engine, pages in batches)
            or ``"remote"`` (an OpenAI-compatible server at ``remote``).
        remote: the server's base URL; implies ``engine="remote"``.
        hd: a ready :class:`hd4k_tools.HD4K` to use instead of opening one (local mode only).
        hd_num: tiles per page (default 55, the document task's; ``"auto"`` fits the context).
        pages: 1-based page selection applied to every PDF (``"1-3"``: the first three pages of each);
            an image is page 1.
        dpi: PDF render resolution.
        workers: Ray mode: transcription actors (one engine each). Local mode: rendering threads.
        ray: ``None``/``False`` = local mode; ``True`` = start a local Ray; a string = join that Ray
            cluster address (``"auto"``, ``"ray://head:10001"``).
        batch_size: pages per rendering task and per engine batch.
        shard_size: records per shard (a shard is also the unit a killed run can lose at most).
        generation: decoding options (e.g. ``{"max_new_tokens": 2048}``).
        device, dtype: for the native engine.
        policy: input limits (bytes, pixels) for every file and rendered page.
        progress: a bar on a terminal, plain lines otherwise; ``False`` = silent.
        cancel: set it to stop between pages (local mode only); finished records are kept.
        engine_options: other options for opening the engine (each Ray actor opens its own), e.g.
            ``{"gpu_memory_utilization": 0.85}`` or ``{"enforce_eager": True}`` for vLLM.

    Returns:
        The run's :class:`Manifest` (also in ``out/manifest.json``); ``manifest.records()`` iterates the
        records of the whole folder.

    Raises:
        InputError: bad arguments or inputs that name nothing usable (bad files inside the corpus
            become error records instead).
        IngestOutputError: ``out`` holds records made with other dpi/output/generation settings.
        CancelledError, KeyboardInterrupt: the run was stopped; every finished shard is valid.
    """
    _check_hd_num(hd_num)
    clip_pages(pages, 1)  # a selection that cannot be read is refused here, not recorded for every file
    _check_positive(workers=workers, batch_size=batch_size, shard_size=shard_size, dpi=dpi)
    if remote:
        engine = "remote"
    use_ray = ray is not None and ray is not False
    if cancel is not None and use_ray:
        raise InputError("cancel= works in local mode only; stop a Ray run with Ctrl-C (finished shards are kept).")
    if hd is not None and use_ray:
        raise InputError("hd= (an object in this process) cannot be shipped to Ray actors; pass model= and engine=.")
    if model is None:
        if hd is None:
            raise InputError("no model given; pass model= (a checkpoint folder, hub id or remote model name).")
        model = str(hd.model_id)
    spec = (
        None
        if hd is not None
        else EngineSpec(
            engine=engine,
            model=model,
            remote_url=remote,
            device=device,
            dtype=dtype,
            options=tuple((engine_options or {}).items()),
        )
    )  # type: ignore[arg-type]
    settings = PageSettings(hd_num=hd_num, dpi=dpi, generation=dict(generation or {}), policy=policy or ImagePolicy())
    paths = list_inputs([inputs] if isinstance(inputs, str | Path) else list(inputs))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    check_compatible(out_dir, settings.fingerprint())
    remove_stale_temporaries(out_dir)
    done = done_keys(out_dir)
    manifest = Manifest(
        out=str(out_dir),
        engine=engine if hd is None else "object",
        model=model,
        hd_num=requested_hd_num(hd_num),
        prompt=settings.prompt,
        settings=settings.fingerprint(),
        mode="ray" if use_ray else "local",
        workers=workers,
        inputs=paths,
        files=len(paths),
        started_at=_now(),
    )
    start = time.monotonic()
    try:
        if use_ray:
            _run_ray(manifest, paths, pages, settings, spec, done, ray, workers, batch_size, shard_size, progress)  # type: ignore[arg-type]
        else:
            _run_local(
                manifest, paths, pages, settings, spec, hd, done, workers, batch_size, shard_size, progress, cancel
            )
    except (KeyboardInterrupt, CancelledError):
        manifest.status = "interrupted"
        raise
    except Exception:
        manifest.status = "failed"
        raise
    else:
        manifest.status = "complete"
    finally:
        manifest.elapsed_s = round(time.monotonic() - start, 3)
        manifest.finished_at = _now()
        manifest.shards = [p.stem for p in shard_paths(out_dir)]
        manifest.write()
    return manifest


def _plan(manifest: Manifest, files: Any, settings: PageSettings, done: set[str]) -> WorkPlan:
    plan = plan_work(files, settings, manifest.model, done)
    manifest.pages_total = plan.total
    manifest.pages_skipped = plan.skipped
    manifest.duplicates = plan.duplicates
    manifest.write()
    return plan


def _run_local(
    manifest: Manifest,
    paths: list[str],
    pages: Any,
    settings: PageSettings,
    spec: EngineSpec | None,
    hd: Any,
    done: set[str],
    workers: int,
    batch_size: int,
    shard_size: int,
    progress: bool | None,
    cancel: threading.Event | None,
) -> None:
    plan = _plan(manifest, [describe_file(p, pages, settings.policy) for p in paths], settings, done)
    bar = IngestProgress(len(plan.tasks) + len(plan.failed_files), progress=progress)
    owned = hd is None and bool(plan.tasks)
    engine = spec.open(progress=progress) if owned and spec is not None else hd
    buffer = ShardBuffer(manifest.out, shard_size)
    try:
        run_local(
            plan,
            engine,
            settings,
            manifest.model,
            buffer,
            batch_size=batch_size,
            workers=workers,
            progress=bar,
            cancel=cancel,
        )
    finally:
        bar.close()
        if owned:
            engine.close()
        manifest.pages_done, manifest.pages_failed = buffer.ok, buffer.failed


def _run_ray(
    manifest: Manifest,
    paths: list[str],
    pages: Any,
    settings: PageSettings,
    spec: EngineSpec,
    done: set[str],
    address: bool | str,
    workers: int,
    batch_size: int,
    shard_size: int,
    progress: bool | None,
) -> None:
    tally = ShardBuffer(manifest.out, shard_size)
    with ray_session(address if isinstance(address, str) else None, workers):
        plan = _plan(manifest, describe_files(paths, pages, settings.policy), settings, done)
        bar = IngestProgress(len(plan.tasks) + len(plan.failed_files), progress=progress)
        try:
            run_ray(plan, spec, settings, tally, workers=workers, batch_size=batch_size, progress=bar)
        finally:
            bar.close()
            manifest.pages_done, manifest.pages_failed = tally.ok, tally.failed
