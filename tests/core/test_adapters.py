"""The adapter kit both framework integrations share (hd4k_tools.adapters): it imports no framework,
and each helper behaves as the core does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hd4k_tools import HD4K, Message, RemoteRunner, cut_at_stops, errors
from hd4k_tools.adapters import (
    as_hd4k,
    assemble_messages,
    count_message_tokens,
    filter_stream,
    page_metadata,
    select_document_pages,
    tool_result_parts,
)
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.models.xcomposer2_4khd.tiling import plan


def test_the_kit_imports_no_framework_and_no_torch() -> None:
    code = (
        "import sys, hd4k_tools.adapters, hd4k_tools.structured; "
        "print(sorted(m for m in ('torch', 'langchain_core', 'llama_index.core') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_as_hd4k(hd4k_tiny: HD4K) -> None:
    assert as_hd4k(hd4k_tiny) is hd4k_tiny
    assert as_hd4k(hd4k_tiny.runner).runner is hd4k_tiny.runner
    with pytest.raises(TypeError, match=r"HD4K\.from_pretrained"):
        as_hd4k("a/path")


def test_assemble_messages() -> None:
    image = Image.new("RGB", (8, 8))
    out = assemble_messages(
        [
            ("system", ["Be brief."]),
            ("user", ["a", "b", image]),
            ("assistant", []),
            ("tool", ["42"]),
            ("user", [""]),
            ("system", ["Use units."]),
        ]
    )
    assert [m.role for m in out] == ["system", "user", "assistant", "user"]
    assert out[0].content == ("Be brief.\n\nUse units.",)
    assert out[1].content == ("a\nb", image)
    assert out[3].content == ("Tool result:\n42",)
    assert tool_result_parts("calc", ["1"]) == ["Result of the tool calc:\n", "1"]
    with pytest.raises(errors.InputError, match="system message cannot hold images"):
        assemble_messages([("system", [image])])
    with pytest.raises(errors.InputError, match="Unsupported message role"):
        assemble_messages([("robot", ["x"])])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("deltas", "stops"),
    [(["  Hel", "lo wor", "ld  "], []), (["The ans", "wer. EN", "D more"], ["END"]), (["a", " ", "\n"], ["x"])],
)
def test_filter_stream_joins_to_the_cut_answer(deltas: list[str], stops: list[str]) -> None:
    assert "".join(filter_stream(iter(deltas), stops)) == cut_at_stops("".join(deltas), stops)[0]


def test_filter_stream_stops_reading_at_a_stop_string() -> None:
    read: list[str] = []

    def source():
        for piece in ["one ", "STOP", " never"]:
            read.append(piece)
            yield piece

    assert list(filter_stream(source(), ["STOP"])) == ["one"]
    assert read == ["one ", "STOP"]


def test_message_tokens_match_the_runner(hd4k_tiny: HD4K) -> None:
    image = Image.new("RGB", (500, 300), "white")
    messages = [Message("system", ("Be brief.",)), Message("user", (image, "What is it?"))]
    counted = count_message_tokens(hd4k_tiny, messages, hd_num=4)
    request = hd4k_tiny.build_request(messages, hd_num=4, generation={"max_new_tokens": 1})
    assert counted == hd4k_tiny.run(request).usage.prompt_tokens
    assert counted > plan(500, 300, 4).num_tokens
    # A remote runner has no tokenizer here: its own estimate plus the same image tokens.
    remote = HD4K(RemoteRunner("http://127.0.0.1:9", model="m"))
    estimate = count_message_tokens(remote, messages, hd_num=4)
    assert estimate > plan(500, 300, 4).num_tokens


def _pdf(path: Path, pages: int) -> Path:
    images = [Image.new("RGB", (100, 140), (i * 40, 0, 0)) for i in range(pages)]
    images[0].save(path, format="PDF", save_all=True, append_images=images[1:])
    return path


def test_select_document_pages(tmp_path: Path) -> None:
    pdf = _pdf(tmp_path / "five.pdf", 5)
    policy = ImagePolicy()
    selected = select_document_pages(pdf, "2-3", policy=policy, max_pages=2)
    assert selected.is_pdf and selected.indices == (1, 2) and selected.total_pages == 5
    assert list(selected.pages()) == [(1, 2, "2"), (2, 3, "3")]
    with pytest.raises(errors.PDFError, match="more than max_pages=2"):
        select_document_pages(pdf, None, policy=policy, max_pages=2)
    with pytest.raises(errors.PageRangeError, match="the document has 5 pages"):
        select_document_pages(pdf, "7", policy=policy, max_pages=10)
    png = tmp_path / "a.png"
    Image.new("RGB", (10, 10)).save(png)
    image = select_document_pages(png, None, policy=policy, max_pages=1)
    assert not image.is_pdf and list(image.pages()) == [(0, None, "1")]
    with pytest.raises(errors.InputError, match="single image"):
        select_document_pages(png, "2", policy=policy, max_pages=1)
    assert page_metadata(0, "i", 3) == {"page": 0, "page_label": "i", "total_pages": 3}
