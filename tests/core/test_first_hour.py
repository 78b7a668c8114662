"""A new user's first hour (issue 23): offline fails fast and names both remedies, wrong arguments fail
before torch is imported, and each audience reads its own hint (the command line ``hd4k read``/``--model
DIR``, Python ``render_pages``/``HD4K.from_pretrained(DIR)``).

The network is never reached: the "Hub" is a closed or a counting socket on 127.0.0.1 (``$HF_ENDPOINT``).
The CLI runs in a subprocess where it must, since this process has imported torch long ago; a small
wrapper runs ``hd4k`` commands one after the other and reports whether torch got imported.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import huggingface_hub.constants
import pytest
from PIL import Image

from hd4k_tools.cli import checks
from hd4k_tools.cli.main import main
from hd4k_tools.errors import ModelNotFoundError, UnsupportedFormatError
from hd4k_tools.inputs.images import load_image
from hd4k_tools.models.xcomposer2_4khd import checkpoint
from hd4k_tools.models.xcomposer2_4khd.hub import DEFAULT_MODEL_ID, HubOptions, resolve_checkpoint_path

ROOT = Path(__file__).resolve().parents[2]

# Runs each argv list through hd4k's main() in this order; one JSON line: exit code, stderr, torch imported.
_WRAPPER = """
import contextlib, io, json, sys
from hd4k_tools.cli.main import main
report = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    report.append({"argv": argv, "code": code, "stderr": err.getvalue(), "torch": "torch" in sys.modules})
print(json.dumps(report))
"""


def _run_cli(commands: list[list[str]], env: dict[str, str], cwd: Path) -> list[dict]:
    run = subprocess.run(
        [sys.executable, "-c", _WRAPPER, json.dumps(commands)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


class CountingHub:
    """A TCP listener on 127.0.0.1 that counts connections and closes each at once (a Hub that never
    answers); ``url`` goes into ``$HF_ENDPOINT``."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def hub() -> Iterator[CountingHub]:
    server = CountingHub()
    yield server
    server.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _offline_env(tmp_path: Path, endpoint: str, *, hub_offline: bool = False) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HD4K_MODEL")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf-home"), NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")
    if hub_offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def _offline_commands(tmp_path: Path) -> list[list[str]]:
    page = str(ROOT / "examples" / "page.png")
    return [
        ["read", page],
        ["chart", page, "Which year is highest?"],
        ["describe", page],
        ["ingest", page, "--out", str(tmp_path / "ingest-out")],
        ["serve", "--port", "0"],
        ["mcp"],
    ]


def _assert_offline_line(result: dict) -> None:
    err = result["stderr"]
    assert result["code"] == 2, result
    assert err.startswith("hd4k") and err.count("\n") == 1, err  # one line
    assert "--model DIR" in err and "hd4k make-tiny-checkpoint" in err, err  # both remedies, CLI words
    assert "from_pretrained" not in err and "Retrying" not in err, err
    assert not result["torch"], f"{result['argv']}: torch imported before the offline error"


def test_unreachable_hub_one_attempt_per_command_and_both_remedies(tmp_path: Path, hub: CountingHub) -> None:
    """A Hub that takes connections but never answers: each model command tries it once, not five
    times with backoff (~30 s), and fails with one line naming --model DIR and the tiny checkpoint."""
    commands = _offline_commands(tmp_path)
    results = _run_cli(commands, _offline_env(tmp_path, hub.url), ROOT)
    for result in results:
        _assert_offline_line(result)
    assert 1 <= hub.connections <= len(commands), hub.connections


def test_refused_hub_and_hf_hub_offline_fail_at_once(tmp_path: Path, hub: CountingHub) -> None:
    """A closed port (no network), and $HF_HUB_OFFLINE=1 (not a single connection)."""
    page = str(ROOT / "examples" / "page.png")
    closed = _run_cli([["read", page]], _offline_env(tmp_path, f"http://127.0.0.1:{_closed_port()}"), ROOT)
    _assert_offline_line(closed[0])
    assert "cannot be reached" in closed[0]["stderr"]
    offline = _run_cli(_offline_commands(tmp_path), _offline_env(tmp_path, hub.url, hub_offline=True), ROOT)
    for result in offline:
        _assert_offline_line(result)
    assert hub.connections == 0


