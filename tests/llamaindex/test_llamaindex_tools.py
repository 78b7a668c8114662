"""HD4KToolSpec: LlamaIndex FunctionTools over the shared AgentTools, on the tiny checkpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from image_server import local_image_server
from llama_index.core.tools import FunctionTool, ToolOutput
from llama_index_hd4k import HD4KFunctionTool, HD4KToolSpec
from llamaindex_support import RecordingRunner, file_hash, png_bytes, write_image, write_pdf

from hd4k_tools import (
    HD4K,
    TOOL_ARGS,
    TOOL_DESCRIPTIONS,
    ChartResult,
    DocumentResult,
    ImageRegistry,
    PlanSummary,
    TaskResult,
    ToolAnswer,
    ToolSettings,
    errors,
    image_content_hash,
    load_image,
    plan,
)
from hd4k_tools.agent_tools import tool_text


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "allowed"
    write_image(folder / "photo.png", (200, 60, 60), label="cat")
    write_image(folder / "chart.png", (60, 60, 200), size=(120, 80), label="42")
    return folder


@pytest.fixture
def spec(runner: RecordingRunner, root: Path) -> HD4KToolSpec:
    return HD4KToolSpec(HD4K(runner), ToolSettings(allowed_root=root))


def tools_by_name(spec: HD4KToolSpec) -> dict[str, FunctionTool]:
    return {tool.metadata.name: tool for tool in spec.to_tool_list()}


def test_three_function_tools_with_shared_schemas_and_async(spec: HD4KToolSpec) -> None:
    tools = spec.to_tool_list()
    assert [t.metadata.name for t in tools] == ["read_document", "answer_chart_question", "describe_image"]
    for tool in tools:
        name = tool.metadata.name
        assert isinstance(tool, FunctionTool) and isinstance(tool, HD4KFunctionTool)
        assert tool.metadata.fn_schema is TOOL_ARGS[name]
        assert tool.metadata.description == TOOL_DESCRIPTIONS[name]
        assert tool.real_fn == getattr(spec, name)
        assert tool.async_fn == getattr(spec, "a" + name)
        # What an OpenAI-style function-calling LLM is shown.
        params = tool.metadata.to_openai_tool()["function"]["parameters"]
        assert "image" in params["required"] and "hd_num" in params["properties"]
    chart = tools[1].metadata.get_parameters_dict()
    assert set(chart["properties"]) == {"image", "question", "hd_num", "region"}


def test_subset_and_unknown_spec_functions(spec: HD4KToolSpec) -> None:
    assert [t.metadata.name for t in spec.to_tool_list(spec_functions=["describe_image"])] == ["describe_image"]
    with pytest.raises(ValueError, match="Unknown hd4k tool"):
        spec.to_tool_list(spec_functions=["delete_files"])


def test_describe_image_output_is_result_text_and_raw_output_is_result(
    spec: HD4KToolSpec, runner: RecordingRunner, root: Path
) -> None:
    out = tools_by_name(spec)["describe_image"].call(image="photo.png", detail="brief", hd_num=1)
    assert isinstance(out, ToolOutput) and not out.is_error
    result = out.raw_output
    assert isinstance(result, TaskResult) and result.task == "describe_image"
    assert out.content and out.content == result.text
    assert result.plan is not None and result.plan.hd_num == 1 and result.plan.image_tokens > 0
    assert runner.image_hashes() == [file_hash(root / "photo.png")]
    # Deterministic greedy decoding: the same call straight through the core gives the same text.
    direct = HD4K(runner).describe_image(root / "photo.png", detail="brief", hd_num=1)
    assert out.content == direct.text


async def test_async_chart_question(spec: HD4KToolSpec, runner: RecordingRunner, root: Path) -> None:
    out = await tools_by_name(spec)["answer_chart_question"].acall(
        image="chart.png", question="What is the value?", hd_num=1
    )
    assert not out.is_error
    assert isinstance(out.raw_output, ChartResult) and out.raw_output.question == "What is the value?"
    assert out.content and out.content == out.raw_output.text
    assert runner.image_hashes() == [file_hash(root / "chart.png")]
    assert "What is the value?" in runner.requests[0].messages[-1].text


def test_read_document_pdf_pages(spec: HD4KToolSpec, runner: RecordingRunner, root: Path) -> None:
    write_pdf(root / "report.pdf", ["Quarterly report", "Revenue table"])
    out = tools_by_name(spec)["read_document"].call(image="report.pdf", hd_num=1)
    assert not out.is_error
    result = out.raw_output
    assert isinstance(result, DocumentResult) and [p.page for p in result.pages] == [1, 2]
    # The pages, then (these small pages are shrunk at hd_num 1) the one line on lost detail.
    assert out.content == tool_text(result)
    assert out.content.startswith("\n\n".join(f"--- page {p.page} ---\n{p.text}" for p in result.pages))
    assert len(runner.requests) == 2

    runner.requests.clear()
    one = tools_by_name(spec)["read_document"].call(image="report.pdf", pages="2", hd_num=1)
    assert [p.page for p in one.raw_output.pages] == [2]
    assert one.content == tool_text(one.raw_output) and one.content.startswith(one.raw_output.pages[0].text)
    assert len(runner.requests) == 1


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"image": "../../etc/passwd"}, "PathNotAllowedError"),
        ({"image": "missing.png"}, "ImageNotFoundError"),
        ({"image": "http://127.0.0.1/x.png"}, "URLs are disabled"),
        ({"image": "file:///etc/passwd"}, "URLNotAllowedError"),
        ({"image": "photo.png", "hd_num": 500}, "Invalid arguments for describe_image: hd_num"),
        ({"image": "photo.png", "colour": "red"}, "Invalid arguments for describe_image: colour"),
        ({"detail": "brief"}, "Invalid arguments for describe_image: image: Field required"),
        ({"image": "image://img-9"}, "No image is registered"),
    ],
)
def test_errors_become_actionable_error_outputs(
    spec: HD4KToolSpec, runner: RecordingRunner, kwargs: dict[str, object], expected: str
) -> None:
    out = tools_by_name(spec)["describe_image"].call(**kwargs)
    assert out.is_error
    assert out.content.startswith("Error (")
    assert expected in out.content
    assert isinstance(out.exception, errors.HD4KError)
    assert out.raw_output is out.exception
    assert runner.requests == []  # refused before the model ran


async def test_async_errors_too(spec: HD4KToolSpec) -> None:
    out = await tools_by_name(spec)["read_document"].acall(image="../outside.pdf")
    assert out.is_error and "PathNotAllowedError" in out.content


def test_no_allowed_root_means_no_file_access(runner: RecordingRunner, root: Path) -> None:
    spec = HD4KToolSpec(HD4K(runner))  # default settings: no folder, no URLs
    out = tools_by_name(spec)["describe_image"].call(image=str(root / "photo.png"))
    assert out.is_error and "may not read files" in out.content
    assert runner.requests == []


def test_registry_references(runner: RecordingRunner) -> None:
    registry = ImageRegistry()
    ref = registry.add(png_bytes((10, 200, 10)), name="upload")
    spec = HD4KToolSpec(runner, registry=registry)  # a Runner is wrapped in an HD4K
    assert spec.registry is registry
    out = tools_by_name(spec)["describe_image"].call(image=ref, hd_num=1)
    assert not out.is_error and out.content == out.raw_output.text
    assert len(runner.requests) == 1


def test_spec_functions_called_directly_return_answers_and_raise(spec: HD4KToolSpec) -> None:
    answer = spec.describe_image("photo.png", detail="brief", hd_num=1)
    assert isinstance(answer, ToolAnswer) and answer.content == answer.result.text
    with pytest.raises(errors.PathNotAllowedError):
        spec.describe_image("../secret.png")
    with pytest.raises(errors.InputError, match="hd_num"):
        spec.answer_chart_question("chart.png", "Which bar?", hd_num=0)


async def test_allowed_url_is_fetched_and_read(runner: RecordingRunner, root: Path) -> None:
    size = (700, 300)
    body = png_bytes((30, 120, 200), size=size)
    with local_image_server(body) as server:
        url = f"{server.url}/chart.png"
        question = {"image": url, "question": "What is the largest value?", "hd_num": 4}

        # allow_urls alone keeps the private-address guard: the loopback server is never contacted.
        guarded = tools_by_name(HD4KToolSpec(HD4K(runner), ToolSettings(allowed_root=root, allow_urls=True)))
        refused = guarded["answer_chart_question"].call(**question)
        assert refused.is_error and isinstance(refused.raw_output, errors.URLNotAllowedError)
        assert refused.content.startswith("Error (URLNotAllowedError): ") and "127.0.0.1" in refused.content
        assert server.hits == [] and runner.requests == []

        # ToolSettings' explicit allowance for loopback/private hosts (it has no per-host list).
        settings = ToolSettings(allowed_root=root, allow_urls=True, allow_private_urls=True)
        tools = tools_by_name(HD4KToolSpec(HD4K(runner), settings))
        out = tools["answer_chart_question"].call(**question)
        assert server.hits == ["/chart.png"]
        described = await tools["describe_image"].acall(image=url, detail="brief", hd_num=1)
        assert server.hits == ["/chart.png", "/chart.png"]

    assert not out.is_error, out.content
    result = out.raw_output
    assert isinstance(result, ChartResult) and out.content == result.text
    assert result.plan == PlanSummary.from_plan(plan(*size, 4))
    assert result.plan.input_size == size and result.plan.grid == "1x2"
    assert not described.is_error and described.raw_output.plan == PlanSummary.from_plan(plan(*size, 1))
    assert runner.image_hashes() == [image_content_hash(load_image(body))] * 2  # the served pixels


async def test_cancelling_an_async_tool_call_stops_the_model_at_the_next_token(root: Path) -> None:
    from slow_runner import SlowTokenRunner

    runner = SlowTokenRunner(max_tokens=2000, seconds_per_token=0.01)
    tool = tools_by_name(HD4KToolSpec(HD4K(runner), ToolSettings(allowed_root=root)))["describe_image"]
    image = next(p.name for p in root.iterdir() if p.suffix == ".png")
    call = asyncio.ensure_future(tool.acall(image=image, hd_num=1))
    await asyncio.to_thread(runner.started.wait, 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await asyncio.to_thread(runner.finished.wait, 10)
    assert runner.cancelled and runner.tokens < 2000


def test_tools_follow_tool_args(runner: RecordingRunner) -> None:
    """A fourth task in an explicit task registry becomes a tool with its schema and description, with no
    edit here and no global mutation."""
    from fourth_task import COUNT, CountArgs

    from hd4k_tools.tasks import TASKS

    tools = HD4KToolSpec(HD4K(runner), tasks=TASKS.with_tasks(COUNT)).to_tool_list()
    assert [t.metadata.name for t in tools] == [*TOOL_ARGS, "count_objects"]
    assert tools[-1].metadata.fn_schema is CountArgs
    assert tools[-1].metadata.description == "Count objects of a kind in an image."
    assert [t.metadata.name for t in tools][:3] == ["read_document", "answer_chart_question", "describe_image"]
