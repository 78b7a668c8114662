"""What LangChain users take for granted (issue 13): token counts with the model's tokenizer and image
plans, trim_messages, a model name and the package version in traces, create_agent with a response
format, cancellation of a tool call stopping the model, tools generated from the task specs."""

from __future__ import annotations

import asyncio
from importlib import metadata
from pathlib import Path

import pytest
from fourth_task import COUNT, CountArgs
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages
from langchain_hd4k import ChatHD4K, HD4KToolkit
from langchain_hd4k.chat_models import model_display_name
from langchain_hd4k.tools import HD4KBaseTool
from langchain_helpers import ScriptedRunner, chart_image, png_bytes
from pydantic import BaseModel, Field
from slow_runner import SlowTokenRunner

from hd4k_tools import HD4K, TOOL_ARGS, ToolSettings, plan, to_data_url
from hd4k_tools.tasks import TASKS


def _image_message(text: str) -> HumanMessage:
    return HumanMessage(
        content=[
            {"type": "text", "text": text},
            {"type": "image_url", "image_url": {"url": to_data_url(chart_image())}},
        ]
    )


# -- token counts ------------------------------------------------------------------------------------
def test_get_num_tokens_uses_the_internlm2_tokenizer(hd4k_tiny: HD4K) -> None:
    chat = ChatHD4K(hd=hd4k_tiny)
    text = "The quarterly revenue rose by 12 percent."
    expected = len(hd4k_tiny.runner.tokenizer.encode(text, add_bos=False))  # type: ignore[attr-defined]
    assert chat.get_num_tokens(text) == expected > 0
    assert chat.get_token_ids(text) == hd4k_tiny.runner.tokenizer.encode(text, add_bos=False)  # type: ignore[attr-defined]


def test_message_tokens_equal_the_prompt_the_model_reads(hd4k_tiny: HD4K) -> None:
    chat = ChatHD4K(hd=hd4k_tiny, hd_num=4, max_new_tokens=1)
    messages = [SystemMessage("Be brief."), _image_message("What is the highest bar?")]
    counted = chat.get_num_tokens_from_messages(messages)
    result = chat.invoke(messages)
    assert counted == result.usage_metadata["input_tokens"]  # type: ignore[index]
    image_tokens = plan(*chart_image().size, 4).num_tokens
    text_only = chat.get_num_tokens_from_messages(
        [SystemMessage("Be brief."), HumanMessage("What is the highest bar?")]
    )
    # The image's tokens come from its HD-N plan; the chat layout puts a BOS before the text after it.
    assert counted - text_only == image_tokens + 1


def test_trim_messages_budgets_images(hd4k_tiny: HD4K) -> None:
    chat = ChatHD4K(hd=hd4k_tiny, hd_num=4)
    history = [
        _image_message("Describe the first chart."),
        AIMessage("Bars."),
        HumanMessage("And the total?"),
    ]
    full = chat.get_num_tokens_from_messages(history)
    image_tokens = plan(*chart_image().size, 4).num_tokens
    kept = trim_messages(history, max_tokens=full - image_tokens, token_counter=chat, strategy="last")
    assert kept and kept[-1].text == "And the total?"
    assert all(not isinstance(m.content, list) for m in kept)  # the image turn no longer fits
    assert chat.get_num_tokens_from_messages(kept) <= full - image_tokens


# -- traces --------------------------------------------------------------------------------------------
def test_traces_carry_a_model_name_and_the_package_version(hd4k_tiny: HD4K, tiny_checkpoint: Path) -> None:
    params = ChatHD4K(hd=hd4k_tiny)._get_ls_params()
    assert params["ls_model_name"] == hd4k_tiny.model_id == "tiny-ixc2-4khd"
    # A runner that names its model by the checkpoint folder: the trace gets the folder's name, never its path.
    by_path = ScriptedRunner(["ok"])
    by_path.model_id = str(tiny_checkpoint)  # type: ignore[misc]
    params = ChatHD4K(hd=HD4K(by_path))._get_ls_params()
    assert params["ls_model_name"] == tiny_checkpoint.name
    assert params["ls_integration"] == f"langchain-hd4k/{metadata.version('langchain-hd4k')}"
    assert model_display_name("internlm/internlm-xcomposer2-4khd-7b") == "internlm/internlm-xcomposer2-4khd-7b"
    assert ChatHD4K(hd=hd4k_tiny, model_name="ixc")._get_ls_params()["ls_model_name"] == "ixc"


# -- create_agent with a response format ----------------------------------------------------------------
class Reading(BaseModel):
    label: str = Field(description="The label of the highest bar")
    value: int


def test_create_agent_response_format_works_by_json_prompting() -> None:
    from langchain.agents import create_agent

    runner = ScriptedRunner(["The highest is Q2.", 'Here: {"label": "Q2", "value": 80}'])
    agent = create_agent(ChatHD4K(hd=HD4K(runner)), tools=[], response_format=Reading)
    out = agent.invoke({"messages": [_image_message("Read the highest bar.")]})
    assert out["structured_response"] == Reading(label="Q2", value=80)
    # First answer had no JSON: one retry carried the complaint; the model saw the image both times.
    assert len(runner.requests) == 2
    assert runner.prompts[1].startswith("Your answer was not valid")
    assert all(len(r.images) == 1 for r in runner.requests)


def test_bound_tools_are_still_refused() -> None:
    from langchain.agents import create_agent
    from langchain_core.tools import tool

    @tool
    def noop(x: int) -> int:
        """Return x."""
        return x

    agent = create_agent(ChatHD4K(hd=HD4K(ScriptedRunner(["{}"]))), tools=[noop], response_format=Reading)
    with pytest.raises(NotImplementedError, match="no native tool calling"):
        agent.invoke({"messages": [HumanMessage("hi")]})


# -- cancellation ----------------------------------------------------------------------------------------
async def test_cancelling_a_tool_call_stops_the_model_at_the_next_token(tmp_path: Path) -> None:
    (tmp_path / "chart.png").write_bytes(png_bytes(chart_image()))
    runner = SlowTokenRunner(max_tokens=2000, seconds_per_token=0.01)
    tool = HD4KToolkit(HD4K(runner), settings=ToolSettings(allowed_root=tmp_path)).get_tools()[2]
    call = asyncio.ensure_future(tool.ainvoke({"image": "chart.png", "hd_num": 1}))
    await asyncio.to_thread(runner.started.wait, 10)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # The worker saw the cancel event and returned long before its 2000 tokens.
    assert await asyncio.to_thread(runner.finished.wait, 10)
    assert runner.cancelled and runner.tokens < 2000


# -- tools from the task specs -------------------------------------------------------------------------
def test_a_fourth_task_needs_no_edit_in_the_toolkit(hd4k_tiny: HD4K) -> None:
    # An explicit task registry (no global mutation): the toolkit offers exactly its tools.
    tasks = TASKS.with_tasks(COUNT)
    tools = HD4KToolkit(hd4k_tiny, tasks=tasks).get_tools()
    assert [t.name for t in tools] == [*TOOL_ARGS, "count_objects"]
    new = tools[-1]
    assert type(new) is HD4KBaseTool and new.args_schema is CountArgs
    assert new.description == COUNT.description == "Count objects of a kind in an image."
    assert [type(t).__name__ for t in tools[:3]] == [
        "HD4KReadDocumentTool",
        "HD4KChartQuestionTool",
        "HD4KDescribeImageTool",
    ]
    assert set(TASKS) >= {"read_document", "answer_chart_question", "describe_image"}
