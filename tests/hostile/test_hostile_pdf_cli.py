"""PDF options (issue 12, item 9) and the CLI (item 4): falsy-but-invalid values are typed errors (never a
silent default), the LangChain loader refuses a bad page range with the core's error, and ``hd4k`` prints
one line, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hostile_support import GEN
from PIL import Image

from hd4k_tools import HD4K, errors
from hd4k_tools.cli import main
from hd4k_tools.cli.args import EXIT_ERROR
from hd4k_tools.inputs.pdf import render_pages, select_pages

pytest.importorskip("pypdfium2")


@pytest.fixture(scope="module")
def pdf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pdf") / "doc.pdf"
    pages = [Image.new("RGB", (120, 160), (255 - 40 * i, 255, 255)) for i in range(3)]
    pages[0].save(path, format="PDF", save_all=True, append_images=pages[1:], resolution=72.0)
    return path


BAD_DPI = [0, -1, 0.0, -0.0, float("nan"), float("inf"), 10**5000, 1e9, "200", True, False]


@pytest.mark.parametrize("dpi", BAD_DPI, ids=[f"dpi{i}" for i in range(len(BAD_DPI))])
def test_read_document_bad_dpi_is_typed(hd: HD4K, pdf: Path, dpi: Any, healthy_model: Callable[[], None]) -> None:
    with pytest.raises(errors.PDFError, match="dpi="):
        hd.read_document(pdf, pages=1, dpi=dpi, hd_num=1, generation=GEN)
    healthy_model()


@pytest.mark.parametrize("max_pages", [0, -1, 1.5, "3", True])
def test_read_document_bad_max_pages_is_typed(
    hd: HD4K, pdf: Path, max_pages: Any, healthy_model: Callable[[], None]
) -> None:
    with pytest.raises(errors.PDFError, match="max_pages="):
        hd.read_document(pdf, pages=1, max_pages=max_pages, hd_num=1, generation=GEN)
    healthy_model()


BAD_PAGES: list[Any] = [
    0,
    -1,
    4,
    10**5000,
    "9" * 5000,
    "1-" + "9" * 5000,
    "0",
    "3-1",
    "a-b",
    "1 2",
    "",
    ",",
    "--",
    [],
    [0],
    [1, 10**5000],
    [True],
    True,
    1.5,
    {"page": 1},
    "\ud800",
]


@pytest.mark.parametrize("pages", BAD_PAGES, ids=[f"pages{i}" for i in range(len(BAD_PAGES))])
def test_bad_page_selection_is_one_typed_error_everywhere(hd: HD4K, pdf: Path, pages: Any) -> None:
    with pytest.raises(errors.PageRangeError) as core:
        select_pages(pdf, pages)
    with pytest.raises(errors.PageRangeError) as rendered:
        render_pages(pdf, pages=pages)
    assert str(rendered.value) == str(core.value)
    loader_mod = pytest.importorskip("langchain_hd4k.document_loaders")
    with pytest.raises(errors.PageRangeError) as loader:
        loader_mod.HD4KDocumentLoader(hd, pdf, pages=pages, hd_num=1, generation=GEN).load()
    assert str(loader.value) == str(core.value)


def test_llamaindex_reader_bad_pages_same_error(hd: HD4K, pdf: Path) -> None:
    readers = pytest.importorskip("llama_index_hd4k")
    with pytest.raises(errors.PageRangeError) as core:
        select_pages(pdf, "3-1")
    with pytest.raises(errors.PageRangeError) as reader:
        readers.HD4KReader(hd, hd_num=1, generation=GEN).load_data(pdf, pages="3-1")
    assert str(reader.value) == str(core.value)


def test_dpi_zero_is_not_silently_200(hd: HD4K, pdf: Path) -> None:
    with pytest.raises(errors.PDFError):
        hd.read_document(pdf, pages=1, dpi=0, hd_num=1, generation=GEN)
    result = hd.read_document(pdf, pages=1, dpi=36, hd_num=1, generation=GEN)
    assert result.pages[0].plans[0].input_size == (60, 80)  # 120x160 pt at 36 dpi


# ----------------------------------------------------------------------------------------------------
# CLI: one line on stderr, exit code 1, no traceback
# ----------------------------------------------------------------------------------------------------
CLI_CASES = [
    ["tiles", "http://[::1"],
    ["tiles", "http://[127.0.0.1]/"],
    ["tiles", "https://[::ffff:127.0.0.1"],
    ["tiles", "file:///etc/passwd"],
    ["tiles", "/nonexistent/x.png"],
    ["tiles", "/dev/null"],
    ["tiles", "/proc/self"],
    ["tiles", "photo\ud800.png"],
    ["tiles", "data:image/png;base64,@@"],
]


@pytest.mark.parametrize("argv", CLI_CASES, ids=[f"cli{i}" for i in range(len(CLI_CASES))])
def test_cli_prints_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == EXIT_ERROR
    err = capsys.readouterr().err.strip()
    assert err.startswith("hd4k: error:") and "\n" not in err and "Traceback" not in err


def test_cli_symlink_loop_in_a_real_process(tmp_path: Path) -> None:
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    done = subprocess.run(
        [sys.executable, "-m", "hd4k_tools.cli", "tiles", str(tmp_path / "a.png")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_ERROR
    assert done.stderr.strip().startswith("hd4k: error:") and "Traceback" not in done.stderr
