"""The output folder: one dataset of page records, as JSONL (for people) and Parquet (for tables), and
the manifest.

    OUT/
      manifest.json                  the runs: settings, counts, errors, history (see :class:`Manifest`)
      jsonl/part-<run>-<n>.jsonl     one record per line (:class:`PageRecord`); the source of truth
      parquet/part-<run>-<n>.parquet the same records, one fixed Arrow schema (``record_arrow_schema``)

Durability: a finished page is appended to its run's open JSONL part at once (written and flushed per
engine call, fsynced at least every :data:`SYNC_S` seconds), so a killed process (``kill -9``, an OOM
kill, SIGTERM) loses only the pages in flight. A part holds ``shard_size`` records; when it closes (full,
or at the end of the run, also an interrupted one) its Parquet file is written, to a temporary name then
renamed. The next run over the folder repairs what a kill left: it cuts a half-written last line off a
JSONL part and writes any Parquet file that is missing or short, so the Parquet dataset equals the JSONL
records again. Every write error (disk full, permissions) is an :class:`IngestOutputError` naming the
file, and leaves no half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from hd4k_tools.errors import IngestError
from hd4k_tools.ingestion.records import RECORD_FORMAT, SCHEMA_VERSION, PageRecord, record_arrow_schema

JSONL_DIR = "jsonl"
PARQUET_DIR = "parquet"
MANIFEST = "manifest.json"
OLD_SHARD_DIR = "shards"  # the layout of hd4k-ingest/1 (records of both formats in one folder)
SHARD_DIR = JSONL_DIR
_TMP_PREFIX = ".tmp-"
#: Seconds at most between two fsyncs of the open JSONL part (a kill of the process loses nothing
#: written; this bounds what a crash of the machine can lose).
SYNC_S = 2.0
#: Environment variable of the fault-injection hook (tests): the k-th write step exits the process.
FAULT_ENV = "HD4K_INGEST_FAULT_AT"
FAULT_EXIT_CODE = 86


class IngestOutputError(IngestError):
    """The output folder cannot be used or written: not a folder, an older layout, a shard that cannot
    be read, earlier runs with other settings, or a write error (disk full, permissions)."""


class FaultPoints:
    """Test hook for fault injection: with ``HD4K_INGEST_FAULT_AT=k`` in the environment, the k-th write
    step of the run (appending a line, renaming a file, ...) ends the process at once with
    :data:`FAULT_EXIT_CODE`, as ``kill -9`` would. Without it, it does nothing."""

    def __init__(self, at: int | None = None) -> None:
        value = os.environ.get(FAULT_ENV, "") if at is None else str(at)
        self.at = int(value) if value.strip() else 0
        self.count = 0

    def __call__(self, step: str) -> None:
        if self.at <= 0:
            return
        self.count += 1
        if self.count == self.at:
            os._exit(FAULT_EXIT_CODE)


_NO_FAULTS = FaultPoints(0)


def _write_error(path: Path, err: OSError) -> IngestOutputError:
    reason = err.strerror or str(err)
    return IngestOutputError(
        f"cannot write {path}: {reason}; nothing half-written was kept. Free space or fix the permissions of "
        "the --out folder, then run the same command again to resume."
    )


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, write: Callable[[Path], Any], faults: FaultPoints = _NO_FAULTS) -> None:
    """Write ``path`` whole or not at all: to a hidden temporary name, fsync, rename."""
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex[:12]}-{path.name}.partial")
    try:
        faults(f"write {path.name}")
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        faults(f"rename {path.name}")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    finally:
        if tmp.exists():
            tmp.unlink()


def _pyarrow() -> Any | None:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        return None
    return pyarrow


def _write_parquet(path: Path, records: list[PageRecord], faults: FaultPoints = _NO_FAULTS) -> None:
    pa = _pyarrow()
    if pa is None:
        return
    table = pa.Table.from_pylist([r.model_dump(mode="json") for r in records], schema=record_arrow_schema())
    _atomic_write(path, lambda p: pa.parquet.write_table(table, p), faults)


def _lines(records: Iterable[PageRecord]) -> bytes:
    return "".join(r.model_dump_json() + "\n" for r in records).encode("utf-8")


def new_shard_name(run_id: str, number: int) -> str:
    return f"part-{run_id}-{number:05d}"


def new_run_id() -> str:
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"


def write_shard(
    out: str | os.PathLike[str],
    records: list[PageRecord],
    *,
    name: str | None = None,
    faults: FaultPoints | None = None,
) -> str:
    """Write ``records`` as one whole shard (its JSONL part, then its Parquet file); returns its name.

    What a Ray writer task does with each batch of records."""
    faults = faults or _NO_FAULTS
    name = name or new_shard_name(new_run_id(), 0)
    root = Path(out)
    data = _lines(records)
    _atomic_write(root / JSONL_DIR / f"{name}.jsonl", lambda p: p.write_bytes(data), faults)
    _write_parquet(root / PARQUET_DIR / f"{name}.parquet", records, faults)
    return name


def _write_all(handle: Any, data: bytes) -> None:
    """Write every byte of ``data`` to an unbuffered file (a raw write may take only part of it)."""
    view = memoryview(data)
    while view:
        view = view[handle.write(view) :]


class ShardWriter:
    """Writes records as they finish (local mode): each call to :meth:`add` appends them to the run's
    open JSONL part and flushes; every ``shard_size`` records the part closes and its Parquet file is
    written. Keeps the counts of the run (``ok``, ``failed``, ``errors`` by type)."""

    def __init__(
        self, out: str | os.PathLike[str], shard_size: int, *, faults: FaultPoints | None = None, run_id: str = ""
    ) -> None:
        self.out = Path(out)
        self.shard_size = shard_size
        self.faults = faults or _NO_FAULTS
        self.run_id = run_id or new_run_id()
        self.written: list[str] = []
        self.ok = 0
        self.failed = 0
        self.errors: Counter[str] = Counter()
        self._number = 0
        self._name = ""
        self._file: Any = None
        self._part: list[PageRecord] = []
        self._synced = time.monotonic()

    def count(self, records: Iterable[PageRecord]) -> None:
        for record in records:
            if record.error is None:
                self.ok += 1
            else:
                self.failed += 1
                self.errors[record.error.type] += 1

    def add(self, records: list[PageRecord]) -> None:
        """Append ``records`` to disk now (a kill after this returns loses none of them)."""
        while records:
            room = self.shard_size - len(self._part)
            self._append(records[:room])
            records = records[room:]

    def _append(self, records: list[PageRecord]) -> None:
        if self._file is None:
            self._name = new_shard_name(self.run_id, self._number)
            path = self.out / JSONL_DIR / f"{self._name}.jsonl"
            try:
                # Unbuffered: what write() returned is in the file (the page cache), whatever kills the process.
                self._file = open(path, "xb", buffering=0)  # noqa: SIM115 - held open across calls
            except OSError as err:
                raise _write_error(path, err) from err
        data = _lines(records)
        start = self._file.tell()
        try:
            self.faults("append line")
            half = len(data) // 2  # a kill here leaves a torn line: the next run cuts it off
            _write_all(self._file, data[:half])
            self.faults("append half line")
            _write_all(self._file, data[half:])
            self.faults("appended")
            if time.monotonic() - self._synced >= SYNC_S:
                os.fsync(self._file.fileno())
                self._synced = time.monotonic()
        except OSError as err:
            # Cut the part back to its whole lines and drop it from this run: nothing half-written stays.
            path = self.out / JSONL_DIR / f"{self._name}.jsonl"
            handle, self._file = self._file, None
            with contextlib.suppress(OSError):
                os.ftruncate(handle.fileno(), start)
            with contextlib.suppress(OSError):
                handle.close()
            self._part = []
            raise _write_error(path, err) from err
        self._part.extend(records)
        self.count(records)
        if len(self._part) >= self.shard_size:
            self._close_part()

    def _close_part(self) -> None:
        if self._file is None:
            return
        handle, self._file = self._file, None
        try:
            os.fsync(handle.fileno())
        except OSError as err:
            handle.close()
            raise _write_error(self.out / JSONL_DIR / f"{self._name}.jsonl", err) from err
        handle.close()
        self.faults("closed part")
        _write_parquet(self.out / PARQUET_DIR / f"{self._name}.parquet", self._part, self.faults)
        self.written.append(self._name)
        self._part = []
        self._number += 1

    def close(self) -> None:
        """Close the open part (and write its Parquet file)."""
        self._close_part()


# ----------------------------------------------------------------------------------------------------
# Reading and repairing
# ----------------------------------------------------------------------------------------------------
def shard_paths(out: str | os.PathLike[str]) -> list[Path]:
    """The JSONL parts in ``out``, sorted by name."""
    folder = Path(out) / JSONL_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("part-*.jsonl") if p.is_file())


def _read_part(path: Path) -> tuple[list[PageRecord], int]:
    """The records of a JSONL part and the length of its whole lines (a torn last line is not a record)."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    records = []
    for number, line in enumerate(data[:end].decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(PageRecord.model_validate_json(line))
        except ValueError as err:
            raise IngestOutputError(
                f"{path} line {number} is not a valid record ({' '.join(str(err).split())[:200]}); the part was "
                "not written by hd4k ingest or was edited. Move it out of the folder and run again to redo its pages."
            ) from err
    return records, end


def read_shard(path: Path) -> Iterator[PageRecord]:
    """The records of one JSONL part."""
    yield from _read_part(path)[0]


def check_output_folder(out: str | os.PathLike[str]) -> Path:
    """``out`` as an existing hd4k ingest output folder of this layout (for readers).

    Raises:
        IngestOutputError: ``out`` does not exist, is a file, is not ingest output, or has the old layout.
    """
    root = Path(out)
    if not root.exists():
        raise IngestOutputError(f"{out} does not exist; pass the --out folder of an hd4k ingest run.")
    if not root.is_dir():
        raise IngestOutputError(f"{out} is a file, not a folder; pass the --out folder of an hd4k ingest run.")
    _refuse_old_layout(root)
    if not (root / MANIFEST).is_file() and not (root / JSONL_DIR).is_dir():
        raise IngestOutputError(
            f"{out} is not hd4k ingest output (it has no {MANIFEST} and no {JSONL_DIR}/ folder); pass the --out "
            "folder of an hd4k ingest run."
        )
    return root


def _refuse_old_layout(root: Path) -> None:
    manifest = root / MANIFEST
    old = (root / OLD_SHARD_DIR).is_dir()
    if not old and manifest.is_file():
        try:
            old = json.loads(manifest.read_text(encoding="utf-8")).get("format") != RECORD_FORMAT
        except (OSError, ValueError, AttributeError):
            old = False  # Manifest.load names the problem
    if old:
        raise IngestOutputError(
            f"{root} was written by an older hd4k ingest (records in {OLD_SHARD_DIR}/, keyed by the model name "
            f"as typed); this version writes layout {RECORD_FORMAT} (jsonl/ and parquet/). Ingest into a new "
            "--out folder; the old one stays readable as JSON lines."
        )


def _latest(records: Iterable[PageRecord]) -> dict[str, PageRecord]:
    """One record per key: a done record wins over one to retry, otherwise the later one."""
    latest: dict[str, PageRecord] = {}
    for record in records:
        previous = latest.get(record.key)
        if previous is None or (not previous.done and record.done) or previous.done == record.done:
            latest[record.key] = record
    return latest


def iter_records(out: str | os.PathLike[str]) -> Iterator[PageRecord]:
    """Every record in ``out``, one per key (a page transcribed twice by a retried task counts once),
    in a stable order: by source, then page.

    Raises:
        IngestOutputError: ``out`` is missing, a file, not ingest output, or has the old layout.
    """
    root = check_output_folder(out)
    latest = _latest(r for path in shard_paths(root) for r in _read_part(path)[0])
    yield from sorted(latest.values(), key=PageRecord.sort_key)


def prepare_output(out: str | os.PathLike[str]) -> Path:
    """Make ``out`` ready to write (absolute path returned), or say in one line why it cannot be.

    Raises:
        IngestOutputError: ``out`` is a file; its manifest.json, jsonl or parquet is not what it should be;
            it has the old layout; it cannot be created or written.
    """
    root = Path(os.path.abspath(os.fspath(out)))
    if root.exists() and not root.is_dir():
        raise IngestOutputError(f"--out {out} is a file, not a folder; name a folder (it is created if missing).")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise IngestOutputError(f"cannot create the --out folder {out}: {err.strerror or err}.") from err
    _refuse_old_layout(root)
    if (root / MANIFEST).exists() and not (root / MANIFEST).is_file():
        raise IngestOutputError(f"{root / MANIFEST} is not a file; move it away, it is where the manifest goes.")
    for name in (JSONL_DIR, PARQUET_DIR):
        folder = root / name
        if folder.exists() and not folder.is_dir():
            raise IngestOutputError(f"{folder} is a file; move it away, it is where the {name} records go.")
        try:
            folder.mkdir(exist_ok=True)
            probe = folder / f"{_TMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise IngestOutputError(f"cannot write in {folder}: {err.strerror or err}; fix --out.") from err
    return root


def repair_output(root: Path, faults: FaultPoints | None = None) -> dict[str, PageRecord]:
    """Bring the folder back to a consistent state after a kill, and return its records by key.

    Removes temporary files, cuts a torn last line off a JSONL part (a part left with no record goes),
    writes the Parquet file of every part whose Parquet file is missing or short, and drops Parquet files
    without a JSONL part.
    """
    faults = faults or _NO_FAULTS
    for name in (JSONL_DIR, PARQUET_DIR, "."):
        folder = root / name
        for path in folder.glob(f"{_TMP_PREFIX}*") if folder.is_dir() else []:
            if path.is_file():  # a folder of that name is not ours: left alone
                path.unlink(missing_ok=True)
    pa = _pyarrow()
    records: list[PageRecord] = []
    parts = shard_paths(root)
    for path in parts:
        part, end = _read_part(path)
        parquet = root / PARQUET_DIR / f"{path.stem}.parquet"
        try:
            if end < path.stat().st_size:
                with open(path, "rb+") as handle:
                    handle.truncate(end)
                    os.fsync(handle.fileno())
            if not part:
                path.unlink()
                parquet.unlink(missing_ok=True)
                continue
        except OSError as err:
            raise _write_error(path, err) from err
        if pa is not None and (not parquet.is_file() or pa.parquet.read_metadata(parquet).num_rows != len(part)):
            _write_parquet(parquet, part, faults)
        records.extend(part)
    stems = {p.stem for p in parts}
    for parquet in (root / PARQUET_DIR).glob("part-*.parquet"):
        if parquet.stem not in stems and parquet.is_file():
            parquet.unlink()
    return _latest(records)


def done_keys(out: str | os.PathLike[str]) -> dict[str, bool]:
    """Keys of the pages a rerun skips (transcribed, or failed for good) -> whether the record is an error."""
    return {k: not r.ok for k, r in _latest(r for p in shard_paths(out) for r in _read_part(p)[0]).items() if r.done}


# ----------------------------------------------------------------------------------------------------
# The manifest
# ----------------------------------------------------------------------------------------------------
class RunSummary(BaseModel):
    """One run over the folder (``Manifest.runs``)."""

    started_at: str
    finished_at: str | None = None
    status: str
    mode: str
    engine: str
    model: str
    model_id: str = ""
    workers: int
    pages_total: int = 0
    pages_skipped: int = 0
    pages_done: int = 0
    pages_failed: int = 0
    errors: dict[str, int] = Field(default_factory=dict)
    elapsed_s: float = 0.0


class Manifest(BaseModel):
    """What ``hd4k ingest`` did in an output folder, written to ``OUT/manifest.json`` (at the start of a
    run, after planning and at its end, also when interrupted).

    The top-level fields describe the latest run; ``runs`` keeps every run's summary. Counts are pages (a
    PDF page or an image; a file that failed as a whole counts as one). Paths are absolute. ``records()``
    iterates the records of the whole folder, earlier runs included.
    """

    format: str = RECORD_FORMAT
    schema_version: int = SCHEMA_VERSION
    status: Literal["running", "complete", "interrupted", "failed"] = "running"
    out: str
    engine: str
    model: str
    model_id: str = ""
    hd_num: str
    prompt: str
    settings: dict[str, Any]
    mode: str
    workers: int
    inputs: list[str]
    files: int = 0
    pages_total: int = 0
    pages_skipped: int = Field(0, description="already done by an earlier run over this folder")
    pages_done: int = Field(0, description="transcribed by this run")
    pages_failed: int = Field(0, description="records with an error written by this run")
    pages_failed_before: int = Field(0, description="skipped pages an earlier run recorded as failed for good")
    errors: dict[str, int] = Field(default_factory=dict, description="error type -> pages, this run")
    duplicates: dict[str, list[str]] = Field(default_factory=dict, description="content hash -> paths, first kept")
    skipped_links: list[str] = Field(default_factory=list, description="symlinks leading out of the inputs")
    shards: list[str] = Field(default_factory=list, description="every part in the folder")
    started_at: str = ""
    finished_at: str | None = None
    elapsed_s: float = 0.0
    runs: list[RunSummary] = Field(default_factory=list, description="every run over this folder, oldest first")

    @property
    def pages_per_minute(self) -> float:
        done = self.pages_done + self.pages_failed
        return 60.0 * done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def records(self) -> Iterator[PageRecord]:
        """Every record in the output folder (see :func:`iter_records`)."""
        return iter_records(self.out)

    def summary(self) -> RunSummary:
        """This run as a :class:`RunSummary`."""
        return RunSummary(**{k: getattr(self, k) for k in RunSummary.model_fields})

    def write(self, faults: FaultPoints | None = None) -> None:
        path = Path(self.out) / MANIFEST
        text = self.model_dump_json(indent=2)
        _atomic_write(path, lambda p: p.write_text(text + "\n", encoding="utf-8"), faults or _NO_FAULTS)

    @classmethod
    def load(cls, out: str | os.PathLike[str]) -> Manifest:
        """The manifest of an output folder.

        Raises:
            IngestOutputError: the folder has no readable manifest.
        """
        path = Path(out) / MANIFEST
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise IngestOutputError(
                f"{path} cannot be read ({' '.join(str(err).split())[:200]}); is {out} the --out folder of an "
                "hd4k ingest run?"
            ) from err


def earlier_runs(out: Path) -> list[RunSummary]:
    """The run history of the folder's manifest (empty when there is none)."""
    if not (out / MANIFEST).is_file():
        return []
    return Manifest.load(out).runs


def check_compatible(out: str | os.PathLike[str], settings: dict[str, Any]) -> None:
    """Refuse to add to a folder whose earlier runs used other settings outside the resume key
    (render dpi, output format, generation options): its records would silently mix two settings."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        return
    earlier = Manifest.load(out).settings
    if earlier != settings:
        raise IngestOutputError(
            f"{out} holds records made with {json.dumps(earlier)}, this run asks for {json.dumps(settings)}; "
            "use a new --out folder, or the same settings to resume."
        )


def records_from(lines: Iterable[str]) -> list[PageRecord]:
    """Records from JSON lines (what the Ray transcription step returns)."""
    return [PageRecord.model_validate_json(line) for line in lines]
