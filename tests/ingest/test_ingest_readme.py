"""The README's "Ingest a corpus" commands work as written: the try-it command, the reading example
(pyarrow, DuckDB) and the indexing example run verbatim; the cluster command runs against a real Ray
cluster (``ray start --head`` in a private temp dir, stopped cleanly) with this machine's paths and worker
count put in."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from servers import free_port

from hd4k_tools.ingestion import Manifest, iter_records

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("\n## Ingest a corpus\n", 1)[1].split("\n## ", 1)[0]


def _blocks(language: str) -> list[str]:
    return [b.strip() for b in re.findall(rf"```{language}\n(.*?)```", _section(), flags=re.S)]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HD4K_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the repository for the README's relative paths: .venv and examples/."""
    work = tmp_path_factory.mktemp("readme_ingest")
    (work / ".venv").symlink_to(Path(sys.prefix))
    shutil.copytree(ROOT / "examples", work / "examples")
    return work


def test_try_it_command_and_index_example_run_as_written(workdir: Path) -> None:
    try_it = _blocks("bash")[0]
    assert try_it.startswith(".venv/bin/hd4k make-tiny-checkpoint tiny && .venv/bin/hd4k ingest examples/")
    run = subprocess.run(["bash", "-c", try_it], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "ingested 1 pages (0 failed" in run.stdout
    (record,) = iter_records(workdir / "ingest-out")
    assert record.source.endswith("examples/page.png") and record.hd_num == 9 and record.text

    read_code, index_code = _blocks("python")
    for name, code, expected in [("read", read_code, ["1", "1"]), ("index", index_code, [record.source, "1"])]:
        script = workdir / f"{name}_example.py"
        script.write_text(code)
        run = subprocess.run(
            [sys.executable, str(script)], cwd=workdir, env=_env(), capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.splitlines() == expected


@pytest.mark.slow
def test_cluster_command_runs_on_a_ray_cluster(workdir: Path, corpus, tiny_checkpoint) -> None:
    pytest.importorskip("ray")
    cluster = next(b for b in _blocks("bash") if "--ray auto" in b)
    port = free_port()
    # Ray's token authentication: the head and the driver share this test's own token.
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {**_env(), "RAY_ADDRESS": f"127.0.0.1:{port}", **token}
    # A private temp dir: the cluster's session files and its cluster-address file live there, not in the
    # machine's /tmp/ray (where a file left behind would send every later `--ray auto` to a dead address).
    temp = Path(tempfile.mkdtemp(prefix="hd4k-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=3", "--include-dashboard=false",
         "--disable-usage-stats", f"--temp-dir={temp}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out = workdir / "cluster-out"
        argv = shlex.split(cluster, comments=True)  # the block starts with a "# needs:" line
        argv[0] = str(BIN / "hd4k")
        replace = {
            "/shared/archive": str(corpus["root"]),
            "/shared/ingest-out": str(out),
            "/shared/models/internlm-xcomposer2-4khd-7b": str(tiny_checkpoint),
            "8": "2",  # --workers: this cluster has 3 CPUs
        }
        argv = [replace.get(a, a) for a in argv]
        # The corpus holds a broken and a locked PDF: failed pages are expected here.
        argv += ["--hd-num", "2", "--dpi", "36", "--max-new-tokens", "4", "--batch-size", "2", "--allow-failures"]
        deadline = time.monotonic() + 60
        run = None
        while time.monotonic() < deadline:  # the head takes a few seconds to accept drivers
            run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
            if run.returncode == 0 or "cannot join the Ray cluster" not in run.stderr:
                break
            time.sleep(2)
        assert run is not None and run.returncode == 0, run.stderr[-3000:] if run else "no run"
        manifest = Manifest.load(out)
        assert manifest.mode == "ray" and manifest.workers == 2
        assert (manifest.pages_total, manifest.pages_done, manifest.pages_failed) == (11, 8, 3)
    finally:
        _stop_head(head, temp)


def _stop_head(head: subprocess.Popen, temp: Path) -> None:
    """Stop this test's cluster and only it (``ray stop`` would stop every Ray of this user on the machine):
    SIGTERM to ``ray start --block`` shuts down the processes it started; any left (their command lines name
    the private temp dir) are killed by pid; then the temp dir goes, cluster file and all."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        head.kill()
        head.wait()
    deadline = time.monotonic() + 30
    while _processes_naming(temp) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _processes_naming(temp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(temp, ignore_errors=True)


def _processes_naming(path: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(path).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids
