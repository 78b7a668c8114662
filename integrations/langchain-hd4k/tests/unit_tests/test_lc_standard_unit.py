"""LangChain's standard unit suites (``langchain_tests.unit_tests``) against ChatHD4K and the three tools."""

from __future__ import annotations

from typing import Any

from langchain_tests.unit_tests import ChatModelUnitTests, ToolsUnitTests
from lc_standard_params import ChartQuestion, ChatParams, DescribeImage, ReadDocument


class TestChatHD4KStandardUnit(ChatParams, ChatModelUnitTests):
    # test_serdes skips because ChatHD4K.is_lc_serializable() is False (inherited, kept on purpose):
    # the model is a loaded in-memory object (`hd` is excluded from dumps), nothing a config recreates.

    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        # No API key or other environment variable configures a local model. Skips test_init_from_env.
        return {}, {}, {}


class TestReadDocumentToolUnit(ReadDocument, ToolsUnitTests):
    pass


class TestChartQuestionToolUnit(ChartQuestion, ToolsUnitTests):
    pass


class TestDescribeImageToolUnit(DescribeImage, ToolsUnitTests):
    pass
