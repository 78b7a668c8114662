"""HD4K tools and toolkit for LangChain: schemas, results as artifacts, untrusted arguments, image
references, async — on the tiny random checkpoint."""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from image_server import local_image_server
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_hd4k import (
    HD4KChartQuestionTool,
    HD4KDescribeImageTool,
    HD4KReadDocumentTool,
    HD4KToolkit,
)
from langchain_helpers import CappedRunner, chart_image, huge_png, png_bytes, tool_call
from PIL import Image

from hd4k_tools import (
    HD4K,
    TOOL_ARGS,
    TOOL_DESCRIPTIONS,
    ChartResult,
    DocumentResult,
    ImageRegistry,
    TaskResult,
    ToolSettings,
    plan,
    to_data_url,
)
from hd4k_tools.agent_tools import tool_text


@pytest.fixture
def toolkit(hd4k_capped: HD4K, image_root: Path) -> HD4KToolkit:
    return HD4KToolkit(hd4k_capped, settings=ToolSettings(allowed_root=image_root))


def tools_by_name(toolkit: HD4KToolkit) -> dict[str, BaseTool]:
    return {tool.name: tool for tool in toolkit.get_tools()}


# ----------------------------------------------------------------------------------------------------
# Toolkit and schemas
# ----------------------------------------------------------------------------------------------------
def test_toolkit_returns_three_tools_sharing_one_agent_tools(toolkit: HD4KToolkit) -> None:
    tools = toolkit.get_tools()
    assert [type(t) for t in tools] == [HD4KReadDocumentTool, HD4KChartQuestionTool, HD4KDescribeImageTool]
    assert [t.name for t in tools] == ["read_document", "answer_chart_question", "describe_image"]
    assert all(t.agent_tools is toolkit.agent_tools for t in tools)  # type: ignore[attr-defined]
    assert all(t.registry is toolkit.registry for t in tools)  # type: ignore[attr-defined]
    assert all(t.response_format == "content_and_artifact" for t in tools)
    assert all(t.handle_tool_error is True for t in tools)


def test_toolkit_accepts_a_bare_runner(hd4k_tiny: HD4K, image_root: Path) -> None:
    runner = CappedRunner(hd4k_tiny.runner)
    toolkit = HD4KToolkit(runner, settings=ToolSettings(allowed_root=image_root))
    assert isinstance(toolkit.hd, HD4K)
    assert toolkit.hd.runner is runner
    message = tools_by_name(toolkit)["describe_image"].invoke(
        tool_call("describe_image", {"image": "chart.png", "hd_num": 1})
    )
    assert message.status == "success"
    assert len(runner.requests) == 1


def test_toolkit_with_shared_registry(hd4k_capped: HD4K) -> None:
    registry = ImageRegistry()
    toolkit = HD4KToolkit(hd=hd4k_capped, registry=registry)
    assert toolkit.registry is registry
    assert toolkit.settings == ToolSettings()


def test_schemas_and_descriptions_come_from_agent_tools(toolkit: HD4KToolkit) -> None:
    for tool in toolkit.get_tools():
        assert tool.args_schema is TOOL_ARGS[tool.name]
        assert tool.description == TOOL_DESCRIPTIONS[tool.name]
        parameters = convert_to_openai_tool(tool)["function"]["parameters"]
        # The LLM names an image (path, URL, data URL or image:// reference): never a raw base64 field.
        assert parameters["required"] == (["image", "question"] if tool.name == "answer_chart_question" else ["image"])
        assert "image://" in parameters["properties"]["image"]["description"]
        assert "hd_num" in parameters["properties"]
        assert parameters["properties"]["hd_num"]["description"]
    read = convert_to_openai_tool(tools_by_name(toolkit)["read_document"])["function"]["parameters"]
    assert "pages" in read["properties"]


