"""hd4k ingest fails loudly and records honestly: arguments refused before any model loads, systemic
failure stops early (exit 1), failed pages give exit 3, Ray clusters that do not answer are refused in
seconds, --out problems are one line (exit 2); records name their source faithfully (odd names,
symlinks, duplicates, changed files), the model identity is canonical, PDF pages are rendered under time
and memory limits, and both loaders refuse what is not ingest output. Stand-in engine unless a model is
needed."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from ingest_corpus import bomb_pdf, make_images, pdf_bytes

from hd4k_tools import HD4K, errors, ingest
from hd4k_tools.cli import main
from hd4k_tools.ingestion import (
    ENGINES,
    IngestOptions,
    IngestOutputError,
    Manifest,
    SystemicFailureError,
    iter_records,
)
from hd4k_tools.ingestion.shards import JSONL_DIR, PARQUET_DIR
from hd4k_tools.ingestion.standin import InstantRunner
from hd4k_tools.runtime.engines import ENGINES as ENGINE_REGISTRY

FAST = {"hd_num": 1, "progress": False}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("hd4k: error: ") and err.count("\n") == 1, err
    return err


# ----------------------------------------------------------------------------------------------------
# fail loudly
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-new-tokens", "0"], "max_new_tokens must be an int in [1,"),
        (["--engine", "native", "--remote", "http://127.0.0.1:9/v1"], "conflict"),
        (["--render-timeout", "0"], "render_timeout_s=0.0 must be a positive number"),
    ],
)
def test_arguments_that_fail_every_page_are_refused_before_the_model_loads(tmp_path, capsys, argv, message) -> None:
    image = make_images(tmp_path / "docs", 1)[0]
    # The model does not exist: it is never opened, the options are checked first.
    assert main(["ingest", str(image), "--out", str(tmp_path / "o"), "--model", str(tmp_path / "none"), *argv]) == 2
    assert message in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_pages_failing_the_same_way_stop_the_run_early(tmp_path) -> None:
    images = make_images(tmp_path / "docs", 12)
    down = InstantRunner(fail_with=errors.RemoteConnectionError("connection refused"))
    out = tmp_path / "out"
    with pytest.raises(SystemicFailureError, match="3 pages in a row failed with RemoteConnectionError"):
        ingest(images, out, hd=HD4K(down), model="m", max_consecutive_failures=3, **FAST)
    assert down.calls == 3
    manifest = Manifest.load(out)
    assert manifest.status == "failed" and manifest.errors == {"RemoteConnectionError": 3}
    # Those error records are not final: a rerun with a working engine does them.
    working = InstantRunner()
    assert ingest(images, out, hd=HD4K(working), model="m", **FAST).pages_done == 12 and working.calls == 12


def test_an_unreachable_server_is_detected_at_once_with_exit_1(tmp_path, capsys) -> None:
    image = make_images(tmp_path / "docs", 1)[0]
    start = time.monotonic()
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    assert main(["ingest", str(image), "--out", str(tmp_path / "o"), "--remote", url, "--model", "m"]) == 1
    assert time.monotonic() - start < 8
    assert f"cannot reach the server at {url}" in _one_line_error(capsys)
    assert Manifest.load(tmp_path / "o").status == "failed"


def test_failed_pages_give_a_non_zero_exit_and_a_summary(tmp_path, capsys) -> None:
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage")
    notes = tmp_path / "notes.pdf"
    notes.write_text("a text file named .pdf\n")
    argv = ["ingest", str(broken), str(notes), "--out", str(tmp_path / "o"), "--model", "m"]
    assert main(argv) == 3  # no page to transcribe: no model is opened
    captured = capsys.readouterr()
    assert "2 pages failed: PDFError 1, UnsupportedFormatError 1" in captured.err
    assert "--allow-failures" in captured.err
    assert main(argv) == 3  # the rerun skips them, and still says they failed
    assert "failed for good in earlier runs" in capsys.readouterr().err
    assert main([*argv, "--allow-failures"]) == 0
    records = {Path(r.source).name: r.error for r in iter_records(tmp_path / "o")}
    assert "is a text file, not a PDF or an image" in records["notes.pdf"].message


def test_joining_a_ray_cluster_that_does_not_answer_fails_in_seconds(tmp_path, capsys, monkeypatch) -> None:
    pytest.importorskip("ray")
    image = make_images(tmp_path / "docs", 1)[0]
    dead = f"127.0.0.1:{_closed_port()}"
    base = ["ingest", str(image), "--out", str(tmp_path / "o"), "--model", "m"]
    start = time.monotonic()
    assert main([*base, f"--ray={dead}"]) == 2
    assert f"cannot join the Ray cluster at '{dead}': nothing answers at {dead}" in _one_line_error(capsys)
    # `--ray auto` with a stale cluster file (a cluster stopped without `ray stop`) names the file.
    import ray._private.utils as ray_utils

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_utils, "read_ray_address", lambda temp_dir=None: dead)
    assert main([*base, "--ray=auto"]) == 2
    err = _one_line_error(capsys)
    assert "the cluster file" in err and "stale cluster file" in err
    assert time.monotonic() - start < 20


def test_out_problems_are_one_line_errors(tmp_path, capsys) -> None:
    image = make_images(tmp_path / "docs", 1)[0]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    shards_file = tmp_path / "o1"
    shards_file.mkdir()
    (shards_file / JSONL_DIR).write_text("x")
    manifest_dir = tmp_path / "o2"
    (manifest_dir / "manifest.json").mkdir(parents=True)
    for out, message in [
        (a_file, "is a file, not a folder"),
        (a_file / "sub", "cannot create the --out folder"),
        (shards_file, "is a file; move it away"),
        (manifest_dir, "manifest.json is not a file"),
    ]:
        assert main(["ingest", str(image), "--out", str(out), "--model", "m"]) == 2
        assert message in _one_line_error(capsys)
    # A stray folder where temporary files go is not ours: left alone, and the run completes.
    out = tmp_path / "o3"
    (out / JSONL_DIR / ".tmp-x").mkdir(parents=True)
    assert ingest([image], out, hd=HD4K(InstantRunner()), model="m", **FAST).status == "complete"
    assert (out / JSONL_DIR / ".tmp-x").is_dir()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: no unwritable folder to test with")
def test_an_unwritable_out_is_a_one_line_error(tmp_path, capsys) -> None:
    image = make_images(tmp_path / "docs", 1)[0]
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["ingest", str(image), "--out", str(locked / "out"), "--model", "m"]) == 2
        assert "cannot create the --out folder" in _one_line_error(capsys)
    finally:
        locked.chmod(0o700)


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return ok.returncode == 0


def test_a_full_disk_is_a_one_line_error_and_leaves_nothing_half_written(tmp_path, capsys, monkeypatch) -> None:
    images = make_images(tmp_path / "docs", 40)
    disk = tmp_path / "disk"
    mounted = os.geteuid() == 0 and _tmpfs(disk, "96k")
    try:
        out = disk / "out"
        if not mounted:  # no tmpfs to fill: the 60th write of record lines fails as a full disk would
            import errno

            from hd4k_tools.ingestion import shards

            real_open, writes = open, [0]

            class Full:
                def __init__(self, handle) -> None:
                    self.handle = handle

                def __getattr__(self, name):
                    return getattr(self.handle, name)

                def write(self, data):
                    writes[0] += 1
                    if writes[0] >= 60:
                        raise OSError(errno.ENOSPC, "No space left on device")
                    return self.handle.write(data)

            def fake_open(path, mode="r", *args, **kwargs):
                handle = real_open(path, mode, *args, **kwargs)
                return Full(handle) if mode == "xb" else handle

            monkeypatch.setattr(shards, "open", fake_open, raising=False)
        with pytest.raises(IngestOutputError, match=r"No space left on device.*nothing half-written") as info:
            ingest(images, out, hd=HD4K(InstantRunner()), model="m", shard_size=4, **FAST)
        assert "\n" not in str(info.value)
        for part in (out / JSONL_DIR).glob("*.jsonl"):  # whole lines only
            data = part.read_bytes()
            assert not data or data.endswith(b"\n")
        assert not list((out / PARQUET_DIR).glob(".tmp-*")) and not list((out / JSONL_DIR).glob(".tmp-*"))
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
        monkeypatch.undo()
        again = ingest(images, out, hd=HD4K(InstantRunner()), model="m", shard_size=4, **FAST)
        assert again.status == "complete" and len(list(iter_records(out))) == 40
    finally:
        if mounted and subprocess.run(["umount", str(disk)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=False)


def test_engine_names_come_from_the_engine_registry() -> None:
    assert (*ENGINE_REGISTRY, "remote") == ENGINES
    with pytest.raises(errors.InputError, match="not supported"):
        IngestOptions(model="m", engine="tensorrt")


def test_settings_object_and_keywords_are_the_same_call(tmp_path) -> None:
    images = make_images(tmp_path / "docs", 2)
    options = IngestOptions(model="m", hd_num=1, progress=False)
    a = ingest(images, tmp_path / "a", options, hd=HD4K(InstantRunner()))
    b = ingest(images, tmp_path / "b", hd=HD4K(InstantRunner()), model="m", hd_num=1, progress=False)
    c = ingest(images, tmp_path / "c", options, hd=HD4K(InstantRunner()), hd_num=2)  # a keyword replaces a field
    assert [r.content() for r in a.records()] == [r.content() for r in b.records()]
    assert {r.hd_num for r in c.records()} == {2}
    with pytest.raises(TypeError):
        ingest(images, tmp_path / "d", hd=HD4K(InstantRunner()), model="m", hdnum=1)


# ----------------------------------------------------------------------------------------------------
# honest records
# ----------------------------------------------------------------------------------------------------
def test_a_file_changed_after_planning_gets_no_record_under_its_old_hash(tmp_path, monkeypatch) -> None:
    import hd4k_tools.ingestion as ingestion

    docs = tmp_path / "docs"
    image = make_images(docs, 1)[0]
    other_image = make_images(tmp_path / "other", 2)[1].read_bytes()
    pdf = docs / "doc.pdf"
    pdf.write_bytes(pdf_bytes([make_page(1), make_page(2)]))
    real = ingestion.describe_file

    def describe_then_change(source, pages, policy):
        info = real(source, pages, policy)
        # The file is replaced between planning (hashing) and rendering.
        Path(source).write_bytes(other_image if source.endswith(".png") else pdf_bytes([make_page(3)]))
        return info

    monkeypatch.setattr(ingestion, "describe_file", describe_then_change)
    runner = InstantRunner()
    manifest = ingest([image, pdf], tmp_path / "out", hd=HD4K(runner), model="m", **FAST)
    assert runner.calls == 0 and manifest.pages_failed == 3
    records = list(iter_records(tmp_path / "out"))
    assert {r.error.type for r in records} == {"SourceChangedError"}
    assert not any(r.error.final for r in records)  # retried by the next run, which hashes the new bytes
    monkeypatch.undo()
    again = ingest([image, pdf], tmp_path / "out", hd=HD4K(InstantRunner()), model="m", **FAST)
    assert again.pages_done == 2 and again.pages_failed == 0


def make_page(i: int):
    from PIL import Image

    return Image.new("RGB", (200, 260), (i * 60 % 256, 100, 200))


def test_one_checkpoint_named_two_ways_keys_its_pages_once(tmp_path, monkeypatch) -> None:
    images = make_images(tmp_path / "docs", 3)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text('{"architectures": ["X"]}')
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    ingest(images, out, hd=HD4K(InstantRunner()), model="ckpt", **FAST)
    second = InstantRunner()
    again = ingest(images, out, hd=HD4K(second), model=str(checkpoint) + "/", **FAST)
    assert second.calls == 0 and again.pages_skipped == 3 and len(list(iter_records(out))) == 3
    # Another checkpoint under the same path is another model.
    (checkpoint / "config.json").write_text('{"architectures": ["Y"]}')
    third = InstantRunner()
    ingest(images, out, hd=HD4K(third), model="ckpt", **FAST)
    assert third.calls == 3 and len(list(iter_records(out))) == 6


def test_names_that_are_not_utf8_are_recorded_losslessly(tmp_path) -> None:
    docs = tmp_path / "docs"
    (source,) = make_images(docs, 1)
    odd = os.path.join(os.fsencode(docs), b"scan-\xff\xfe.png")
    os.rename(source, odd)
    (docs / "caf\u00e9 \u2013 r\u00e9sum\u00e9.png").write_bytes(Path(make_images(tmp_path / "x", 2)[1]).read_bytes())
    out = tmp_path / "out"
    manifest = ingest([docs], out, hd=HD4K(InstantRunner()), model="m", **FAST)
    assert manifest.pages_done == 2 and manifest.pages_failed == 0
    by_name = {Path(r.source).name: r for r in iter_records(out)}
    odd_record = by_name["scan-\\xff\\xfe.png"]
    assert base64.b64decode(odd_record.source_bytes) == odd
    assert os.fsencode(odd_record.source_path()) == odd and os.path.isfile(odd_record.source_path())
    assert by_name["caf\u00e9 \u2013 r\u00e9sum\u00e9.png"].source_bytes is None
    import pyarrow.dataset as ds

    assert ds.dataset(out / PARQUET_DIR).to_table().num_rows == 2


def test_symlinks_out_of_the_inputs_are_not_followed(tmp_path) -> None:
    outside = tmp_path / "outside"
    make_images(outside, 2, prefix="private")  # private0001.png: content found nowhere in the corpus
    corpus = tmp_path / "corpus"
    (inside,) = make_images(corpus, 1)
    (corpus / "leak.png").symlink_to(outside / "private0001.png")
    (corpus / "alias.png").symlink_to(inside)  # inside the corpus: fine (a duplicate)
    (corpus / "sub").symlink_to(outside, target_is_directory=True)
    out = tmp_path / "out"
    manifest = ingest([corpus, str(corpus / "**" / "*.png")], out, hd=HD4K(InstantRunner()), model="m", **FAST)
    assert [Path(r.source).name for r in manifest.records()] == ["alias.png"]
    skipped = sorted(Path(p).name for p in manifest.skipped_links)
    assert skipped == ["leak.png", "private0000.png", "private0001.png", "sub"]
    assert list(manifest.duplicates.values()) == [[str(corpus / "alias.png"), str(inside)]]

    followed = ingest([corpus], tmp_path / "out2", hd=HD4K(InstantRunner()), model="m", follow_symlinks=True, **FAST)
    sources = sorted(r.source for r in followed.records())
    # The path as given is recorded, not the target's.
    assert sources == [str(corpus / "alias.png"), str(corpus / "leak.png")]


def test_duplicates_keep_the_first_path_given_and_manifest_paths_are_absolute(tmp_path, monkeypatch) -> None:
    (a,) = make_images(tmp_path / "a", 1)
    b = tmp_path / "b.png"
    b.write_bytes(a.read_bytes())
    monkeypatch.chdir(tmp_path)
    manifest = ingest(["b.png", "a"], "out", hd=HD4K(InstantRunner()), model="m", **FAST)
    assert [r.source for r in manifest.records()] == [str(b)]
    assert list(manifest.duplicates.values()) == [[str(b), str(a)]]
    assert manifest.out == str(tmp_path / "out") and manifest.inputs == [str(b), str(a)]
    ingest(["b.png"], "out", hd=HD4K(InstantRunner()), model="m", **FAST)
    monkeypatch.chdir("/")
    loaded = Manifest.load(tmp_path / "out")
    assert len(list(loaded.records())) == 1  # absolute out: found from any folder
    assert [run.pages_done for run in loaded.runs] == [1, 0] and loaded.runs[1].pages_skipped == 1


# ----------------------------------------------------------------------------------------------------
# bounded per file
# ----------------------------------------------------------------------------------------------------
def test_a_content_bomb_page_becomes_an_error_record_not_a_stall(tmp_path) -> None:
    pytest.importorskip("pypdfium2")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "bomb.pdf").write_bytes(bomb_pdf(20000))  # seconds of pdfium work for ~100 KB
    (docs / "fine.pdf").write_bytes(pdf_bytes([make_page(1)]))
    start = time.monotonic()
    manifest = ingest(
        [docs], tmp_path / "out", hd=HD4K(InstantRunner()), model="m", dpi=36, render_timeout_s=0.5, **FAST
    )
    assert time.monotonic() - start < 30
    records = {Path(r.source).name: r for r in manifest.records()}
    assert records["bomb.pdf"].error.type == "RenderLimitError" and records["bomb.pdf"].error.final
    assert "longer than 0.5 s" in records["bomb.pdf"].error.message
    assert records["fine.pdf"].ok  # the worker was replaced and the run went on


def test_a_page_over_the_render_memory_limit_becomes_an_error_record(tmp_path) -> None:
    pytest.importorskip("pypdfium2")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "big.pdf").write_bytes(pdf_bytes([make_page(1)], resolution=10))  # 1440 x 1872 pt
    manifest = ingest(
        [docs], tmp_path / "out", hd=HD4K(InstantRunner()), model="m", dpi=300, render_memory_mb=64, **FAST
    )
    (record,) = manifest.records()
    assert record.error is not None and record.error.final, record


# ----------------------------------------------------------------------------------------------------
# loaders
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["missing", "file", "not ingest output"])
def test_loaders_refuse_what_is_not_ingest_output(tmp_path, what) -> None:
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from langchain_hd4k import HD4KIngestLoader
    from llama_index_hd4k import HD4KIngestReader

    path = tmp_path / "out"
    if what == "file":
        path.write_text("x")
    elif what == "not ingest output":
        path.mkdir()
        (path / "notes.txt").write_text("x")
    for load in (HD4KIngestLoader(path).load, lambda: HD4KIngestReader().load_data(path)):
        with pytest.raises(IngestOutputError, match=str(path)):
            load()
