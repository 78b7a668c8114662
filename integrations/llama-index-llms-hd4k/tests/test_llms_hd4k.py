"""llama-index-llms-hd4k: the class is a LlamaIndex LLM, and a chat with an ImageBlock runs the model."""

from __future__ import annotations

from pathlib import Path

from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock
from llama_index.llms.hd4k import HD4KMultiModalLLM
from PIL import Image

from hd4k_tools import HD4K


def test_class_is_a_llama_index_llm() -> None:
    names_of_base_classes = [b.__name__ for b in HD4KMultiModalLLM.__mro__]
    assert BaseLLM.__name__ in names_of_base_classes


def test_chat_with_an_image_block_runs_the_model(hd4k_tiny: HD4K, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    Image.new("RGB", (96, 64), (200, 40, 40)).save(image)
    llm = HD4KMultiModalLLM(hd4k_tiny, hd_num=1, max_new_tokens=4)
    message = ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(path=image), TextBlock(text="What colour is it?")])
    response = llm.chat([message])
    assert isinstance(response.message.content, str)
    assert response.raw is not None
    assert llm.metadata.is_chat_model
