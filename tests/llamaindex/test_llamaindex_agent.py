"""Agent loops (FunctionAgent, ReActAgent) calling the hd4k tools on real files with the tiny model.

The agents' LLMs are scripted: LlamaIndex's ``MockFunctionCallingLLM`` for ``FunctionAgent``, a
text-only ``ScriptedTextLLM`` (llamaindex_support) for ``ReActAgent``; the tools run the real
pipeline over the tiny checkpoint. Each test checks what the agent recorded (``ToolCallResult``) and
what the scripted LLM was shown on its next turn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from image_server import local_image_server
from llama_index.core.agent.workflow import AgentOutput, FunctionAgent, ReActAgent, ToolCallResult
from llama_index.core.base.llms.types import ChatMessage, MessageRole, ToolCallBlock
from llama_index.core.llms.mock import MockFunctionCallingLLM
from llama_index_hd4k import HD4KToolSpec
from llamaindex_support import (
    RecordingRunner,
    ScriptedTextLLM,
    file_hash,
    write_huge_png,
    write_image,
)

from hd4k_tools import HD4K, ChartResult, DocumentResult, TaskResult, ToolSettings

FINAL = "Final answer: done looking."

# Raised inside llama-index-workflows (inspect.getmembers over pydantic models) and ReActAgent, not by us.
pytestmark = [
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20"),
    pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince211"),
    pytest.mark.filterwarnings("ignore:is_running called from within a step:DeprecationWarning"),
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "allowed"
    write_image(folder / "photo.png", (200, 60, 60), label="cat")
    write_image(folder / "chart.png", (60, 60, 200), size=(120, 80), label="42")
    write_image(folder / "scan.png", (240, 240, 240), size=(80, 110), label="Invoice 7")
    return folder


Call = tuple[str, dict[str, Any]]


class FunctionCallScript:
    """Response generator for ``MockFunctionCallingLLM``: one tool call per turn, then ``FINAL``.
    Records the TOOL messages the agent showed it."""

    def __init__(self, calls: Sequence[Call]) -> None:
        self.calls = list(calls)
        self.tool_messages: list[str] = []

    def __call__(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatMessage:
        tool_messages = [m for m in messages if m.role == MessageRole.TOOL]
        self.tool_messages = [m.content or "" for m in tool_messages]
        turn = len(tool_messages)
        if turn < len(self.calls):
            name, arguments = self.calls[turn]
            call = ToolCallBlock(tool_call_id=f"call-{turn}", tool_name=name, tool_kwargs=arguments)
            return ChatMessage(role=MessageRole.ASSISTANT, blocks=[call])
        return ChatMessage(role=MessageRole.ASSISTANT, content=FINAL)


def react_turns(calls: Sequence[Call]) -> list[str]:
    """What a text-only LLM says in a ReAct loop: Thought/Action/Action Input per call, then an Answer."""
    turns = [
        "Thought: I need to use a tool to help me answer the question.\n"
        f"Action: {name}\nAction Input: {json.dumps(arguments)}"
        for name, arguments in calls
    ]
    return [*turns, f"Thought: I can answer without using any more tools.\nAnswer: {FINAL}"]


def observations_shown(llm: ScriptedTextLLM, results: Sequence[ToolCallResult]) -> list[bool]:
    """For each tool result, whether the LLM's next prompt ends with it as the newest observation
    (the prompt text is the conversation, then ``assistant:`` for the LLM to continue)."""
    return [
        llm.prompts[turn].rstrip().endswith(f"user: Observation: {result.tool_output.content}\nassistant:")
        for turn, result in enumerate(results, start=1)
    ]


async def run_agent(agent: FunctionAgent | ReActAgent, question: str) -> tuple[list[ToolCallResult], AgentOutput]:
    handler = agent.run(user_msg=question)
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    return results, await handler


HAPPY_CALLS: list[Call] = [
    ("describe_image", {"image": "photo.png", "detail": "brief", "hd_num": 1}),
    ("answer_chart_question", {"image": "chart.png", "question": "What is the value?", "hd_num": 1}),
    ("read_document", {"image": "scan.png", "hd_num": 1}),
]


def expected_texts(runner: RecordingRunner, root: Path) -> list[str]:
    """The same three calls straight through the core (greedy decoding is deterministic)."""
    hd = HD4K(RecordingRunner(runner.inner, runner.max_new_tokens))
    return [
        hd.describe_image(root / "photo.png", detail="brief", hd_num=1).text,
        hd.answer_chart_question(root / "chart.png", "What is the value?", hd_num=1).text,
        hd.read_document(root / "scan.png", hd_num=1).text,
    ]


def check_happy_results(results: list[ToolCallResult], runner: RecordingRunner, root: Path) -> None:
    assert [r.tool_name for r in results] == [name for name, _ in HAPPY_CALLS]
    assert [r.tool_kwargs for r in results] == [args for _, args in HAPPY_CALLS]
    types = [TaskResult, ChartResult, DocumentResult]
    for result, expected_type in zip(results, types, strict=True):
        output = result.tool_output
        assert not output.is_error, output.content
        assert output.content, "the tiny model answers in visible text"
        assert isinstance(output.raw_output, expected_type)
        assert output.content == output.raw_output.text
        pages = output.raw_output.pages if isinstance(output.raw_output, DocumentResult) else [output.raw_output]
        assert [p.plan.hd_num for p in pages] == [1]
        assert pages[0].plan.image_tokens > 0 and pages[0].usage.completion_tokens > 0
    # The pixels of the named files reached the model, in order.
    assert runner.image_hashes() == [file_hash(root / name) for name in ("photo.png", "chart.png", "scan.png")]
    assert [r.tool_output.content for r in results] == expected_texts(runner, root)


async def test_function_agent_calls_each_tool(runner: RecordingRunner, root: Path) -> None:
    script = FunctionCallScript(HAPPY_CALLS)
    tools = HD4KToolSpec(HD4K(runner), ToolSettings(allowed_root=root)).to_tool_list()
    agent = FunctionAgent(tools=tools, llm=MockFunctionCallingLLM(response_generator=script))
    results, output = await run_agent(agent, "Look at my three files.")
    check_happy_results(results, runner, root)
    assert script.tool_messages == [r.tool_output.content for r in results]  # what the LLM was shown
    assert output.response.content == FINAL


async def test_react_agent_calls_each_tool(runner: RecordingRunner, root: Path) -> None:
    llm = ScriptedTextLLM(responses=react_turns(HAPPY_CALLS))
    assert not llm.metadata.is_function_calling_model
    tools = HD4KToolSpec(HD4K(runner), ToolSettings(allowed_root=root)).to_tool_list()
    agent = ReActAgent(tools=tools, llm=llm)
    results, output = await run_agent(agent, "Look at my three files.")
    check_happy_results(results, runner, root)  # parsed from text, run on the real files and model
    assert len(llm.prompts) == len(HAPPY_CALLS) + 1
    # The tools were offered in the prompt text, and each observation reached the next prompt.
    assert all(f"> Tool Name: {name}" in llm.prompts[0] for name, _ in HAPPY_CALLS)
    assert observations_shown(llm, results) == [True] * len(HAPPY_CALLS)
    assert output.response.content == FINAL


async def test_untrusted_arguments_through_the_agent(runner: RecordingRunner, root: Path, tmp_path: Path) -> None:
    outside = write_image(tmp_path / "outside" / "secret.png", (1, 2, 3))
    os.symlink(outside, root / "link.png")
    write_huge_png(root / "huge.png")
    (root / "notes.png").write_text("Meeting notes: nothing to see here.\n" * 20)
    with local_image_server(b"\x89PNG\r\n\x1a\n") as server:
        calls: list[Call] = [
            ("describe_image", {"image": "../../etc/passwd"}),
            ("describe_image", {"image": "link.png"}),
            ("describe_image", {"image": f"{server.url}/cat.png"}),
            ("describe_image", {"image": "http://169.254.169.254/latest/meta-data/"}),
            ("read_document", {"image": "huge.png"}),
            ("answer_chart_question", {"image": "notes.png", "question": "What is the total?"}),
        ]
        script = FunctionCallScript(calls)
        # URLs on, so that the private-address guard (not the URL switch) is what refuses 127.0.0.1.
        settings = ToolSettings(allowed_root=root, allow_urls=True)
        agent = FunctionAgent(
            tools=HD4KToolSpec(HD4K(runner), settings).to_tool_list(),
            llm=MockFunctionCallingLLM(response_generator=script),
        )
        results, output = await run_agent(agent, "Try these files.")
        assert server.hits == []  # nothing was fetched

    expected = [
        ("PathNotAllowedError", "outside the allowed directories"),
        ("PathNotAllowedError", "after following symlinks"),
        ("URLNotAllowedError", "127.0.0.1"),
        ("URLNotAllowedError", "169.254.169.254"),
        ("ImageTooLargeError", "Downscale the image"),
        ("UnsupportedFormatError", "text, not an image"),
    ]
    assert len(results) == len(expected)
    for result, (error_type, hint) in zip(results, expected, strict=True):
        tool_output = result.tool_output
        assert tool_output.is_error
        assert tool_output.content.startswith(f"Error ({error_type}): "), tool_output.content
        assert hint in tool_output.content, tool_output.content
    assert runner.requests == []  # every refusal came before the model
    assert script.tool_messages == [r.tool_output.content for r in results]
    assert output.response.content == FINAL  # the agent carried on to its answer


async def test_react_agent_recovers_from_a_refused_path(runner: RecordingRunner, root: Path) -> None:
    calls: list[Call] = [
        ("describe_image", {"image": "/etc/hostname"}),
        ("describe_image", {"image": "photo.png", "hd_num": 1}),
    ]
    llm = ScriptedTextLLM(responses=react_turns(calls))
    agent = ReActAgent(tools=HD4KToolSpec(HD4K(runner), ToolSettings(allowed_root=root)).to_tool_list(), llm=llm)
    results, output = await run_agent(agent, "Describe /etc/hostname.")
    assert [r.tool_output.is_error for r in results] == [True, False]
    assert results[0].tool_output.content.startswith("Error (PathNotAllowedError)")
    assert results[1].tool_output.content == results[1].tool_output.raw_output.text
    assert observations_shown(llm, results) == [True, True]
    assert runner.image_hashes() == [file_hash(root / "photo.png")]
    assert output.response.content == FINAL
