"""The ``hd4k`` command line: ``tiles`` (text, JSON, preview file) and error handling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hd4k_tools.cli import tiles
from hd4k_tools.cli.args import parse_hd_num
from hd4k_tools.cli.main import build_parser, main
from hd4k_tools.errors import InvalidHDNumError
from hd4k_tools.models.xcomposer2_4khd.tiling import auto_hd_num, plan

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "examples" / "page.png"


@pytest.fixture
def image_path(tmp_path: Path) -> Path:
    path = tmp_path / "wide.png"
    Image.new("RGB", (3840, 1600), (200, 30, 30)).save(path)
    return path


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hd4k: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_tiles_text(image_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "preview.png"
    assert main(["tiles", str(image_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3840×1600" in text
    assert "5 rows × 11 cols = 55 tiles" in text
    assert "3696×1540" in text and "3696×1680" in text
    assert "left 0, top 70, right 0, bottom 70" in text
    assert "8137 image tokens" in text
    for hd, tokens in ((9, 1333), (16, 2353), (25, 3217), (55, 8137)):
        assert any(line.split()[:1] == [str(hd)] and str(tokens) in line for line in text.splitlines())
    assert f"Preview written to {out}" in text
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 500


def test_tiles_default_output_in_cwd(
    image_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["tiles", str(image_path), "--hd-num", "9"]) == 0
    assert (work / "wide.tiles.png").is_file()
    assert "wide.tiles.png" in capsys.readouterr().out


def test_tiles_json(image_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.png"
    assert main(["tiles", str(image_path), "--json", "--out", str(out)]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["plan"] == plan(3840, 1600, 55).to_dict()
    assert [c["hd_num"] for c in payload["comparison"]] == [9, 16, 25, 55]
    assert [c["num_tokens"] for c in payload["comparison"]] == [1333, 2353, 3217, 8137]
    assert payload["preview"] == str(out)
    assert out.is_file()


def test_tiles_auto(image_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiles", str(image_path), "--hd-num", "auto", "--max-tokens", "3000", "--json", "--no-preview"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["plan"]["hd_num"] == auto_hd_num(3840, 1600, 3000)
    assert payload["plan"]["num_tokens"] <= 3000
    assert payload["preview"] is None
    # auto without --max-tokens uses 8192; --max-tokens alone implies auto.
    assert main(["tiles", str(image_path), "--hd-num", "auto", "--json", "--no-preview"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["hd_num"] == auto_hd_num(3840, 1600, 8192)
    assert main(["tiles", str(image_path), "--max-tokens", "2000", "--json", "--no-preview"]) == 0
    assert json.loads(capsys.readouterr().out)["plan"]["hd_num"] == auto_hd_num(3840, 1600, 2000)


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiles", str(tmp_path / "nope.png")]) == 2
    captured = capsys.readouterr()
    assert "nope.png" in _one_error_line(captured.err)
    assert captured.out == ""


def test_corrupt_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + os.urandom(64))
    assert main(["tiles", str(bad), "--no-preview"]) == 2
    _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("bad", ["0", "-3", "abc", "2.5", ""])
def test_bad_hd_num(image_path: Path, bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiles", str(image_path), "--hd-num", bad, "--no-preview"]) == 2
    assert "--hd-num" in _one_error_line(capsys.readouterr().err)


def test_budget_too_small(image_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiles", str(image_path), "--hd-num", "auto", "--max-tokens", "100", "--no-preview"]) == 2
    assert "313" in _one_error_line(capsys.readouterr().err)
    assert main(["tiles", str(image_path), "--max-tokens", "0", "--no-preview"]) == 2
    _one_error_line(capsys.readouterr().err)


def test_unwritable_output(image_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tiles", str(image_path), "--out", str(tmp_path / "no" / "such" / "dir" / "p.png")]) == 2
    assert "cannot write the preview" in _one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        ([], "COMMAND"),
        (["tiles"], "IMAGE"),
        (["tiles", "x.png", "--max-tokens", "many"], "--max-tokens"),
        (["nosuchcommand"], "nosuchcommand"),
        (["read"], "DOCUMENT"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv: list[str], names: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert names in line and "--help" in line


def test_help_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert main(["tiles", "--help"]) == 0
    assert "--hd-num" in capsys.readouterr().out


def test_keyboard_interrupt_exits_130(
    image_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("hd4k_tools.cli.tiles.load_image", interrupted)
    assert main(["tiles", str(image_path)]) == 130
    assert capsys.readouterr().err == ""


def test_parser_structure() -> None:
    parser = build_parser()
    args = parser.parse_args(["tiles", "a.png"])
    assert args.func is tiles._cmd_tiles
    assert args.hd_num is None and args.json is False
    assert parse_hd_num("auto") == "auto" and parse_hd_num(" 25 ") == 25
    with pytest.raises(InvalidHDNumError):
        parse_hd_num("1e3")


def _console_script() -> str:
    found = Path(sys.executable).parent / "hd4k"
    if found.is_file():
        return str(found)
    which = shutil.which("hd4k")
    if which is None:
        pytest.skip("the hd4k console script is not installed")
    return which


def test_installed_console_script(tmp_path: Path) -> None:
    exe = _console_script()
    done = subprocess.run(
        [exe, "tiles", str(PAGE), "--json"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    payload = json.loads(done.stdout)
    assert payload["plan"]["width"] == 1700 and payload["plan"]["height"] == 2200
    assert (tmp_path / "page.tiles.png").is_file()
    failed = subprocess.run(
        [exe, "tiles", str(tmp_path / "missing.png")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 2
    _one_error_line(failed.stderr)
