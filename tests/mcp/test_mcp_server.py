"""``hd4k mcp`` end to end: the SDK's client against the server subprocess, over stdio and streamable HTTP.

Every test runs once per transport (the ``mcp_server`` fixture), on the tiny checkpoint.
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Any

import pytest
from mcp_support import MAX_PIXELS, McpConnection, wait_for
from PIL import Image

from hd4k_tools.agent_tools import TOOL_ARGS, TOOL_DESCRIPTIONS
from hd4k_tools.mcp.server import ToolOutput

MAX_NEW_TOKENS = 8  # the servers' --max-new-tokens


def _png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _ok(result: Any) -> ToolOutput:
    """The structured content of a successful call, checked against the advertised output schema's model."""
    assert not result.is_error, result.content[0].text
    assert result.content[0].type == "text"
    output = ToolOutput.model_validate(result.structured_content)
    assert result.content[0].text == output.text
    return output


def _error(result: Any) -> str:
    assert result.is_error
    return result.content[0].text


# ----------------------------------------------------------------------------------------------------
# Listing: one source of truth
# ----------------------------------------------------------------------------------------------------
def test_lists_the_three_tools_as_agent_tools_defines_them(mcp_server: McpConnection) -> None:
    tools = mcp_server.run(mcp_server.client.list_tools).tools
    assert [t.name for t in tools] == list(TOOL_DESCRIPTIONS)
    for tool in tools:
        assert tool.description == TOOL_DESCRIPTIONS[tool.name]
        expected = TOOL_ARGS[tool.name].model_json_schema()
        schema = tool.input_schema
        assert schema.get("additionalProperties") is False
        assert schema.get("required", []) == expected.get("required", [])
        for field, prop in expected["properties"].items():
            if field != "image":
                assert schema["properties"][field] == prop
        string_form, content_form = schema["properties"]["image"]["anyOf"]
        assert string_form["type"] == "string"
        assert string_form["maxLength"] == expected["properties"]["image"]["maxLength"]
        assert content_form["properties"]["type"] == {"const": "image"}
        assert expected["properties"]["image"]["description"] in schema["properties"]["image"]["description"]
        assert tool.output_schema == ToolOutput.model_json_schema()
        assert tool.annotations.read_only_hint is True
        assert tool.annotations.destructive_hint is False
        assert tool.annotations.open_world_hint is True  # the test servers allow URLs


# ----------------------------------------------------------------------------------------------------
# Each tool on the tiny checkpoint
# ----------------------------------------------------------------------------------------------------
def test_describe_image_from_a_path(mcp_server: McpConnection) -> None:
    result = mcp_server.call("describe_image", {"image": "photo.png", "detail": "brief", "hd_num": 2})
    out = _ok(result)
    assert out.tool == "describe_image"
    (page,) = out.pages
    assert page.page is None
    assert page.hd_num == 2
    assert page.plan.input_size == (400, 300)
    assert page.grid == f"{page.plan.rows}x{page.plan.cols}"
    assert 0 < page.usage.completion_tokens <= MAX_NEW_TOKENS
    assert page.usage.image_tokens == page.plan.image_tokens
    assert page.timings.total_s > 0
    # --thumbnails: a small JPEG of the input follows the text.
    thumb = result.content[1]
    assert thumb.type == "image" and thumb.mime_type == "image/jpeg"
    assert max(Image.open(io.BytesIO(base64.b64decode(thumb.data))).size) <= 160


def test_answer_chart_question_from_a_data_url(mcp_server: McpConnection) -> None:
    data_url = "data:image/png;base64," + base64.b64encode(_png((300, 200), (10, 200, 30))).decode()
    arguments = {"image": data_url, "question": "Which bar is tallest?", "hd_num": 2}
    out = _ok(mcp_server.call("answer_chart_question", arguments))
    (page,) = out.pages
    assert page.plan.input_size == (300, 200)
    assert page.hd_num == 2
    assert out.pages[0].text == out.text
    assert page.usage.completion_tokens <= MAX_NEW_TOKENS


def test_read_document_image_content_then_its_reference(mcp_server: McpConnection) -> None:
    content = {"type": "image", "data": base64.b64encode(_png((500, 350), (90, 90, 250))).decode()}
    first = _ok(mcp_server.call("read_document", {"image": {**content, "mimeType": "image/png"}, "hd_num": 1}))
    assert first.image_ref is not None and first.image_ref.startswith("image://")
    assert first.pages[0].plan.input_size == (500, 350)
    # The reference reaches the same image without sending it again.
    again = _ok(mcp_server.call("describe_image", {"image": first.image_ref, "hd_num": 1, "detail": "brief"}))
    assert again.pages[0].plan.input_size == (500, 350)
    assert again.image_ref is None


