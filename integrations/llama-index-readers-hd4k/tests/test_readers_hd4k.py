"""llama-index-readers-hd4k: the classes are LlamaIndex readers, and an image becomes one Document."""

from __future__ import annotations

from pathlib import Path

from llama_index.core.readers.base import BaseReader
from llama_index.readers.hd4k import HD4KIngestReader, HD4KReader
from PIL import Image

from hd4k_tools import HD4K


def test_classes_are_llama_index_readers() -> None:
    for cls in (HD4KReader, HD4KIngestReader):
        assert BaseReader.__name__ in [b.__name__ for b in cls.__mro__]


def test_an_image_becomes_one_document(hd4k_tiny: HD4K, tmp_path: Path) -> None:
    image = tmp_path / "page.png"
    Image.new("RGB", (120, 160), "white").save(image)
    reader = HD4KReader(hd4k_tiny, hd_num=1, generation={"max_new_tokens": 4})
    (document,) = reader.load_data(image)
    assert document.metadata["page"] == 1
    assert document.metadata["hd_num"] == 1
    assert document.metadata["file_path"] == str(image)
