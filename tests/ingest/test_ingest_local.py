"""hd4k ingest in local mode: records, faults, duplicates, shards, resume, interruption, CLI."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import hd4k_tools
from hd4k_tools import HD4K, errors, ingest
from hd4k_tools.cli import main
from hd4k_tools.ingestion import IngestOutputError, Manifest, iter_records, record_key
from hd4k_tools.ingestion.corpus import clip_pages, list_inputs
from hd4k_tools.ingestion.progress import IngestProgress
from hd4k_tools.ingestion.records import ingest_prompt
from hd4k_tools.ingestion.shards import JSONL_DIR, PARQUET_DIR, shard_paths
from hd4k_tools.ingestion.work import model_identity

EXPECTED_PAGES = {
    ("copy of report.pdf", 1),
    ("copy of report.pdf", 2),
    ("copy of report.pdf", 3),
    ("letter.pdf", 1),
    ("letter.pdf", 2),
    ("huge.pdf", 1),
    ("huge.pdf", 2),
    ("scan.png", 1),
    ("photo.jpg", 1),
    ("broken.pdf", None),
    ("locked.pdf", None),
}


def _content(records) -> list[dict[str, Any]]:
    return [r.content() for r in records]


class CountingRunner:
    """Wraps a runner: counts model calls, and raises KeyboardInterrupt on call ``interrupt_at`` (as if
    the user pressed Ctrl-C during that page)."""

    def __init__(self, runner: Any, interrupt_at: int | None = None) -> None:
        self._runner = runner
        self.calls = 0
        self.interrupt_at = interrupt_at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def generate(self, request, *, cancel=None):
        if self.interrupt_at is not None and self.calls + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        result = self._runner.generate(request, cancel=cancel)
        self.calls += 1
        return result


# ----------------------------------------------------------------------------------------------------
# records
# ----------------------------------------------------------------------------------------------------
def test_every_page_and_image_becomes_one_record(reference, corpus, tiny_checkpoint) -> None:
    manifest, records = reference
    assert manifest.status == "complete"
    assert {(Path(r.source).name, r.page) for r in records} == EXPECTED_PAGES
    assert (manifest.pages_total, manifest.pages_done, manifest.pages_failed, manifest.pages_skipped) == (11, 8, 3, 0)
    for record in records:
        assert record.model == str(tiny_checkpoint)
        assert record.content_hash.startswith("sha256:")
        if record.ok:
            assert record.text and record.hd_num == 2 and record.grid == "1x1"
            assert record.tokens.image > 0 and record.tokens.completion > 0
            assert record.timings.model_s > 0 and record.timings.render_s > 0
            expected = 3 if "report" in record.source else 2 if Path(record.source).suffix == ".pdf" else 1
            assert record.page_count == expected
            # The key holds the checkpoint's identity (real path + config hash), not the string typed.
            identity = model_identity(str(tiny_checkpoint))
            assert record.model_id == identity and identity.startswith(
                str(tiny_checkpoint.resolve()) + "#config-sha256:"
            )
            assert record.key == record_key(record.content_hash, record.page, 2, identity, ingest_prompt())


def test_faults_become_typed_error_records(reference) -> None:
    _, records = reference
    failed = {Path(r.source).name: r for r in records if not r.ok}
    assert set(failed) == {"broken.pdf", "locked.pdf", "huge.pdf"}
    assert failed["locked.pdf"].error.type == "EncryptedPDFError"
    assert "password" in failed["locked.pdf"].error.message
    assert failed["broken.pdf"].error.type == "PDFError"
    assert failed["huge.pdf"].error.type == "ImageTooLargeError" and failed["huge.pdf"].page == 2
    assert "max_pixels" in failed["huge.pdf"].error.message
    assert all(r.error.final and r.text == "" for r in failed.values())
    # The good page of huge.pdf went on.
    assert any(Path(r.source).name == "huge.pdf" and r.page == 1 and r.ok for r in records)


def test_duplicate_files_are_transcribed_once(reference, corpus) -> None:
    manifest, records = reference
    report_hash = next(r.content_hash for r in records if "report" in r.source)
    assert sorted(manifest.duplicates[report_hash]) == sorted(
        [str(corpus["report"].resolve()), str(corpus["duplicate"].resolve())]
    )
    assert sum(1 for r in records if r.content_hash == report_hash) == 3


def test_shards_are_jsonl_and_parquet_with_the_same_records(reference) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    manifest, records = reference
    jsonl = shard_paths(manifest.out)
    assert [p.stem for p in jsonl] == manifest.shards
    rows = [json.loads(line) for p in jsonl for line in p.read_text().splitlines()]
    out = Path(manifest.out)
    table_rows = [row for p in jsonl for row in pq.read_table(out / PARQUET_DIR / f"{p.stem}.parquet").to_pylist()]
    assert sorted(r["key"] for r in rows) == sorted(r["key"] for r in table_rows) == sorted(r.key for r in records)
    by_key = {r["key"]: r for r in table_rows}
    assert all(by_key[r.key]["text"] == r.text for r in records)
    on_disk = Manifest.load(manifest.out)
    assert on_disk.status == "complete" and on_disk.pages_done == 8
    assert not list((out / JSONL_DIR).glob(".tmp-*")) and not list((out / PARQUET_DIR).glob(".tmp-*"))


def test_ingest_is_exported_from_the_package() -> None:
    assert hd4k_tools.ingest is ingest and callable(ingest)


# ----------------------------------------------------------------------------------------------------
# resume, interruption, cancellation
# ----------------------------------------------------------------------------------------------------
def test_interrupted_run_resumes_without_transcribing_a_page_twice(
    reference, corpus, tiny_checkpoint, hd4k_tiny, tmp_path, fast
) -> None:
    _, expected = reference
    out = tmp_path / "out"
    first = CountingRunner(hd4k_tiny.runner, interrupt_at=4)  # Ctrl-C while the 4th page is read
    with pytest.raises(KeyboardInterrupt):
        ingest([corpus["root"]], out, hd=HD4K(first), model=str(tiny_checkpoint), shard_size=2, progress=False, **fast)
    assert first.calls == 3
    interrupted = Manifest.load(out)
    assert interrupted.status == "interrupted"
    # Every finished page (and the bad files) is in a valid shard.
    kept = list(iter_records(out))
    assert sum(1 for r in kept if r.ok) == 3

    second = CountingRunner(hd4k_tiny.runner)
    manifest = ingest(
        [corpus["root"]], out, hd=HD4K(second), model=str(tiny_checkpoint), shard_size=2, progress=False, **fast
    )
    assert second.calls == 8 - 3  # no page twice
    assert manifest.status == "complete" and manifest.pages_skipped == len(kept)
    assert _content(manifest.records()) == _content(expected)

    third = CountingRunner(hd4k_tiny.runner)
    again = ingest([corpus["root"]], out, hd=HD4K(third), model=str(tiny_checkpoint), progress=False, **fast)
    assert third.calls == 0 and again.pages_skipped == 11 and again.pages_done == 0


def test_resume_key_separates_hd_num_and_model(reference, corpus, hd4k_tiny, tmp_path, fast) -> None:
    out = tmp_path / "out"
    counting = CountingRunner(hd4k_tiny.runner)
    only_scan = [corpus["scan"]]
    ingest(only_scan, out, hd=HD4K(counting), model="m", progress=False, **fast)
    ingest(only_scan, out, hd=HD4K(counting), model="m", progress=False, **{**fast, "hd_num": 3})
    ingest(only_scan, out, hd=HD4K(counting), model="other", progress=False, **fast)
    ingest(only_scan, out, hd=HD4K(counting), model="m", progress=False, **fast)
    assert counting.calls == 3
    assert sorted((r.model, r.hd_num) for r in iter_records(out)) == [("m", 2), ("m", 3), ("other", 2)]


def test_other_settings_in_the_same_folder_are_refused(corpus, hd4k_tiny, tmp_path, fast) -> None:
    out = tmp_path / "out"
    ingest([corpus["scan"]], out, hd=hd4k_tiny, model="m", progress=False, **fast)
    with pytest.raises(IngestOutputError, match=r"dpi.*new --out folder"):
        ingest([corpus["scan"]], out, hd=hd4k_tiny, model="m", progress=False, **{**fast, "dpi": 50})


def test_cancel_event_stops_between_pages_and_keeps_finished_ones(corpus, hd4k_tiny, tmp_path, fast) -> None:
    cancel = threading.Event()

    class CancelAfterTwo(CountingRunner):
        def generate(self, request, *, cancel=None):
            result = super().generate(request, cancel=cancel)
            if self.calls == 2:
                cancel_event.set()
            return result

    cancel_event = cancel
    runner = CancelAfterTwo(hd4k_tiny.runner)
    with pytest.raises(errors.CancelledError):
        ingest([corpus["root"]], tmp_path / "out", hd=HD4K(runner), model="m", cancel=cancel, progress=False, **fast)
    assert runner.calls == 2
    assert sum(1 for r in iter_records(tmp_path / "out") if r.ok) == 2


def test_a_batching_runner_gets_pages_in_batches(corpus, hd4k_tiny, tmp_path, fast) -> None:
    class BatchingRunner(CountingRunner):
        def __init__(self, runner: Any) -> None:
            super().__init__(runner)
            self.batches: list[int] = []

        def generate_batch(self, requests, *, cancel=None):
            self.batches.append(len(requests))
            return [self._runner.generate(r, cancel=cancel) for r in requests]

    runner = BatchingRunner(hd4k_tiny.runner)
    manifest = ingest(
        [corpus["report"], corpus["letter"]],
        tmp_path / "out",
        hd=HD4K(runner),
        model="m",
        batch_size=4,
        progress=False,
        **fast,
    )
    assert runner.batches == [4, 1] and runner.calls == 0
    assert manifest.pages_done == 5


def test_a_killed_cli_run_restarts_and_ends_with_the_same_records(reference, corpus, tiny_checkpoint, tmp_path):
    """SIGKILL (no cleanup at all) after the first shards: the restart skips them and the final records
    equal the uninterrupted run's."""
    _, expected = reference
    out = tmp_path / "out"
    command = [
        str(Path(sys.executable).parent / "hd4k"), "ingest", str(corpus["root"]), "--out", str(out),
        "--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32", "--hd-num", "2", "--dpi", "36",
        "--max-new-tokens", "6", "--shard-size", "1", "--allow-failures",
    ]  # fmt: skip
    env = {**os.environ, "HD4K_NO_PROGRESS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(shard_paths(out)) < 4 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {r.key for r in iter_records(out)}
    assert 4 <= len(before) < 11, "the run was not killed midway"
    rerun = subprocess.run([*command, "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    manifest = Manifest.model_validate_json(rerun.stdout)
    assert manifest.pages_skipped == len(before)
    assert manifest.pages_done + manifest.pages_failed == 11 - len(before)
    assert _content(iter_records(out)) == _content(expected)


# ----------------------------------------------------------------------------------------------------
# inputs, progress, CLI
# ----------------------------------------------------------------------------------------------------
def test_inputs_are_files_folders_and_globs(corpus) -> None:
    root = corpus["root"]
    everything = list_inputs([root])
    assert len(everything) == 8 and not any(p.endswith(".txt") for p in everything)
    assert list_inputs([str(root / "**" / "*.pdf")]) == [p for p in everything if p.endswith(".pdf")]
    assert list_inputs([corpus["notes"]]) == [str(corpus["notes"].resolve())]  # named explicitly: taken
    with pytest.raises(errors.ImageNotFoundError, match="does not exist"):
        list_inputs([root / "missing.pdf"])
    with pytest.raises(errors.ImageNotFoundError, match="matches no file"):
        list_inputs([str(root / "*.docx")])
    with pytest.raises(errors.InputError, match="no input"):
        list_inputs([])


def test_page_selection_applies_to_each_document(corpus, hd4k_tiny, tmp_path, fast) -> None:
    assert clip_pages("2-", 3) == [1, 2] and clip_pages("1-5", 2) == [0, 1] and clip_pages("4", 2) == []
    manifest = ingest(
        [corpus["report"], corpus["letter"], corpus["scan"]],
        tmp_path / "out",
        hd=hd4k_tiny,
        model="m",
        pages="2-3",
        progress=False,
        **fast,
    )
    assert sorted((Path(r.source).name, r.page) for r in manifest.records()) == [
        ("letter.pdf", 2), ("report.pdf", 2), ("report.pdf", 3)
    ]  # fmt: skip


def test_plain_progress_lines_report_rate_and_eta(monkeypatch) -> None:
    monkeypatch.delenv("HD4K_NO_PROGRESS", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)  # not a terminal: plain lines
    stream = io.StringIO()
    bar = IngestProgress(4, progress=None, interval=0.0, stream=stream)
    bar.update(1)
    bar.update(3)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("hd4k ingest: 1/4 pages (25%), ") and "pages/min, ETA " in lines[0]
    assert lines[-1].startswith("hd4k ingest: 4/4 pages (100%)")


def test_cli_ingest_runs_and_reports(corpus, tiny_checkpoint, tmp_path, capsys) -> None:
    code = main([
        "ingest", str(corpus["scan"]), str(corpus["photo"]), "--out", str(tmp_path / "out"),
        "--model", str(tiny_checkpoint), "--device", "cpu", "--dtype", "float32",
        "--hd-num", "2", "--max-new-tokens", "4",
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.startswith("ingested 2 pages (0 failed, 0 already done, 0 duplicate files)")
    assert len(list(iter_records(tmp_path / "out"))) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "remote"], "needs the server's base URL"),
        (["--hd-num", "0"], "--hd-num must be at least 1"),
        (["--workers", "0"], "workers=0 must be a positive integer"),
    ],
)
def test_cli_refuses_bad_options_in_one_line(corpus, tmp_path, capsys, argv, message) -> None:
    assert main(["ingest", str(corpus["scan"]), "--out", str(tmp_path / "o"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hd4k: error: ") and message in err and err.count("\n") == 1


def test_ray_option_that_swallowed_an_input_is_refused(corpus, tmp_path, capsys) -> None:
    assert main(["ingest", "--out", str(tmp_path / "o"), "--ray", str(corpus["root"]), str(corpus["scan"])]) == 2
    assert "put the inputs before --ray" in capsys.readouterr().err


def test_engines_open_through_the_engine_registry(monkeypatch) -> None:
    from hd4k_tools.ingestion.work import EngineSpec

    calls: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(HD4K, "from_pretrained", classmethod(lambda cls, path, **k: calls.append((path, k))))
    EngineSpec(engine="native", model="m", device="cpu", dtype="float32").open()
    EngineSpec(engine="vllm", model="m").open()
    assert calls == [
        ("m", {"engine": "native", "device": "cpu", "dtype": "float32", "progress": False}),
        ("m", {"engine": "vllm"}),
    ]


def test_bad_arguments_are_refused(corpus, tmp_path, hd4k_tiny) -> None:
    with pytest.raises(errors.InputError, match="cancel= works in local mode only"):
        ingest([corpus["scan"]], tmp_path / "o", model="m", ray=True, cancel=threading.Event())
    with pytest.raises(errors.InputError, match="cannot be shipped to Ray actors"):
        ingest([corpus["scan"]], tmp_path / "o", hd=hd4k_tiny, ray="auto")
    with pytest.raises(errors.InvalidHDNumError):
        ingest([corpus["scan"]], tmp_path / "o", hd=hd4k_tiny, hd_num=0)
    with pytest.raises(errors.PageRangeError, match="runs backwards"):
        ingest([corpus["scan"]], tmp_path / "o", hd=hd4k_tiny, pages="3-1")
    with pytest.raises(errors.InputError, match="needs the server's base URL"):
        ingest([corpus["scan"]], tmp_path / "o", model="m", engine="remote")


def test_files_outside_the_policy_roots_are_refused_unread(corpus, hd4k_tiny, tmp_path, fast) -> None:
    from hd4k_tools import ImagePolicy

    policy = ImagePolicy(allowed_roots=(corpus["letter"].parent,))
    manifest = ingest([corpus["scan"], corpus["letter"]], tmp_path / "out", hd=hd4k_tiny, model="m", policy=policy,
                      progress=False, **fast)  # fmt: skip
    records = {Path(r.source).name: r for r in manifest.records()}
    assert records["scan.png"].error.type == "PathNotAllowedError"
    assert records["scan.png"].content_hash.startswith("path:")  # its bytes were never read
    assert records["letter.pdf"].ok and records["letter.pdf"].content_hash.startswith("sha256:")
