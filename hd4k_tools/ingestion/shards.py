"""The output folder: record shards (JSONL, plus Parquet when pyarrow is installed) and the manifest.

    OUT/
      manifest.json                 the run: settings, counts, shards, duplicates (see :class:`Manifest`)
      shards/part-<run>-<n>.jsonl   one record per line (:class:`PageRecord`)
      shards/part-<run>-<n>.parquet the same records as a table (flat columns; nested ones as structs)

Every file is written to a hidden temporary name in the same folder and renamed into place, so a
shard either exists whole or not at all: an interrupted run (Ctrl-C, kill, a lost node) leaves only
valid shards, and the next run skips every page they hold.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from hd4k_tools.errors import IngestError
from hd4k_tools.ingestion.records import RECORD_FORMAT, PageRecord

SHARD_DIR = "shards"
MANIFEST = "manifest.json"
_TMP_PREFIX = ".tmp-"


class IngestOutputError(IngestError):
    """The output folder cannot be used: an unreadable shard, or earlier runs with other settings."""


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}-{path.name}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _parquet_module() -> Any | None:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        return None
    return pyarrow


def write_shard(out: str | os.PathLike[str], records: list[PageRecord], *, name: str | None = None) -> str:
    """Write ``records`` as one shard (JSONL, and Parquet when pyarrow is installed); returns its name."""
    folder = Path(out) / SHARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = name or f"part-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}"
    lines = "".join(r.model_dump_json() + "\n" for r in records)
    _atomic_write(folder / f"{name}.jsonl", lambda p: p.write_text(lines, encoding="utf-8"))
    pa = _parquet_module()
    if pa is not None:
        table = pa.Table.from_pylist([r.model_dump(mode="json") for r in records])
        _atomic_write(folder / f"{name}.parquet", lambda p: pa.parquet.write_table(table, p))
    return name


def shard_paths(out: str | os.PathLike[str]) -> list[Path]:
    """The finished JSONL shards in ``out``, sorted by name."""
    folder = Path(out) / SHARD_DIR
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("part-*.jsonl") if p.is_file())


def remove_stale_temporaries(out: str | os.PathLike[str]) -> int:
    """Delete half-written files an interrupted run left behind; returns how many."""
    folder = Path(out) / SHARD_DIR
    stale = list(folder.glob(f"{_TMP_PREFIX}*")) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def read_shard(path: Path) -> Iterator[PageRecord]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield PageRecord.model_validate_json(line)
            except ValueError as err:
                raise IngestOutputError(
                    f"{path} line {number} is not a valid record ({err}); the shard was not written by hd4k "
                    "ingest or was edited. Move it out of the folder and run again to redo its pages."
                ) from err


def iter_records(out: str | os.PathLike[str]) -> Iterator[PageRecord]:
    """Every record in ``out``, one per key (a page transcribed twice by a retried task counts once),
    in a stable order: by source, then page."""
    latest: dict[str, PageRecord] = {}
    for path in shard_paths(out):
        for record in read_shard(path):
            previous = latest.get(record.key)
            if previous is None or (not previous.done and record.done) or previous.done == record.done:
                latest[record.key] = record
    yield from sorted(latest.values(), key=PageRecord.sort_key)


def done_keys(out: str | os.PathLike[str]) -> set[str]:
    """Keys of the pages a rerun skips: transcribed, or failed for good."""
    return {r.key for r in iter_records(out) if r.done}


class Manifest(BaseModel):
    """What an ``hd4k ingest`` run did, written to ``OUT/manifest.json`` (also on interruption).

    Counts are pages (a PDF page or an image; a file that failed as a whole counts as one). ``records()``
    iterates the records of the whole folder, earlier runs included.
    """

    format: str = RECORD_FORMAT
    status: Literal["running", "complete", "interrupted", "failed"] = "running"
    out: str
    engine: str
    model: str
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
    duplicates: dict[str, list[str]] = Field(default_factory=dict, description="content hash -> paths")
    shards: list[str] = Field(default_factory=list)
    started_at: str = ""
    finished_at: str | None = None
    elapsed_s: float = 0.0

    @property
    def pages_per_minute(self) -> float:
        done = self.pages_done + self.pages_failed
        return 60.0 * done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def records(self) -> Iterator[PageRecord]:
        """Every record in the output folder (see :func:`iter_records`)."""
        return iter_records(self.out)

    def write(self) -> None:
        path = Path(self.out) / MANIFEST
        text = self.model_dump_json(indent=2)
        _atomic_write(path, lambda p: p.write_text(text + "\n", encoding="utf-8"))

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
                f"{path} cannot be read ({err}); is {out} the --out folder of an hd4k ingest run?"
            ) from err


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