def test_tool_can_be_built_alone(hd4k_capped: HD4K, image_root: Path) -> None:
    tool = HD4KChartQuestionTool(hd=hd4k_capped, settings=ToolSettings(allowed_root=image_root))
    assert tool.name == "answer_chart_question"
    assert tool.settings.allowed_root == image_root
    with pytest.raises(TypeError, match="needs hd="):
        HD4KChartQuestionTool()


# ----------------------------------------------------------------------------------------------------
# Running: content is the answer, artifact the result object
# ----------------------------------------------------------------------------------------------------
def test_chart_question_content_and_artifact(toolkit: HD4KToolkit, image_root: Path) -> None:
    tool = tools_by_name(toolkit)["answer_chart_question"]
    message = tool.invoke(
        tool_call("answer_chart_question", {"image": "chart.png", "question": "Which bar is highest?", "hd_num": 2})
    )
    assert isinstance(message, ToolMessage)
    assert message.status == "success"
    result = message.artifact
    assert isinstance(result, ChartResult)
    assert message.content == result.text
    assert result.text  # seed-3 weights answer with (random) text
    assert result.question == "Which bar is highest?"
    with Image.open(image_root / "chart.png") as image:
        expected = plan(image.width, image.height, 2)
    assert result.plan is not None
    assert (result.plan.hd_num, result.plan.rows, result.plan.cols) == (2, expected.rows, expected.cols)
    assert result.usage.image_tokens == expected.num_tokens
    assert result.timings.total_s > 0


def test_plain_invoke_returns_the_text_only(toolkit: HD4KToolkit) -> None:
    tool = tools_by_name(toolkit)["describe_image"]
    text = tool.invoke({"image": "chart.png", "detail": "brief", "hd_num": 1})
    message = tool.invoke(tool_call("describe_image", {"image": "chart.png", "detail": "brief", "hd_num": 1}))
    assert isinstance(text, str)
    assert text == message.content == message.artifact.text
    assert isinstance(message.artifact, TaskResult)
    assert message.artifact.task == "describe_image"


def test_read_document_pages_of_a_pdf(toolkit: HD4KToolkit) -> None:
    tool = tools_by_name(toolkit)["read_document"]
    message = tool.invoke(tool_call("read_document", {"image": "report.pdf", "pages": "2-3", "hd_num": 1}))
    assert message.status == "success"
    result = message.artifact
    assert isinstance(result, DocumentResult)
    assert [p.page for p in result.pages] == [2, 3]
    # The pages, then (these small pages are shrunk at hd_num 1) the one line on lost detail.
    assert message.content == tool_text(result)
    assert message.content.startswith("\n\n".join(f"--- page {p.page} ---\n{p.text}" for p in result.pages))
    single = tool.invoke(tool_call("read_document", {"image": "report.pdf", "pages": "2", "hd_num": 1}))
    assert single.artifact.pages[0].text == result.pages[0].text
    assert single.content == tool_text(single.artifact) and single.content.startswith(result.pages[0].text)


async def test_async_invoke_matches_sync(toolkit: HD4KToolkit) -> None:
    tool = tools_by_name(toolkit)["answer_chart_question"]
    call = tool_call("answer_chart_question", {"image": "chart.png", "question": "What is Q2?", "hd_num": 1})
    sync_message = tool.invoke(call)
    async_message = await tool.ainvoke(call)
    assert async_message.status == "success"
    assert async_message.content == sync_message.content
    assert async_message.artifact.plan == sync_message.artifact.plan


async def test_async_call_does_not_block_the_event_loop(hd4k_tiny: HD4K, image_root: Path) -> None:
    # The model call waits (in its worker thread) until a coroutine on the event loop has run: if the
    # tool blocked the loop, the coroutine could not run and the call would time out instead.
    loop_ran = threading.Event()
    waited: list[bool] = []
    runner = CappedRunner(hd4k_tiny.runner, before_call=lambda _request: waited.append(loop_ran.wait(timeout=60)))
    tool = HD4KToolkit(runner, settings=ToolSettings(allowed_root=image_root)).get_tools()[2]

    async def mark() -> None:
        await asyncio.sleep(0)
        loop_ran.set()

    call = tool_call("describe_image", {"image": "chart.png", "hd_num": 1})
    message, _ = await asyncio.gather(tool.ainvoke(call), mark())
    assert waited == [True]
    assert message.status == "success"


