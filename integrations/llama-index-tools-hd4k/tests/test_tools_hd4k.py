"""llama-index-tools-hd4k: the spec is a LlamaIndex tool spec whose three tools run the model."""

from __future__ import annotations

from pathlib import Path

from llama_index.core.tools.tool_spec.base import BaseToolSpec
from llama_index.tools.hd4k import HD4KToolSpec
from PIL import Image

from hd4k_tools import HD4K, ToolSettings


def test_class_is_a_llama_index_tool_spec() -> None:
    assert BaseToolSpec.__name__ in [b.__name__ for b in HD4KToolSpec.__mro__]


def test_the_three_tools_and_a_call(hd4k_tiny: HD4K, tmp_path: Path) -> None:
    Image.new("RGB", (120, 90), (30, 90, 200)).save(tmp_path / "chart.png")
    spec = HD4KToolSpec(hd4k_tiny, ToolSettings(allowed_root=tmp_path, max_new_tokens=4))
    tools = {tool.metadata.name: tool for tool in spec.to_tool_list()}
    assert set(tools) == {"read_document", "answer_chart_question", "describe_image"}
    output = tools["answer_chart_question"].call(image="chart.png", question="Which bar is highest?", hd_num=1)
    assert isinstance(output.content, str)
    assert output.raw_output.hd_num == 1
