"""Real agent loops (``langchain.agents.create_agent`` and langgraph's ``create_react_agent``) driving
the HD4K tools: a scripted tool-calling chat model makes the calls, the tools run the tiny model on
real files, and the answers come back as ToolMessages."""

from __future__ import annotations

import base64
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain.agents import create_agent
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_hd4k import HD4KToolkit
from langchain_helpers import chart_image, huge_png, png_bytes

from hd4k_tools import HD4K, ChartResult, DocumentResult, TaskResult, ToolSettings


class ScriptedToolModel(FakeMessagesListChatModel):
    """A chat model that replays scripted turns (tool calls, then a final answer) and records what
    it was shown; ``bind_tools`` is a no-op because the script already names the tools."""

    seen: list[list[BaseMessage]] = []  # noqa: RUF012 - pydantic field, copied per instance

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any) -> ScriptedToolModel:
        return self

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> Any:
        self.seen.append(list(messages))
        return super()._generate(messages, *args, **kwargs)


def calls(*specs: tuple[str, dict[str, Any]], prefix: str = "call") -> AIMessage:
    return AIMessage(
        content="",
        tool_calls=[
            {"type": "tool_call", "id": f"{prefix}-{i}", "name": name, "args": args}
            for i, (name, args) in enumerate(specs)
        ],
    )


@pytest.fixture
def root(tmp_path: Path) -> Path:
    chart_image().save(tmp_path / "chart.png")
    (tmp_path / "scan.png").write_bytes(png_bytes(chart_image().rotate(90, expand=True)))
    return tmp_path


@pytest.fixture
def toolkit(hd4k_capped: HD4K, root: Path) -> HD4KToolkit:
    return HD4KToolkit(hd4k_capped, settings=ToolSettings(allowed_root=root))


def tool_messages(messages: Sequence[BaseMessage]) -> list[ToolMessage]:
    return [m for m in messages if isinstance(m, ToolMessage)]


def check_successful_tool_messages(messages: Sequence[ToolMessage]) -> None:
    by_name = {m.name: m for m in messages}
    assert set(by_name) == {"read_document", "answer_chart_question", "describe_image"}
    for message in messages:
        assert message.status == "success", message.content
        result = message.artifact
        if isinstance(result, DocumentResult):
            assert len(result.pages) == 1
            result = result.pages[0]
        assert isinstance(result, TaskResult)
        assert result.plan is not None
        assert result.plan.hd_num == 1
        assert result.usage.image_tokens == result.plan.image_tokens
        assert message.content == result.text
        assert message.content  # the seed-3 weights answer with (random) text
    assert isinstance(by_name["answer_chart_question"].artifact, ChartResult)
    assert by_name["answer_chart_question"].artifact.question == "Which quarter is highest?"
    assert by_name["read_document"].artifact.pages[0].task == "read_document"
    assert by_name["describe_image"].artifact.task == "describe_image"


def successful_turn() -> AIMessage:
    """One turn calling each tool once on real files in the allowed folder."""
    return calls(
        ("read_document", {"image": "scan.png", "hd_num": 1}),
        ("answer_chart_question", {"image": "chart.png", "question": "Which quarter is highest?", "hd_num": 1}),
        ("describe_image", {"image": "chart.png", "detail": "brief", "hd_num": 1}),
    )


def test_create_agent_runs_each_tool(toolkit: HD4KToolkit) -> None:
    model = ScriptedToolModel(responses=[successful_turn(), AIMessage("Q2 is the highest quarter.")], seen=[])
    agent = create_agent(model, tools=toolkit.get_tools(), system_prompt="You answer questions about images.")
    out = agent.invoke({"messages": [HumanMessage("Read scan.png, then tell me about chart.png.")]})
    messages = out["messages"]
    check_successful_tool_messages(tool_messages(messages))
    assert messages[-1].content == "Q2 is the highest quarter."
    # The model's second turn saw the three tool results.
    assert len(model.seen) == 2
    assert tool_messages(model.seen[1]) == tool_messages(messages)


async def test_create_agent_async(toolkit: HD4KToolkit) -> None:
    model = ScriptedToolModel(responses=[successful_turn(), AIMessage("Done.")], seen=[])
    agent = create_agent(model, tools=toolkit.get_tools())
    out = await agent.ainvoke({"messages": [HumanMessage("Look at the images.")]})
    check_successful_tool_messages(tool_messages(out["messages"]))