# ----------------------------------------------------------------------------------------------------
# Untrusted arguments: each becomes an error ToolMessage the LLM can act on; nothing is read outside
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hostile_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An allowed folder with traps: a symlink to a valid PNG outside it, a huge PNG, a text file."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "root"
    root.mkdir()
    outside = base / "secret.png"
    chart_image().save(outside)  # a valid image: reading it would *succeed*, so an error proves refusal
    os.symlink(outside, root / "link.png")
    (root / "huge.png").write_bytes(huge_png())
    (root / "notes.png").write_text("this is a text file, not an image\n" * 10)
    return root


HOSTILE_ARGUMENTS = [
    ("../../etc/passwd", "PathNotAllowedError", "outside the allowed directories"),
    ("/etc/passwd", "PathNotAllowedError", "outside the allowed directories"),
    ("../secret.png", "PathNotAllowedError", "outside the allowed directories"),
    ("link.png", "PathNotAllowedError", "outside the allowed directories"),
    ("http://127.0.0.1/", "URLNotAllowedError", ""),
    ("http://169.254.169.254/latest/meta-data/", "URLNotAllowedError", ""),
    ("huge.png", "ImageTooLargeError", "pixels"),
    ("notes.png", "UnsupportedFormatError", "text"),
    ("file:///etc/passwd", "URLNotAllowedError", "scheme"),
    ("image://img-99", "InputError", "No image is registered"),
]


@pytest.mark.parametrize("allow_urls", [False, True], ids=["urls-off", "urls-on"])
@pytest.mark.parametrize(("argument", "error", "hint"), HOSTILE_ARGUMENTS)
def test_hostile_argument_becomes_error_tool_message(
    hd4k_capped: HD4K, hostile_root: Path, allow_urls: bool, argument: str, error: str, hint: str
) -> None:
    settings = ToolSettings(allowed_root=hostile_root, allow_urls=allow_urls)
    tool = HD4KToolkit(hd4k_capped, settings=settings).get_tools()[2]
    message = tool.invoke(tool_call("describe_image", {"image": argument, "hd_num": 1}))
    assert isinstance(message, ToolMessage)
    assert message.status == "error"
    assert message.content.startswith(f"Error ({error}):"), message.content
    assert hint in message.content
    if argument.startswith("http"):
        # With URLs off the tool says so; with URLs on, the private address itself is refused.
        expected = "Only public hosts are fetched" if allow_urls else "URLs are disabled for this tool"
        assert expected in message.content


async def test_hostile_argument_async(hd4k_capped: HD4K, hostile_root: Path) -> None:
    tool = HD4KToolkit(hd4k_capped, settings=ToolSettings(allowed_root=hostile_root)).get_tools()[0]
    message = await tool.ainvoke(tool_call("read_document", {"image": "link.png"}))
    assert message.status == "error"
    assert "PathNotAllowedError" in message.content


def test_no_allowed_root_means_no_file_access(hd4k_capped: HD4K, image_root: Path) -> None:
    tool = HD4KToolkit(hd4k_capped).get_tools()[1]
    message = tool.invoke(
        tool_call("answer_chart_question", {"image": str(image_root / "chart.png"), "question": "Which is highest?"})
    )
    assert message.status == "error"
    assert "may not read files" in message.content


