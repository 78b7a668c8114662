"""A task is one row: a TaskSpec added in this test alone (an explicit TaskRegistry, no global state) is a
command-line sub-command, an MCP tool, a LangChain tool and a LlamaIndex tool, and runs through
HD4K.run_task like the three built-in tasks."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from fourth_task import COUNT, TASKS4, CountArgs, CountResult
from PIL import Image

from hd4k_tools import HD4K, AgentTools, ToolSettings
from hd4k_tools.cli import model_commands
from hd4k_tools.cli.main import build_parser, main
from hd4k_tools.errors import InputError
from hd4k_tools.mcp.server import tool_definitions
from hd4k_tools.results import PlanSummary
from hd4k_tools.runtime.runner import GenerationRequest, RunnerResult, TextStream
from hd4k_tools.tasks import TASKS


class EchoRunner:
    """Answers with the request's prompt text (so a test sees what the task sent)."""

    model_id = "echo"
    context_length = 16384

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        self.requests.append(request)
        text = " ".join(m.text for m in request.messages)
        return RunnerResult(text=text, model=self.model_id, plans=[PlanSummary.from_plan(p) for p in request.plans()])

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        result = self.generate(request)
        return TextStream(iter([result.text]), [result], threading.Event())

    def close(self) -> None:
        pass


@pytest.fixture
def image_file(tmp_path: Path) -> Path:
    path = tmp_path / "img.png"
    Image.new("RGB", (400, 300), "white").save(path)
    return path


def test_the_registry_is_immutable_and_the_default_unchanged() -> None:
    assert "count_objects" in TASKS4 and "count_objects" not in TASKS
    assert list(TASKS4.tools()) == ["read_document", "answer_chart_question", "describe_image", "count_objects"]
    with pytest.raises(ValueError, match="Two tasks"):
        type(TASKS)([COUNT, COUNT])


def test_run_task_runs_a_spec_and_the_wrappers_are_the_same_path() -> None:
    runner = EchoRunner()
    hd = HD4K(runner)
    image = Image.new("RGB", (400, 300), "white")
    result = hd.run_task(COUNT, image, what="cats")
    assert isinstance(result, CountResult) and result.task == "count_objects"
    assert result.text == "How many cats are there?" and result.what == "cats"
    assert result.hd_num == 9 and runner.requests[-1].generation.max_new_tokens == 8
    assert "".join(hd.stream_task(COUNT, image, what="dogs")) == "How many dogs are there?"
    # The named wrappers are run_task with the task's name.
    assert hd.describe_image(image, detail="brief").text == hd.run_task("describe_image", image, detail="brief").text
    with pytest.raises(InputError, match=r"does not take \['colour'\]"):
        hd.run_task(COUNT, image, what="cats", colour="red")
    with pytest.raises(InputError, match="pages="):
        hd.run_task(COUNT, image, what="cats", pages="1")
    with pytest.raises(InputError, match="Unknown task 'nope'"):
        hd.run_task("nope", image)


@pytest.mark.parametrize(
    ("method", "generic", "task"),
    [
        ("describe_image", "run_task", "describe_image"),
        ("stream_describe_image", "stream_task", "describe_image"),
        ("answer_chart_question", "run_task", "answer_chart_question"),
        ("stream_answer_chart_question", "stream_task", "answer_chart_question"),
        ("read_document", "run_task", "read_document"),
        ("stream_read_document", "stream_task", "read_document"),
    ],
)
def test_every_named_wrapper_forwards_each_of_its_arguments(method: str, generic: str, task: str) -> None:
    """The named task methods are one call of the generic path carrying every argument they take."""
    import inspect

    hd = HD4K(EchoRunner())
    calls: list[tuple[Any, dict[str, Any]]] = []
    setattr(hd, generic, lambda spec, **kw: calls.append((spec, kw)))
    params = [p for p in inspect.signature(getattr(hd, method)).parameters.values() if p.kind is not p.VAR_KEYWORD]
    values = {p.name: object() for p in params}
    getattr(hd, method)(**values, max_new_tokens=5)
    assert calls == [(task, {**values, "max_new_tokens": 5})]


async def test_async_forms() -> None:
    hd = HD4K(EchoRunner())
    image = Image.new("RGB", (400, 300), "white")
    assert (await hd.arun_task(COUNT, image, what="owls")).text == "How many owls are there?"
    assert [d async for d in hd.astream_task(COUNT, image, what="owls")] == ["How many owls are there?"]


def test_the_fourth_task_is_a_cli_command(
    image_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    args = build_parser(TASKS4).parse_args(["count", str(image_file), "--what", "cats", "--hd-num", "4"])
    assert args.what == "cats" and args.engine == "native"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["count", str(image_file)])  # not in the default registry
    capsys.readouterr()
    monkeypatch.setattr(model_commands, "_open", lambda args: HD4K(EchoRunner()))
    monkeypatch.setattr(model_commands, "_check_device", lambda args: None)
    monkeypatch.setattr(model_commands, "check_before_load", lambda *a, **k: None)  # a scripted facade
    assert main(["count", str(image_file), "--what", "cats"], tasks=TASKS4) == 0
    assert capsys.readouterr().out.strip() == "How many cats are there?"