def test_langgraph_create_react_agent(toolkit: HD4KToolkit) -> None:
    from langgraph.prebuilt import create_react_agent

    model = ScriptedToolModel(responses=[successful_turn(), AIMessage("Done.")], seen=[])
    with warnings.catch_warnings():
        # Deprecated in favour of langchain.agents.create_agent (tested above), still supported.
        warnings.simplefilter("ignore", DeprecationWarning)
        agent = create_react_agent(model, tools=toolkit.get_tools())
    out = agent.invoke({"messages": [HumanMessage("Look at the images.")]})
    check_successful_tool_messages(tool_messages(out["messages"]))
    assert out["messages"][-1].content == "Done."


def test_image_from_the_conversation_by_reference(toolkit: HD4KToolkit) -> None:
    # The user sends an image inline; the application registers it and tells the LLM its reference,
    # so the tool call carries "image://img-1", not base64.
    user = HumanMessage(
        content=[
            {"type": "text", "text": "What does this chart show?"},
            {"type": "image", "base64": base64.b64encode(png_bytes(chart_image())).decode(), "mime_type": "image/png"},
        ]
    )
    refs = toolkit.register_message_images(user)
    assert refs == ["image://img-1"]
    script = [
        calls(("describe_image", {"image": refs[0], "hd_num": 1})),
        AIMessage("It is a bar chart."),
    ]
    model = ScriptedToolModel(responses=script, seen=[])
    agent = create_agent(model, tools=toolkit.get_tools())
    out = agent.invoke({"messages": [user, HumanMessage(f"(The image above is {refs[0]}.)")]})
    (message,) = tool_messages(out["messages"])
    assert message.status == "success"
    assert message.artifact.plan.input_size == (240, 120)
    assert message.content == message.artifact.text


HOSTILE_CALLS: list[tuple[str, dict[str, Any], str]] = [
    ("describe_image", {"image": "../../etc/passwd"}, "PathNotAllowedError"),
    ("describe_image", {"image": "link.png"}, "PathNotAllowedError"),  # a symlink out of the root
    ("read_document", {"image": "http://127.0.0.1/"}, "URLNotAllowedError"),
    (
        "answer_chart_question",
        {"image": "http://169.254.169.254/latest/meta-data/", "question": "What is it?"},
        "URLNotAllowedError",
    ),
    ("describe_image", {"image": "huge.png"}, "ImageTooLargeError"),  # 20000x20000
    ("read_document", {"image": "notes.png"}, "UnsupportedFormatError"),  # a text file
    ("describe_image", {"image": "chart.png", "hd_num": 1000}, "InputError"),  # out of the schema
]


@pytest.fixture
def hostile_root(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    chart_image().save(outside)  # a valid image: reading it would succeed, so an error proves refusal
    (root / "link.png").symlink_to(outside)
    (root / "huge.png").write_bytes(huge_png())
    (root / "notes.png").write_text("meeting notes, not an image\n" * 20)
    return root


@pytest.mark.parametrize("allow_urls", [False, True], ids=["urls-off", "urls-on"])
def test_untrusted_arguments_become_errors_and_the_loop_goes_on(
    hd4k_capped: HD4K, hostile_root: Path, allow_urls: bool
) -> None:
    toolkit = HD4KToolkit(hd4k_capped, settings=ToolSettings(allowed_root=hostile_root, allow_urls=allow_urls))
    script = [
        calls(*((name, args) for name, args, _ in HOSTILE_CALLS), prefix="bad"),
        # The scripted model carries on after the errors: a corrected call, then the answer.
        calls(("describe_image", {"image": "chart.png", "hd_num": 1}), prefix="fixed"),
        AIMessage("Only chart.png could be read."),
    ]
    model = ScriptedToolModel(responses=script, seen=[])
    agent = create_agent(model, tools=toolkit.get_tools())
    out = agent.invoke({"messages": [HumanMessage("Look at these files.")]})
    messages = out["messages"]
    results = {m.tool_call_id: m for m in tool_messages(messages)}
    errors_seen = [results[f"bad-{i}"] for i in range(len(HOSTILE_CALLS))]
    expected = [error for _, _, error in HOSTILE_CALLS]
    assert [m.status for m in errors_seen] == ["error"] * len(expected)
    for message, error in zip(errors_seen, expected, strict=True):
        assert message.content.startswith(f"Error ({error}):"), message.content
    assert "Invalid arguments for describe_image: hd_num" in errors_seen[-1].content
    # The loop went on: the model saw the errors, its corrected call ran, and it answered.
    assert len(model.seen) == 3
    assert {m.tool_call_id for m in tool_messages(model.seen[1])} == {f"bad-{i}" for i in range(7)}
    assert results["fixed-0"].status == "success"
    assert results["fixed-0"].content == results["fixed-0"].artifact.text
    assert messages[-1].content == "Only chart.png could be read."
