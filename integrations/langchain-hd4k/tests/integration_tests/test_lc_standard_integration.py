"""LangChain's standard integration suites (``langchain_tests.integration_tests``) against ChatHD4K and the
three tools on the tiny random checkpoint. The random weights write schema-valid JSON through constrained
decoding, so the suite's structured-output and JSON-mode tests run as they are (with a larger token budget);
they also run on a scripted runner that writes valid JSON."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from langchain_hd4k import ChatHD4K
from langchain_helpers import ScriptedRunner, chart_image, png_bytes
from langchain_tests.integration_tests import ChatModelIntegrationTests, ToolsIntegrationTests
from langchain_tests.integration_tests import chat_models as standard_chat_models
from lc_standard_params import STRUCTURED_BUDGET, ChartQuestion, ChatParams, DescribeImage, ReadDocument

from hd4k_tools import HD4K


class _LocalImageHttpx:
    """Stands in for the ``httpx`` module inside the standard suite: every ``get`` is answered with a local
    chart PNG (the suite's test image lives on the internet; tests run offline). Records the URLs asked."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.asked: list[str] = []

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        self.asked.append(url)
        return httpx.Response(
            200, content=self.body, headers={"content-type": "image/png"}, request=httpx.Request("GET", url)
        )


class TestChatHD4KStandardIntegration(ChatParams, ChatModelIntegrationTests):
    @pytest.fixture(autouse=True)
    def _serve_suite_images_locally(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        # test_image_inputs runs for real on a local chart: only the suite's download is replaced.
        monkeypatch.setattr(standard_chat_models, "httpx", _LocalImageHttpx(png_bytes(chart_image())))
        yield

    @pytest.fixture
    def model(self, request: Any) -> ChatHD4K:
        """The suite's model; its structured-output and JSON-mode tests get room for a whole JSON answer
        (random weights answer valid JSON only through constrained decoding)."""
        extra = getattr(request, "param", None) or {}
        name = request.node.name
        budget = {"max_new_tokens": STRUCTURED_BUDGET} if "structured_output" in name or "json_mode" in name else {}
        return self.chat_model_class(**{**self.standard_chat_model_params, **self.chat_model_params, **budget, **extra})


class TestReadDocumentToolIntegration(ReadDocument, ToolsIntegrationTests):
    pass


class TestChartQuestionToolIntegration(ChartQuestion, ToolsIntegrationTests):
    pass


class TestDescribeImageToolIntegration(DescribeImage, ToolsIntegrationTests):
    pass


# ----------------------------------------------------------------------------------------------------
# The suite's structured-output and JSON-mode tests on a model that writes valid JSON
# ----------------------------------------------------------------------------------------------------
JOKE_JSON = '{"setup": "Why do cats sit on keyboards?", "punchline": "To keep an eye on the mouse."}'


class _ScriptedJSONSuite(ChatParams, ChatModelIntegrationTests):
    """The integration suite's parameters with a scripted runner that always answers ``JOKE_JSON``.

    Not collected (no ``Test`` prefix): only the structured-output test bodies are called, directly,
    because every other test of the suite expects a model that generates.
    """

    def __init__(self) -> None:
        self.runner = ScriptedRunner([JOKE_JSON])
        self.hd = HD4K(self.runner)

    def model_instance(self) -> ChatHD4K:
        return ChatHD4K(**self.chat_model_params)


@pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
def test_standard_structured_output_passes_on_valid_json(schema_type: Any) -> None:
    suite = _ScriptedJSONSuite()
    suite.test_structured_output(suite.model_instance(), schema_type)
    assert len(suite.runner.requests) == 2  # invoke and stream, each parsed on the first answer
    assert all("conforms to this JSON schema" in prompt for prompt in suite.runner.prompts)


@pytest.mark.parametrize("schema_type", ["pydantic", "typeddict", "json_schema"])
async def test_standard_structured_output_async_passes_on_valid_json(schema_type: Any) -> None:
    suite = _ScriptedJSONSuite()
    await suite.test_structured_output_async(suite.model_instance(), schema_type)
    assert len(suite.runner.requests) == 2


def test_standard_structured_output_variants_and_json_mode_pass_on_valid_json() -> None:
    suite = _ScriptedJSONSuite()
    model = suite.model_instance()
    suite.test_structured_output_pydantic_2_v1(model)
    suite.test_structured_output_optional_param(model)
    suite.test_json_mode(model)
    # 4 + 4 + 4 calls, none of which needed a retry.
    assert len(suite.runner.requests) == 12
    assert not any(prompt.startswith("Your answer was not valid") for prompt in suite.runner.prompts)