def test_read_document_pdf_reports_progress_per_page(mcp_server: McpConnection) -> None:
    updates: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        updates.append((progress, total, message))

    result = mcp_server.call("read_document", {"image": "report.pdf", "hd_num": 1}, progress=on_progress)
    out = _ok(result)
    assert [p.page for p in out.pages] == [1, 2, 3]
    assert out.source is not None and out.source.endswith("report.pdf")
    assert "--- page 2 ---" in out.text
    wait_for(lambda: len(updates) == 4, timeout=10)  # notifications may trail the result by a moment
    assert [(p, t) for p, t, _ in updates] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    assert updates[-1][2] == "3/3 pages read"


# ----------------------------------------------------------------------------------------------------
# Hostile arguments: tool errors, and the server lives on
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ({"image": "../secret.png"}, "PathNotAllowedError"),
        ({"image": "/etc/passwd"}, "PathNotAllowedError"),
        ({"image": "http://127.0.0.1:9/chart.png"}, "URLNotAllowedError"),
        ({"image": "http://169.254.169.254/latest/meta-data"}, "URLNotAllowedError"),
        ({"image": "file:///etc/passwd"}, "URLNotAllowedError"),
        ({"image": "huge.png"}, "ImageTooLargeError"),
        ({"image": {"type": "image", "data": "not base64!", "mimeType": "image/png"}}, "InvalidBase64Error"),
        ({"image": {"type": "image", "data": "A" * 1_400_000, "mimeType": "image/png"}}, "FileTooLargeError"),
        ({"image": {"type": "audio", "data": "AAAA", "mimeType": "audio/wav"}}, "InputError"),
        ({"image": "photo.png", "hd_num": 1000}, "InputError"),
        ({"image": "photo.png", "cancel": True}, "InputError"),
        ({}, "InputError"),
    ],
)
def test_hostile_arguments_are_tool_errors(mcp_server: McpConnection, arguments: dict, error: str) -> None:
    text = _error(mcp_server.call("describe_image", arguments))
    assert text.startswith(f"Error ({error})"), text
    if error == "ImageTooLargeError":
        assert str(MAX_PIXELS) in text.replace(",", "").replace("_", "")


def test_unknown_tool_and_bad_page_range_then_the_server_answers(mcp_server: McpConnection) -> None:
    assert "Unknown tool" in _error(mcp_server.call("delete_everything", {"image": "photo.png"}))
    with_schema = mcp_server.call("read_document", {"image": "report.pdf", "pages": "7"})
    assert "PageRangeError" in _error(with_schema)
    out = _ok(mcp_server.call("describe_image", {"image": "photo.png", "hd_num": 1}))
    assert out.pages[0].usage.completion_tokens > 0


# ----------------------------------------------------------------------------------------------------
# Cancellation frees the model
# ----------------------------------------------------------------------------------------------------
def test_cancellation_stops_the_document_and_frees_the_model(mcp_server: McpConnection) -> None:
    """Cancel a 20-page read after its first page: the server stops reading (its log says after how many
    pages) and answers the next call long before the pages left would have been read (a ratio against the
    page time measured in this run, not a fixed time)."""
    seen: list[tuple[float, float]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((time.monotonic(), progress))

    called = time.monotonic()
    future = mcp_server.start("read_document", {"image": "long.pdf", "hd_num": 1}, progress=on_progress)
    wait_for(lambda: any(p >= 1 for _, p in seen))
    # Call start to first page read (notifications may arrive together, so not the gap between them).
    page_s = next(t for t, p in seen if p >= 1) - called
    future.cancel()
    started = time.monotonic()
    out = _ok(mcp_server.call("describe_image", {"image": "photo.png", "hd_num": 1, "detail": "brief"}))
    follow_up_s = time.monotonic() - started
    assert out.pages[0].usage.completion_tokens > 0
    assert follow_up_s < 18 * page_s / 3, (follow_up_s, page_s)  # at least 18 pages were left
    stopped = re.compile(r"tool read_document stopped after the cancellation \((\d+) of 20 pages read\)")
    wait_for(lambda: stopped.search(mcp_server.log()) is not None)
    pages_read = int(stopped.search(mcp_server.log()).group(1))
    assert 1 <= pages_read < 20
    assert max(p for _, p in seen) < 20
