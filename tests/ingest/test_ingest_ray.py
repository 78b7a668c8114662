"""hd4k ingest on Ray Data: a local Ray (one session for the module), 2 transcription actors over the
tiny checkpoint; the records equal local mode's, and a rerun skips what is done."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from hd4k_tools import ingest
from hd4k_tools.cli import main
from hd4k_tools.ingestion import Manifest, iter_records
from hd4k_tools.ingestion.shards import JSONL_DIR, PARQUET_DIR, shard_paths

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One local Ray for the module (starting Ray costs seconds on 2 cores); ingest uses it as it is. Its
    session files go to a private temp dir, removed with the session: the machine's /tmp/ray is left alone."""
    temp = tempfile.mkdtemp(prefix="hd4k-ray-", dir="/tmp")  # short: Ray's socket paths are limited
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def _content(records):
    return [r.content() for r in records]


@pytest.fixture(scope="module")
def ray_run(corpus, tiny_checkpoint, tmp_path_factory, fast):
    out = tmp_path_factory.mktemp("ingest_ray") / "out"
    manifest = ingest(
        [corpus["root"]],
        out,
        model=str(tiny_checkpoint),
        device="cpu",
        dtype="float32",
        ray=True,
        workers=2,
        batch_size=2,
        shard_size=2,
        progress=False,
        **fast,
    )
    return manifest, out


def test_ray_mode_writes_the_same_records_as_local_mode(ray_run, reference) -> None:
    manifest, out = ray_run
    _, expected = reference
    assert manifest.status == "complete" and manifest.mode == "ray" and manifest.workers == 2
    assert (manifest.pages_total, manifest.pages_done, manifest.pages_failed) == (11, 8, 3)
    assert _content(iter_records(out)) == _content(expected)
    assert manifest.duplicates == reference[0].duplicates
    assert ray.is_initialized(), "a Ray session the caller started is left running"
    # The Parquet shards the Ray writers made are one dataset for Ray Data too.
    table = ray.data.read_parquet(str(out / PARQUET_DIR))
    assert table.count() == 11 and sorted(table.schema().names) == sorted(type(expected[0]).model_fields)


def test_ray_rerun_skips_everything_done(ray_run, tiny_checkpoint, corpus, fast) -> None:
    _, out = ray_run
    again = ingest([corpus["root"]], out, model=str(tiny_checkpoint), device="cpu", dtype="float32", ray=True,
                   workers=2, progress=False, **fast)  # fmt: skip
    assert (again.pages_skipped, again.pages_done, again.pages_failed) == (11, 0, 0)


def test_ray_resume_redoes_only_lost_shards(ray_run, reference, tiny_checkpoint, corpus, fast, tmp_path) -> None:
    _, out = ray_run
    # A copy of the finished output that lost two shards (as if the run had died before writing them).
    partial = tmp_path / "out"
    (partial / JSONL_DIR).mkdir(parents=True)
    (partial / PARQUET_DIR).mkdir(parents=True)
    shards = shard_paths(out)
    for path in shards[2:]:
        (partial / JSONL_DIR / path.name).write_bytes(path.read_bytes())
        parquet = f"{path.stem}.parquet"
        (partial / PARQUET_DIR / parquet).write_bytes((out / PARQUET_DIR / parquet).read_bytes())
    (partial / "manifest.json").write_bytes((out / "manifest.json").read_bytes())
    lost = {r.key for p in shards[:2] for r in _records_of(p)}
    assert lost
    code = main([
        "ingest", str(corpus["root"]), "--out", str(partial), "--model", str(tiny_checkpoint), "--device", "cpu",
        "--dtype", "float32", "--hd-num", str(fast["hd_num"]), "--dpi", str(fast["dpi"]),
        "--max-new-tokens", str(fast["generation"]["max_new_tokens"]), "--workers", "2", "--allow-failures", "--ray",
    ])  # fmt: skip
    assert code == 0
    manifest = Manifest.load(partial)
    assert manifest.pages_done + manifest.pages_failed == len(lost)
    assert _content(iter_records(partial)) == _content(reference[1])


def _records_of(path: Path):
    from hd4k_tools.ingestion.shards import read_shard

    return list(read_shard(path))