def test_python_reads_the_python_remedies(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: CountingHub) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_checkpoint_path(DEFAULT_MODEL_ID, HubOptions(cache_dir=tmp_path / "cache"))
    message = str(info.value)
    assert "HD4K.from_pretrained(DIR)" in message and "make_tiny_checkpoint" in message
    assert "--model" not in message and "hd4k make-tiny-checkpoint" not in message
    assert hub.connections == 1


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("first-hour")
    image = root / "page.png"
    Image.new("RGB", (1700, 2200), "white").save(image)
    pdf = root / "doc.pdf"
    pages = [Image.new("RGB", (200, 300), c) for c in ("white", "lightgray", "white")]
    pages[0].save(pdf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    text = root / "notes.png"
    text.write_text("not an image at all")
    tiny = make_tiny_checkpoint(root / "tiny")
    return {"image": image, "pdf": pdf, "text": text, "tiny": tiny, "root": root}


def test_wrong_arguments_fail_before_torch_is_imported(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Every check that needs no weights runs before torch/transformers are imported: hd_num against the
    checkpoint's context (its config.json), pages, files, image limits, device and dtype names."""
    f = {k: str(v) for k, v in inputs.items()}
    model = ["--model", f["tiny"]]
    cases = [
        (["read", f["image"], "--hd-num", "1000", *model], "--hd-num"),
        (["describe", f["image"], "--hd-num", "200", *model], "--hd-num"),
        (["chart", f["image"], "what?", "--hd-num", "500", *model], "--hd-num"),
        (["read", f["pdf"], "--hd-num", "1000", *model], "page 1"),
        (["read", f["pdf"], "--dpi", "20000", *model], "pixels"),
        (["read", f["pdf"], "--pages", "5", *model], "3 pages"),
        (["read", f["root"] + "/missing.png", *model], "missing.png"),
        (["describe", f["text"], *model], "notes.png"),
        (["read", f["image"], "--device", "tpu", *model], "device"),
        (["describe", f["image"], "--dtype", "int8", *model], "--dtype"),
        (["read", f["image"], "--model", f["root"] + "/no-such-folder"], "no-such-folder"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "HD4K_MODEL"}
    results = _run_cli([argv for argv, _ in cases], env, tmp_path)
    for (argv, needle), result in zip(cases, results, strict=True):
        assert result["code"] == 2 and needle in result["stderr"], result
        assert result["stderr"].count("\n") == 1, result
        assert not result["torch"], f"{argv}: torch was imported before the error"
    hint = results[0]["stderr"]
    assert "Use --hd-num" in hint and "hd_num=" not in hint  # the command line's words


def test_dtype_names_match_the_engine() -> None:
    assert set(checks.DTYPE_NAMES) == {"auto", *checkpoint._DTYPES}


def test_cli_messages_speak_cli(inputs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["describe", str(inputs["pdf"])]) == 2
    err = capsys.readouterr().err
    assert "hd4k read" in err and "render_pages" not in err, err
    assert main(["describe", str(inputs["root"] / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "no file at" in err and "base64" not in err and "bytes" not in err, err


def test_python_messages_speak_python(inputs: dict[str, Path]) -> None:
    with pytest.raises(UnsupportedFormatError) as info:
        load_image(inputs["pdf"])
    assert "render_pages" in str(info.value) and "hd4k read" not in str(info.value)
    with pytest.raises(FileNotFoundError) as missing:
        load_image(inputs["root"] / "x.png")
    assert "bytes, base64 or a URL" in str(missing.value)
    # The same error object, rendered for the other audience.
    assert "hd4k read" in info.value.render("cli") and "render_pages" not in info.value.render("cli")


class _StreamingPages:
    """A facade streaming each page's answer; page ``interrupt_at`` is interrupted before its first token."""

    def __init__(self, interrupt_at: int) -> None:
        self.interrupt_at = interrupt_at

    def __enter__(self) -> _StreamingPages:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def stream_task(self, spec: object, source: object, *, pages: list[int], **kwargs: object) -> Iterator[str]:
        if pages[0] == self.interrupt_at:
            raise KeyboardInterrupt
        yield f"text of page {pages[0]}"


def test_streamed_page_header_comes_with_its_text(
    inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``hd4k read --stream``: the header is written with the page's first text, so Ctrl-C before a page
    produced anything leaves no empty header."""
    from hd4k_tools.cli import model_commands

    monkeypatch.setattr(model_commands, "_open", lambda args: _StreamingPages(interrupt_at=2))
    monkeypatch.setattr(model_commands, "check_before_load", lambda *a, **k: None)
    assert main(["read", str(inputs["pdf"]), "--stream"]) == 130
    out = capsys.readouterr().out
    assert out == "--- page 1 ---\ntext of page 1\n"


def test_docs_are_one_section_per_decision_and_self_contained() -> None:
    """docs/decisions.md has one section per decision; benchmarks/RESULTS.md cites nothing outside the
    repository (no internal issue numbers, no ../ notes)."""
    decisions = (ROOT / "docs" / "decisions.md").read_text()
    headings = [line for line in decisions.splitlines() if line.startswith("## ")]
    assert len(headings) == len(set(headings)), sorted(h for h in headings if headings.count(h) > 1)
    assert "core's hard dependencies are torch" not in decisions
    results = (ROOT / "benchmarks" / "RESULTS.md").read_text()
    assert not re.search(r"\bissue \d", results) and "../" not in results and "shared/notes" not in results
    for doc in ("README.md", "docs/decisions.md", "benchmarks/RESULTS.md", "notebooks/README.md"):
        text = (ROOT / doc).read_text()
        for target in re.findall(r"\]\(([^)#:]+)\)", text):  # relative Markdown links resolve in the repo
            assert ((ROOT / doc).parent / target).exists(), f"{doc}: link to {target} does not exist"


def test_the_slow_list_names_tests_that_exist() -> None:
    """The quick subset stays what the README says: every module and test listed as slow exists (a rename
    must not silently move a slow test into the quick subset)."""
    import runpy

    # By path: several conftest.py files exist, and "import conftest" may find another one.
    conftest = runpy.run_path(str(ROOT / "tests" / "conftest.py"))
    for module in conftest["SLOW_MODULES"]:
        assert (ROOT / module).is_file(), module
    for test in conftest["SLOW_TESTS"]:
        module, name = test.split("::")
        assert re.search(rf"^(async )?def {name}\(", (ROOT / module).read_text(), flags=re.M), test
