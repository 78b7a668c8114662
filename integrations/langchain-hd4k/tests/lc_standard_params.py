"""The parameters LangChain's standard suites (``langchain-tests``) run ChatHD4K and the three tools with,
shared by ``unit_tests/`` and ``integration_tests/`` (the tiny random checkpoint of ``conftest.py``).

Every override of a standard test is an ``xfail`` with its reason (the suite itself checks that no
standard test is overridden without one). Every skip comes from a capability flag of the suite: each flag
is overridden explicitly in ``ChatParams``, with the reason next to it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
from langchain_core.tools import BaseTool
from langchain_hd4k import ChatHD4K, HD4KChartQuestionTool, HD4KDescribeImageTool, HD4KReadDocumentTool

from hd4k_tools import HD4K, ToolSettings

# Random tiny weights write valid structured output only because decoding is constrained to the schema;
# the JSON needs more than the suites' 8 new tokens, so those tests get a larger budget.
STRUCTURED_BUDGET = 80


class ChatParams:
    """Binds the shared tiny model to the suite's model parameters."""

    hd: HD4K

    @pytest.fixture(autouse=True)
    def _bind_model(self, hd4k_tiny: HD4K) -> None:
        self.hd = hd4k_tiny

    @property
    def chat_model_class(self) -> type[ChatHD4K]:
        return ChatHD4K

    @property
    def chat_model_params(self) -> dict[str, Any]:
        # Short answers keep the suites fast (max_new_tokens wins over the suite's standard max_tokens).
        return {"hd": self.hd, "max_new_tokens": 8}

    # -- capabilities the model has -------------------------------------------------------------------
    @property
    def has_structured_output(self) -> bool:
        # Constrained decoding to the schema (with_structured_output); see STRUCTURED_BUDGET.
        return True

    @property
    def supports_json_mode(self) -> bool:
        # method="json_mode" is accepted and works like json_schema (prompted JSON, validated); the
        # suite's test_json_mode is an xfail on random weights and passes on the scripted runner below.
        return True

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    # -- capabilities it lacks: each one skips the suite's tests named in the comment -----------------
    @property
    def has_tool_calling(self) -> bool:
        # No native tool calling: bind_tools raises a NotImplementedError that explains the alternative
        # (HD4KToolkit for a tool-calling LLM). Skips every tool-calling test.
        return False

    @property
    def has_tool_choice(self) -> bool:
        # Would be inferred True from bind_tools' `tool_choice` parameter, but bind_tools always raises.
        # Skips test_tool_choice.
        return False

    @property
    def supports_image_urls(self) -> bool:
        # http(s) image URLs are refused unless allow_image_urls=True (SSRF safety), and the suite's URL
        # is on the internet while tests run offline. Honestly supported when enabled: fetching from a
        # local server is tested in test_langchain_chat_model.py.
        return False

    @property
    def supports_pdf_inputs(self) -> bool:
        # The model reads images; PDFs go through HD4KDocumentLoader or the read_document tool (a PDF
        # block raises InputError saying so). Skips test_pdf_inputs.
        return False

    @property
    def supports_audio_inputs(self) -> bool:
        # A vision-language model: no audio encoder. Skips test_audio_inputs.
        return False

    @property
    def supports_video_inputs(self) -> bool:
        # No video input (frames could be sent as images). No test of the suite uses this flag yet.
        return False

    @property
    def supports_image_tool_message(self) -> bool:
        # Images inside a ToolMessage are read (test_image_in_a_tool_message_reaches_the_model), but the
        # suite's test binds a tool (bind_tools raises) and downloads its image. Skips
        # test_image_tool_message.
        return False

    @property
    def supports_pdf_tool_message(self) -> bool:
        # No PDF inputs (see supports_pdf_inputs), and the test binds a tool. Skips test_pdf_tool_message.
        return False

    @property
    def supports_anthropic_inputs(self) -> bool:
        # The test replays an Anthropic tool_use turn through bind_tools (no tool calling) and downloads
        # an image. Anthropic-format image blocks themselves are read (test_langchain_chat_model.py).
        # Skips test_anthropic_inputs.
        return False

    @property
    def supports_model_override(self) -> bool:
        # One ChatHD4K wraps one loaded model; a per-call `model=` cannot switch weights. Skips the four
        # test_[a]invoke/[a]stream_with_model_override tests.
        return False

    @property
    def model_override_value(self) -> str | None:
        # No other model to switch to (see supports_model_override).
        return None

    @property
    def enable_vcr_tests(self) -> bool:
        # The model runs in this process: there is no HTTP traffic to record. Skips test_stream_time.
        return False

    @property
    def supported_usage_metadata_details(self) -> dict[Literal["invoke", "stream"], list[Any]]:
        # None of the suite's detail kinds (audio, reasoning, cache); image tokens are reported as
        # input_token_details["image"], which the suite does not check.
        return {"invoke": [], "stream": []}


# ----------------------------------------------------------------------------------------------------
# Tools
# ----------------------------------------------------------------------------------------------------
class ToolParams:
    """Binds the shared (generation-capped) model and the allowed folder to the tool suites."""

    hd: HD4K
    root: Path
    tool_class: type[BaseTool]
    example: dict[str, Any]

    @pytest.fixture(autouse=True)
    def _bind_model(self, hd4k_capped: HD4K, image_root: Path) -> None:
        self.hd = hd4k_capped
        self.root = image_root

    @property
    def tool_constructor(self) -> type[BaseTool]:
        return self.tool_class

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        return {"hd": self.hd, "settings": ToolSettings(allowed_root=self.root)}

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        return dict(self.example)


class ReadDocument(ToolParams):
    tool_class = HD4KReadDocumentTool
    example = {"image": "report.pdf", "pages": "2", "hd_num": 1}  # noqa: RUF012


class ChartQuestion(ToolParams):
    tool_class = HD4KChartQuestionTool
    example = {"image": "chart.png", "question": "Which quarter is highest?", "hd_num": 1}  # noqa: RUF012


class DescribeImage(ToolParams):
    tool_class = HD4KDescribeImageTool
    example = {"image": "chart.png", "detail": "brief", "hd_num": 1}  # noqa: RUF012
