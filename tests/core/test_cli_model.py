"""The model commands of ``hd4k`` (describe, read, chart, make-tiny-checkpoint, serve's parser) on the
tiny checkpoint: answers on stdout, JSON results, streaming, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from hd4k_tools.cli.main import build_parser, main


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "page.png"
    img = Image.new("RGB", (500, 700), "white")
    ImageDraw.Draw(img).text((20, 20), "Total: 42", fill="black")
    img.save(path)
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_describe_prints_the_answer(capsys, tiny_checkpoint: Path, page: Path) -> None:
    code, out, err = _run(
        capsys, "describe", str(page), "--model", str(tiny_checkpoint), "--hd-num", "2", "--max-new-tokens", "5"
    )
    assert code == 0, err
    assert out.strip()


def test_read_json_has_plan_usage_and_timings(capsys, tiny_checkpoint: Path, page: Path) -> None:
    code, out, err = _run(
        capsys, "read", str(page), "--model", str(tiny_checkpoint), "--hd-num", "4", "--max-new-tokens", "3", "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    first = result["pages"][0]
    assert first["hd_num"] == 4
    assert first["plans"][0]["image_tokens"] > 0
    assert first["usage"]["completion_tokens"] == 3
    assert "timings" in first


def test_read_pdf_pages(capsys, tiny_checkpoint: Path, tmp_path: Path) -> None:
    pdf = tmp_path / "doc.pdf"
    pages = [Image.new("RGB", (300, 400), c) for c in ("white", "lightgray", "white")]
    pages[0].save(pdf, "PDF", save_all=True, append_images=pages[1:], resolution=72)
    code, out, err = _run(
        capsys, "read", str(pdf), "--pages", "2-3", "--dpi", "72", "--model", str(tiny_checkpoint),
        "--hd-num", "1", "--max-new-tokens", "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert [p["page"] for p in json.loads(out)["pages"]] == [2, 3]


def test_chart_stream_matches_plain(capsys, tiny_checkpoint: Path, page: Path) -> None:
    base = ["chart", str(page), "What is the total?", "--model", str(tiny_checkpoint), "--hd-num", "2"]
    code, plain, err = _run(capsys, *base, "--max-new-tokens", "6", "--num-beams", "1")
    assert code == 0, err
    code, streamed, err = _run(capsys, *base, "--max-new-tokens", "6", "--stream")
    assert code == 0, err
    assert streamed.strip() == plain.strip()


def test_chart_table_from_a_model_that_writes_no_table_is_a_clean_error(
    capsys, tiny_checkpoint: Path, page: Path
) -> None:
    code, _out, err = _run(
        capsys, "chart", str(page), "--table", "--model", str(tiny_checkpoint), "--hd-num", "1", "--max-new-tokens", "4"
    )
    assert code == 2
    assert err.startswith("hd4k: error: ") and "not a table" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["describe", "{page}", "--model", "internlm/internlm-xcomposer2-4khd-7b"], "--model"),
        (["describe", "{page}", "--model", "{tmp}/no-such-model"], "no-such-model"),
        (["describe", "{tmp}/missing.png", "--model", "{ckpt}"], "missing.png"),
        (["read", "{page}", "--model", "{ckpt}", "--pages", "2"], "single image"),
        (["describe", "{page}", "--model", "{ckpt}", "--hd-num", "zero"], "--hd-num"),
        (["chart", "{page}", "--model", "{ckpt}", "--stream", "--json"], "--stream"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(
    capsys, tiny_checkpoint: Path, page: Path, tmp_path: Path, argv: list[str], needle: str
) -> None:
    args = [a.format(page=page, tmp=tmp_path, ckpt=tiny_checkpoint) for a in argv]
    code, _out, err = _run(capsys, *args)
    assert code == 2
    assert err.startswith("hd4k: error: ")
    assert len(err.strip().splitlines()) == 1
    assert needle in err
    assert "Traceback" not in err


def test_offline_hub_id_says_how_to_pass_a_folder(capsys, page: Path) -> None:
    code, _, err = _run(capsys, "read", str(page))  # default model: the official hub id
    assert code == 2
    assert "internlm/internlm-xcomposer2-4khd-7b" in err and "--model" in err


def test_make_tiny_checkpoint_then_use_it(capsys, tmp_path: Path, page: Path) -> None:
    code, out, _ = _run(capsys, "make-tiny-checkpoint", str(tmp_path / "tiny"))
    assert code == 0
    assert str(tmp_path / "tiny") in out
    assert (tmp_path / "tiny" / "config.json").is_file()
    code, _out, err = _run(
        capsys, "describe", str(page), "--model", str(tmp_path / "tiny"), "--hd-num", "1", "--max-new-tokens", "3"
    )
    assert code == 0, err


def test_serve_shares_the_server_options() -> None:
    args = build_parser().parse_args(["serve", "--model", "DIR", "--port", "9001", "--allow-image-urls"])
    assert (args.model, args.port, args.allow_image_urls, args.host) == ("DIR", 9001, True, "127.0.0.1")
    from hd4k_tools.serve.app import serve_from_args

    assert args.func is serve_from_args


def test_serve_max_tokens_limit_option() -> None:
    from hd4k_tools.serve.app import DEFAULT_MAX_TOKENS_LIMIT

    assert build_parser().parse_args(["serve", "--model", "DIR"]).max_tokens_limit == DEFAULT_MAX_TOKENS_LIMIT == 4096
    assert build_parser().parse_args(["serve", "--model", "DIR", "--max-tokens-limit", "64"]).max_tokens_limit == 64


def test_serve_on_a_port_in_use_is_one_line_and_exit_2(tiny_checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HD4K_NO_PROGRESS": "1"}
        argv = ["serve", "--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--port", str(port)]
        proc = subprocess.run(
            [sys.executable, "-m", "hd4k_tools.cli", *argv], capture_output=True, text=True, env=env, timeout=120
        )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"hd4k: error: port {port} on 127.0.0.1 is already in use")
    assert "--port" in lines[0]


def test_chart_table_with_stream_is_refused_before_loading(capsys, tmp_path: Path, page: Path) -> None:
    # The model path does not exist: the option conflict must be reported first, without loading anything.
    argv = ["chart", str(page), "--table", "--stream", "--model", str(tmp_path / "no-such-model")]
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("hd4k: error: --table and --stream do not combine")


def test_stdout_is_only_the_answer(monkeypatch, tiny_checkpoint: Path, page: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    code = main(["describe", str(page), "--model", str(tiny_checkpoint), "--hd-num", "1", "--max-new-tokens", "3"])
    assert code == 0
    assert len(out.getvalue().strip().splitlines()) == 1
