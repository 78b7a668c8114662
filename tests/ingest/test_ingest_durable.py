"""hd4k ingest output as one dataset (fixed schema; pyarrow, pandas, DuckDB read it whole) and durable per
page: a kill at any write step (fault injection, every step in turn) loses at most the page in flight, and
the Parquet dataset equals the JSONL records after the rerun. Stand-in engine (no model) and PNG inputs,
so each run takes milliseconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from ingest_corpus import make_images

from hd4k_tools import HD4K, ingest
from hd4k_tools.ingestion import IngestOutputError, Manifest, PageRecord, iter_records, record_arrow_schema
from hd4k_tools.ingestion.records import SCHEMA_VERSION
from hd4k_tools.ingestion.shards import FAULT_ENV, FAULT_EXIT_CODE, JSONL_DIR, PARQUET_DIR, shard_paths
from hd4k_tools.ingestion.standin import InstantRunner

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
FAST = {"hd_num": 1, "progress": False}


def _content(records) -> list[dict[str, Any]]:
    return [r.content() for r in records]


def _jsonl_rows(out: Path) -> list[dict[str, Any]]:
    """The whole lines of every JSONL part (a torn last line, as a kill leaves it, is not a record)."""
    rows = []
    for path in sorted((out / JSONL_DIR).glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_bytes().split(b"\n")[:-1]]
    return rows


def _assert_parquet_equals_jsonl(out: Path) -> None:
    import pyarrow.dataset as ds

    table = ds.dataset(out / PARQUET_DIR, format="parquet").to_table()
    jsonl = _jsonl_rows(out)
    assert table.num_rows == len(jsonl)
    by_key = {row["key"]: row for row in table.to_pylist()}
    assert sorted(by_key) == sorted(r["key"] for r in jsonl)
    for row in jsonl:  # the same values, column for column
        assert PageRecord.model_validate(by_key[row["key"]]) == PageRecord.model_validate(row)
    for part in (out / JSONL_DIR).glob("*.jsonl"):
        assert (out / PARQUET_DIR / f"{part.stem}.parquet").is_file()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("durable") / "docs"
    make_images(root, 7)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n then nothing")  # an error record
    return root


@pytest.fixture(scope="module")
def expected(images, tmp_path_factory) -> list[PageRecord]:
    out = tmp_path_factory.mktemp("durable_ref") / "out"
    return list(ingest([images], out, hd=HD4K(InstantRunner()), model="m", shard_size=3, **FAST).records())


# ----------------------------------------------------------------------------------------------------
# one dataset
# ----------------------------------------------------------------------------------------------------
def test_schema_is_declared_once_and_every_shard_uses_it(images, tmp_path) -> None:
    schema = record_arrow_schema()
    assert schema.names == list(PageRecord.model_fields)
    assert schema.metadata[b"hd4k-ingest-schema"] == str(SCHEMA_VERSION).encode()
    out = tmp_path / "out"
    manifest = ingest([images], out, hd=HD4K(InstantRunner()), model="m", shard_size=3, **FAST)
    assert manifest.schema_version == SCHEMA_VERSION and manifest.format == f"hd4k-ingest/{SCHEMA_VERSION}"
    for path in (out / PARQUET_DIR).glob("*.parquet"):
        assert pq.read_schema(path).equals(schema)


def test_incremental_runs_and_error_only_shards_read_as_one_table(images, tmp_path) -> None:
    """An error-only shard (nulls in every model column) and a second run's shards: one table for pyarrow,
    pandas and DuckDB, with exactly the JSONL records."""
    import pyarrow.dataset as ds

    out = tmp_path / "out"
    ingest([images / "broken.png"], out, hd=HD4K(InstantRunner()), model="m", **FAST)  # errors only
    ingest([images / "img0000.png"], out, hd=HD4K(InstantRunner()), model="m", **FAST)
    ingest([images], out, hd=HD4K(InstantRunner()), model="m", shard_size=2, **FAST)
    assert len(list((out / PARQUET_DIR).glob("*.parquet"))) >= 4
    table = ds.dataset(out / PARQUET_DIR, format="parquet").to_table()
    assert table.num_rows == 8 and table.schema.equals(record_arrow_schema(), check_metadata=False)
    assert pq.read_table(out / PARQUET_DIR).num_rows == 8  # the folder as a dataset, no JSONL in the way
    _assert_parquet_equals_jsonl(out)

    pandas = pytest.importorskip("pandas")
    frame = pandas.read_parquet(out / PARQUET_DIR)
    assert len(frame) == 8 and frame["error"].notna().sum() == 1

    duckdb = pytest.importorskip("duckdb")
    query = f"SELECT count(*), count(error), sum(tokens.image) > 0 FROM '{out}/parquet/*.parquet'"
    assert duckdb.sql(query).fetchall() == [(8, 1, True)]
    failed = duckdb.sql(f"SELECT error.type FROM '{out}/parquet/*.parquet' WHERE error IS NOT NULL").fetchall()
    assert failed[0][0] in {"CorruptImageError", "UnsupportedFormatError"}


def test_an_old_layout_is_refused_with_one_line(images, tmp_path) -> None:
    out = tmp_path / "old"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "part-x.jsonl").write_text("")
    with pytest.raises(IngestOutputError, match=r"older hd4k ingest.*new\s+--out folder"):
        ingest([images], out, hd=HD4K(InstantRunner()), model="m", **FAST)
    with pytest.raises(IngestOutputError, match="older hd4k ingest"):
        list(iter_records(out))


# ----------------------------------------------------------------------------------------------------
# durable per page: kill at every write step
# ----------------------------------------------------------------------------------------------------
class LoggedRunner(InstantRunner):
    """Appends a line to ``log`` for every page it answers (the count survives the process)."""

    def __init__(self, log: Path) -> None:
        super().__init__()
        self.log = log

    def generate(self, request, *, cancel=None):
        result = super().generate(request, cancel=cancel)
        with open(self.log, "a") as handle:
            handle.write("page\n")
        return result


def _killed_run(images: Path, out: Path, step: int, log: Path) -> int:
    """Fork a child that runs ingest with the fault hook set to ``step``; returns its exit code."""
    pid = os.fork()
    if pid == 0:  # the child: dies at write step `step` (os._exit, as kill -9), or finishes
        code = 0
        try:
            os.environ[FAULT_ENV] = str(step)
            ingest([images], out, hd=HD4K(LoggedRunner(log)), model="m", shard_size=3, **FAST)
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_kill_at_any_write_step_loses_at_most_the_page_in_flight(images, expected, tmp_path) -> None:
    pages = sum(1 for r in expected if r.ok)
    step = 0
    while True:
        step += 1
        out, log = tmp_path / f"out{step}", tmp_path / f"calls{step}"
        log.touch()
        code = _killed_run(images, out, step, log)
        if code == 0:
            break  # past the last write step: the run finished
        assert code == FAULT_EXIT_CODE, f"step {step}: the child failed ({code})"
        transcribed = len(log.read_text().splitlines())
        rows = _jsonl_rows(out) if (out / JSONL_DIR).is_dir() else []
        on_disk = len({row["key"] for row in rows if row["error"] is None and row["text"]})
        # Every page the killed run finished is on disk, but the one it was writing.
        assert transcribed - on_disk <= 1, f"step {step}: {transcribed} pages read, {on_disk} on disk"
        rerun = InstantRunner()
        manifest = ingest([images], out, hd=HD4K(rerun), model="m", shard_size=3, **FAST)
        assert manifest.status == "complete"
        # The rerun does exactly the pages that were not on disk: none twice.
        assert rerun.calls == pages - on_disk, f"step {step}"
        assert _content(iter_records(out)) == _content(expected), f"step {step}"
        _assert_parquet_equals_jsonl(out)
        assert Manifest.load(out).runs[-1].status == "complete"
    assert step > 20, "the fault hook did not reach the write steps"


def test_resume_repairs_a_missing_parquet_file_and_a_torn_line(images, expected, tmp_path) -> None:
    out = tmp_path / "out"
    ingest([images], out, hd=HD4K(InstantRunner()), model="m", shard_size=3, **FAST)
    parts = shard_paths(out)
    (out / PARQUET_DIR / f"{parts[0].stem}.parquet").unlink()
    with open(parts[1], "ab") as handle:
        handle.write(b'{"key": "half a line')
    rerun = InstantRunner()
    ingest([images], out, hd=HD4K(rerun), model="m", shard_size=3, **FAST)
    assert rerun.calls == 0
    assert parts[1].read_bytes().endswith(b"}\n")
    _assert_parquet_equals_jsonl(out)
    assert _content(iter_records(out)) == _content(expected)


_SLOW_RUN = """
import sys, time
from hd4k_tools import HD4K, ingest
from hd4k_tools.ingestion.standin import InstantRunner

class Slow(InstantRunner):
    def generate(self, request, *, cancel=None):
        time.sleep(0.3)
        return super().generate(request, cancel=cancel)

ingest([sys.argv[1]], sys.argv[2], hd=HD4K(Slow()), model="m", hd_num=1, shard_size=100, progress=False)
"""


def test_sigterm_is_handled_like_ctrl_c(images, tmp_path) -> None:
    """SIGTERM mid-run: the open part is closed (its Parquet file written), the manifest says
    "interrupted", and the rerun does only the pages that were not finished."""
    out = tmp_path / "out"
    process = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(images), str(out)], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(_jsonl_rows(out) if (out / JSONL_DIR).is_dir() else []) >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode != 0 and b"Terminated" in stderr
    manifest = Manifest.load(out)
    assert manifest.status == "interrupted" and manifest.runs[-1].status == "interrupted"
    kept = _jsonl_rows(out)
    assert 3 <= len(kept) < 8
    _assert_parquet_equals_jsonl(out)  # written on the way out, no repair needed
    rerun = InstantRunner()
    again = ingest([images], out, hd=HD4K(rerun), model="m", **FAST)
    assert again.pages_skipped == len(kept) and rerun.calls == 7 - sum(1 for r in kept if r["error"] is None)
