"""``hd4k`` fails fast and keeps work (issue 13.6): every input check before the model loads, pages printed
as they finish, Ctrl-C keeps them, plain progress lines off a terminal, task defaults in ``--help``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hd4k_tools.agent_tools import ToolSettings
from hd4k_tools.cli import model_commands
from hd4k_tools.cli.main import build_parser, main
from hd4k_tools.errors import PathNotAllowedError
from hd4k_tools.hd4k import HD4K
from hd4k_tools.inputs.images import load_image
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.progress import track
from hd4k_tools.results import DocumentResult, TaskResult
from hd4k_tools.tasks import TASKS


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    image = root / "page.png"
    Image.new("RGB", (200, 300), "white").save(image)
    pdf = root / "doc.pdf"
    pages = [Image.new("RGB", (200, 300), c) for c in ("white", "lightgray", "white")]
    pages[0].save(pdf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    text = root / "notes.png"
    text.write_text("not an image at all")
    return {"image": image, "pdf": pdf, "text": text, "root": root}


class NoModel:
    """Stands in for loading: any attempt to load a model fails the test."""

    calls = 0

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> HD4K:
        cls.calls += 1
        raise AssertionError("the model was loaded before the inputs were checked")


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["describe", "{root}/missing.png"], "missing.png"),
        (["describe", "{text}"], "notes.png"),
        (["chart", "{image}"], "question is empty"),
        (["chart", "{image}", "   "], "question is empty"),
        (["read", "{pdf}", "--pages", "5"], "3 pages"),
        (["read", "{pdf}", "--pages", "2-1"], "pages"),
        (["read", "{image}", "--pages", "2"], "single image"),
        (["read", "{text}"], "notes.png"),
        (["read", "{pdf}", "--dpi", "0"], "--dpi"),
        (["describe", "{image}", "--device", "cuda:7"], "cuda"),
        (["read", "{pdf}", "--device", "tpu"], "device"),
        (["describe", "{image}", "--dtype", "int8"], "--dtype"),
    ],
)
def test_input_errors_come_before_the_model_loads(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, Path],
    argv: list[str],
    needle: str,
) -> None:
    monkeypatch.setattr(model_commands.HD4K, "from_pretrained", NoModel.from_pretrained)
    before = NoModel.calls
    args = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    code, _out, err = _run(capsys, *args, "--model", str(files["root"]))
    assert NoModel.calls == before, "the model was loaded"
    assert code == 2 and err.startswith("hd4k: error: ") and needle in err, err
    assert len(err.strip().splitlines()) == 1


class ScriptedHD4K:
    """A facade whose read_document answers per page and raises KeyboardInterrupt on ``interrupt_at``."""

    def __init__(self, interrupt_at: int | None = None) -> None:
        self.interrupt_at = interrupt_at
        self.read: list[Any] = []

    def __enter__(self) -> ScriptedHD4K:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def read_document(self, source: Any, *, pages: Any = None, **kwargs: Any) -> DocumentResult:
        number = pages[0] if pages else None
        if number == self.interrupt_at:
            raise KeyboardInterrupt
        self.read.append(number)
        page = TaskResult(task="read_document", text=f"text of page {number}", model="m", page=number)
        return DocumentResult(source=str(source), pages=[page])

    def run_task(self, spec: Any, source: Any, **kwargs: Any) -> DocumentResult:
        # The CLI runs every task through HD4K.run_task (the generic path); read_document is its wrapper.
        assert spec.name == "read_document"
        return self.read_document(source, **kwargs)


def _scripted(monkeypatch: pytest.MonkeyPatch, hd: ScriptedHD4K) -> None:
    monkeypatch.setattr(model_commands, "_open", lambda args: hd)
    # No checkpoint behind the scripted facade: nothing to check hd_num against.
    monkeypatch.setattr(model_commands, "check_before_load", lambda *a, **k: None)


def test_read_prints_each_page_under_a_header(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    hd = ScriptedHD4K()
    _scripted(monkeypatch, hd)
    monkeypatch.delenv("HD4K_NO_PROGRESS", raising=False)
    code, out, err = _run(capsys, "read", str(files["pdf"]), "--pages", "1,3")
    assert code == 0, err
    assert out == "--- page 1 ---\ntext of page 1\n\n--- page 3 ---\ntext of page 3\n"
    assert hd.read == [1, 3]
    # stderr is not a terminal here: progress as plain lines, one per page.
    lines = [line for line in err.splitlines() if line.startswith("Reading pages")]
    assert [line.split(" (")[0] for line in lines] == ["Reading pages: 1/2 page", "Reading pages: 2/2 page"]


def test_ctrl_c_keeps_finished_pages_and_says_where_it_stopped(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    _scripted(monkeypatch, ScriptedHD4K(interrupt_at=2))
    code, out, err = _run(capsys, "read", str(files["pdf"]))
    assert code == 130
    assert out == "--- page 1 ---\ntext of page 1\n"  # no empty header for the interrupted page (issue 23.6)
    assert "interrupted while reading page 2" in err and "1 of 3 page(s) finished" in err
    assert "--pages 2-3" in err


def test_ctrl_c_with_json_prints_the_finished_pages(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    _scripted(monkeypatch, ScriptedHD4K(interrupt_at=3))
    code, out, _err = _run(capsys, "read", str(files["pdf"]), "--json")
    assert code == 130
    assert [p["page"] for p in DocumentResult.model_validate_json(out).model_dump()["pages"]] == [1, 2]


def test_progress_plain_lines_when_not_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(track([1, 2], total=2, desc="Loading shards", unit="shard", progress=True)) == [1, 2]
    err = capsys.readouterr().err
    assert [line.split(" (")[0] for line in err.splitlines()] == [
        "Loading shards: 1/2 shard",
        "Loading shards: 2/2 shard",
    ]
    assert "\r" not in err
    list(track([1], progress=None))  # None: nobody watches a pipe, nothing written
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("command", "task"), [("read", "read_document"), ("chart", "answer_chart_question"), ("describe", "describe_image")]
)
def test_help_shows_the_task_defaults(capsys: pytest.CaptureFixture[str], command: str, task: str) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    spec = TASKS[task]
    assert f"(default for this task: {spec.default_hd_num})" in text
    assert f"(default for this task: {spec.max_new_tokens})" in text
    assert f"(default for this task: {spec.num_beams})" in text


def test_path_refusal_names_settings_that_exist(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowedError) as info:
        load_image(files["image"], policy=ImagePolicy(allowed_roots=(tmp_path,)))
    message = str(info.value)
    assert "ToolSettings.allowed_root" in message and "allowed_root" in ToolSettings.model_fields
    assert "ImagePolicy.allowed_roots" in message and hasattr(ImagePolicy(), "allowed_roots")