def test_settings_limit_pixels(hd4k_capped: HD4K, image_root: Path) -> None:
    settings = ToolSettings(allowed_root=image_root, max_pixels=10_000)  # chart.png has 28,800 pixels
    tool = HD4KToolkit(hd4k_capped, settings=settings).get_tools()[2]
    message = tool.invoke(tool_call("describe_image", {"image": "chart.png"}))
    assert message.status == "error"
    assert "ImageTooLargeError" in message.content
    assert "max_pixels=10,000" in message.content


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        ({"image": "chart.png", "hd_num": 500}, "hd_num: Input should be less than or equal to 100"),
        ({"image": "chart.png", "hd_num": 0}, "hd_num: Input should be greater than or equal to 1"),
        ({"image": "chart.png", "colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"hd_num": 4}, "image: Field required"),
        ({"image": "chart.png", "detail": "medium"}, "detail: Input should be 'brief' or 'detailed'"),
    ],
)
def test_invalid_arguments_become_error_tool_message(toolkit: HD4KToolkit, args: dict[str, Any], problem: str) -> None:
    message = tools_by_name(toolkit)["describe_image"].invoke(tool_call("describe_image", args))
    assert message.status == "error"
    assert message.content.startswith("Error (InputError): Invalid arguments for describe_image:")
    assert problem in message.content
    assert message.content.endswith("Its arguments are: image, detail, hd_num, region.")


def test_unexpected_errors_are_not_hidden(toolkit: HD4KToolkit, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only HD4KError (an input problem) becomes an error message for the LLM; a bug surfaces.
    tool = tools_by_name(toolkit)["describe_image"]
    monkeypatch.setattr(tool.agent_tools, "run", lambda *_, **__: 1 / 0)  # the tools call AgentTools.run
    with pytest.raises(ZeroDivisionError):
        tool.invoke(tool_call("describe_image", {"image": "chart.png"}))


# ----------------------------------------------------------------------------------------------------
# Images the agent already holds: image:// references
# ----------------------------------------------------------------------------------------------------
def test_register_image_and_use_the_reference(toolkit: HD4KToolkit) -> None:
    image = chart_image()
    ref_bytes = toolkit.register_image(png_bytes(image))
    ref_pil = toolkit.register_image(image, name="chart")
    ref_data_url = toolkit.register_image(to_data_url(image))
    assert ref_bytes == "image://img-1"
    assert ref_pil == "image://chart"
    assert ref_data_url == "image://img-2"
    tool = tools_by_name(toolkit)["describe_image"]
    answers = [
        tool.invoke(tool_call("describe_image", {"image": ref, "detail": "brief", "hd_num": 1}))
        for ref in (ref_bytes, ref_pil, ref_data_url, "chart.png")
    ]
    assert all(a.status == "success" for a in answers)
    # The same pixels through four routes: the same plan and the same (greedy) answer.
    assert len({a.content for a in answers}) == 1
    assert len({a.artifact.plan for a in answers}) == 1


def test_register_image_refuses_paths_and_bad_base64(toolkit: HD4KToolkit, image_root: Path) -> None:
    with pytest.raises(ValueError, match="file paths and URLs are passed to the tools directly"):
        toolkit.register_image(str(image_root / "chart.png"))
    with pytest.raises(ValueError, match="does not decode"):
        toolkit.register_image("data:image/png;base64,@@@not-base64@@@")


def test_register_message_images_all_formats(toolkit: HD4KToolkit) -> None:
    data = png_bytes(chart_image())
    b64 = base64.b64encode(data).decode()
    message = HumanMessage(
        content=[
            {"type": "text", "text": "What do these show?"},
            {"type": "image", "base64": b64, "mime_type": "image/png"},  # v1 standard block
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},  # OpenAI
            {"type": "image", "source_type": "base64", "data": b64, "mime_type": "image/png"},  # v0
            {"type": "image", "url": "https://example.com/cat.png"},  # not copied: URLs are passed as URLs
        ]
    )
    refs = toolkit.register_message_images(message)
    assert refs == ["image://img-1", "image://img-2", "image://img-3"]
    assert all(toolkit.registry.get(ref) == data for ref in refs)
    tool = tools_by_name(toolkit)["answer_chart_question"]
    answer = tool.invoke(tool_call("answer_chart_question", {"image": refs[1], "question": "Q1?", "hd_num": 1}))
    assert answer.status == "success"
    assert answer.artifact.plan.input_size == (240, 120)