def test_the_fourth_task_is_an_mcp_tool(image_file: Path) -> None:
    tools = AgentTools(HD4K(EchoRunner()), ToolSettings(allowed_root=image_file.parent), tasks=TASKS4)
    definitions = {t.name: t for t in tool_definitions(tools)}
    assert set(definitions) == set(TASKS4.tools())
    count = definitions["count_objects"]
    assert count.description == COUNT.description and "what" in count.input_schema["properties"]
    answer = tools.invoke("count_objects", {"image": image_file.name, "what": "cats"})
    assert answer.content == "How many cats are there?"
    with pytest.raises(InputError, match="Its arguments are: image, what, hd_num"):
        tools.invoke("count_objects", {"image": image_file.name})


def test_the_fourth_task_is_a_langchain_tool(image_file: Path) -> None:
    langchain_hd4k = pytest.importorskip("langchain_hd4k")
    toolkit = langchain_hd4k.HD4KToolkit(
        HD4K(EchoRunner()), settings=ToolSettings(allowed_root=image_file.parent), tasks=TASKS4
    )
    tool = {t.name: t for t in toolkit.get_tools()}["count_objects"]
    assert tool.args_schema is CountArgs and tool.description == COUNT.description
    assert tool.invoke({"image": image_file.name, "what": "cats"}) == "How many cats are there?"


def test_the_fourth_task_is_a_llamaindex_tool(image_file: Path) -> None:
    base = pytest.importorskip("llama_index.tools.hd4k")
    spec = base.HD4KToolSpec(HD4K(EchoRunner()), ToolSettings(allowed_root=image_file.parent), tasks=TASKS4)
    tool = {t.metadata.name: t for t in spec.to_tool_list()}["count_objects"]
    assert tool.metadata.fn_schema is CountArgs
    out: Any = tool.call(image=image_file.name, what="cats")
    assert out.content == "How many cats are there?" and not out.is_error


def test_task_commands_take_engine_from_the_engine_table(image_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hd4k_tools.runtime.engines import ENGINES

    for command in ("read", "chart", "describe"):
        parser = build_parser()
        assert parser.parse_args([command, str(image_file), "--engine", "vllm"]).engine == "vllm"
        with pytest.raises(SystemExit):
            parser.parse_args([command, str(image_file), "--engine", "nope"])
    assert set(ENGINES) >= {"native", "vllm"}
    capsys.readouterr()
    # A combination the engine cannot take is refused before anything loads.
    assert main(["describe", str(image_file), "--engine", "vllm", "--device", "cpu"]) == 2
    assert "--device is for --engine native" in capsys.readouterr().err


# -- one way to pass generation options ----------------------------------------------------------------
def test_generation_options_as_keywords_on_every_task_method() -> None:
    from hd4k_tools.errors import ConflictingOptionsError

    runner = EchoRunner()
    hd = HD4K(runner)
    image = Image.new("RGB", (400, 300), "white")
    hd.describe_image(image, max_new_tokens=8)
    assert runner.requests[-1].generation.max_new_tokens == 8
    hd.answer_chart_question(image, "Which?", num_beams=1, top_k=5)
    assert (runner.requests[-1].generation.num_beams, runner.requests[-1].generation.top_k) == (1, 5)
    hd.read_document(image, max_tokens=7, generation={"top_p": 0.5})
    assert runner.requests[-1].generation.max_new_tokens == 7 and runner.requests[-1].generation.top_p == 0.5
    hd.chat("hi", [image], temperature=0.7)
    gen = runner.requests[-1].generation
    assert gen.do_sample and gen.temperature == 0.7  # as in ChatHD4K: a temperature means sampling
    hd.run_task(COUNT, image, what="x", temperature=0)
    assert not runner.requests[-1].generation.do_sample  # 0: greedy, as in ChatHD4K and OpenAI
    assert "".join(hd.stream_describe_image(image, max_new_tokens=3))
    assert runner.requests[-1].generation.max_new_tokens == 3
    with pytest.raises(ConflictingOptionsError, match="max_new_tokens given both"):
        hd.describe_image(image, max_new_tokens=8, generation={"max_new_tokens": 9})
    with pytest.raises(ConflictingOptionsError, match="given twice"):
        hd.describe_image(image, max_new_tokens=8, max_tokens=9)
    with pytest.raises(InputError, match="max_new_tokens must be"):
        hd.describe_image(image, max_new_tokens=0)  # validated where every option is: GenerationConfig
    with pytest.raises(InputError, match="does not take"):
        hd.run_task("describe_image", image, max_new_token=8)  # a typo is named, never ignored


def test_the_keywords_are_those_of_chathd4k_and_toolsettings() -> None:
    from hd4k_tools.runtime.generation_config import GENERATION_OPTIONS

    assert {"max_new_tokens", "num_beams"} <= set(GENERATION_OPTIONS) & set(ToolSettings.model_fields)
    langchain_hd4k = pytest.importorskip("langchain_hd4k")
    chat_fields = set(langchain_hd4k.ChatHD4K.model_fields)
    assert {"max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "num_beams", "do_sample"} <= (
        chat_fields & set(GENERATION_OPTIONS)
    )