def test_data_url_argument(toolkit: HD4KToolkit) -> None:
    tool = tools_by_name(toolkit)["describe_image"]
    message = tool.invoke(
        tool_call("describe_image", {"image": to_data_url(chart_image()), "detail": "brief", "hd_num": 1})
    )
    assert message.status == "success"
    assert message.artifact.plan.input_size == (240, 120)


# ----------------------------------------------------------------------------------------------------
# http(s) URL arguments: fetched only with allow_urls, from a loopback host only with allow_private_urls
# ----------------------------------------------------------------------------------------------------
URL_TOOL_ARGS = {
    "read_document": {"hd_num": 1},
    "answer_chart_question": {"question": "Which quarter is highest?", "hd_num": 1},
    "describe_image": {"detail": "brief", "hd_num": 1},
}


def _url_calls(url: str) -> dict[str, dict[str, Any]]:
    return {name: tool_call(name, {"image": url, **args}) for name, args in URL_TOOL_ARGS.items()}


@pytest.mark.parametrize(
    "allowance",
    [{"allow_private_urls": True}, {"allowed_private_hosts": frozenset({"127.0.0.1"})}],
    ids=["all-private-hosts", "loopback-host-by-name"],
)
def test_allowed_url_is_fetched_from_a_local_server(hd4k_capped: HD4K, allowance: dict[str, Any]) -> None:
    settings = ToolSettings(allow_urls=True, **allowance)
    tools = tools_by_name(HD4KToolkit(hd4k_capped, settings=settings))
    expected = plan(240, 120, 1)
    with local_image_server(png_bytes(chart_image())) as server:
        messages = {name: tools[name].invoke(call) for name, call in _url_calls(f"{server.url}/chart.png").items()}
        assert server.hits == ["/chart.png"] * 3
    for name, message in messages.items():
        assert message.status == "success", (name, message.content)
        result = message.artifact.pages[0] if name == "read_document" else message.artifact
        assert result.plan is not None
        grid = (result.plan.input_size, result.plan.rows, result.plan.cols)
        assert grid == ((240, 120), expected.rows, expected.cols)
        assert result.usage.image_tokens == expected.num_tokens
        assert message.content  # the tiny model answered with text
    # The downloaded pixels are the data URL's: the same greedy answer.
    inline = tools["describe_image"].invoke(
        tool_call("describe_image", {"image": to_data_url(chart_image()), **URL_TOOL_ARGS["describe_image"]})
    )
    assert messages["describe_image"].content == inline.content


async def test_allowed_url_async(hd4k_capped: HD4K) -> None:
    tool = tools_by_name(HD4KToolkit(hd4k_capped, settings=ToolSettings(allow_urls=True, allow_private_urls=True)))
    with local_image_server(png_bytes(chart_image())) as server:
        message = await tool["describe_image"].ainvoke(_url_calls(f"{server.url}/c.png")["describe_image"])
        assert server.hits == ["/c.png"]
    assert message.status == "success"
    assert message.artifact.plan.input_size == (240, 120)


@pytest.mark.parametrize(
    ("settings", "hint"),
    [
        (ToolSettings(allow_urls=True), "Only public hosts are fetched"),
        # The exemption is per host as written in the URL: another name for loopback does not count.
        (ToolSettings(allow_urls=True, allowed_private_hosts=frozenset({"localhost"})), "Only public hosts"),
        (ToolSettings(allow_private_urls=True), "URLs are disabled for this tool"),
    ],
    ids=["urls-without-private-hosts", "other-host-exempted", "private-hosts-without-urls"],
)
def test_local_url_refused_without_both_allowances(hd4k_capped: HD4K, settings: ToolSettings, hint: str) -> None:
    tools = tools_by_name(HD4KToolkit(hd4k_capped, settings=settings))
    with local_image_server(png_bytes(chart_image())) as server:
        for name, call in _url_calls(f"{server.url}/chart.png").items():
            message = tools[name].invoke(call)
            assert message.status == "error", name
            assert message.content.startswith("Error (URLNotAllowedError):")
            assert hint in message.content
        assert server.hits == []
