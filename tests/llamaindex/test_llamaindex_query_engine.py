"""A multimodal query engine: images retrieved from a MultiModalVectorStoreIndex reach HD4KMultiModalLLM."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.embeddings.multi_modal_base import MultiModalEmbedding
from llama_index.core.indices import MultiModalVectorStoreIndex
from llama_index.core.query_engine import RetrieverQueryEngine
from llama_index.core.schema import ImageDocument, ImageNode, ImageType
from llama_index_hd4k import HD4KMultiModalLLM
from llamaindex_support import RecordingRunner, file_hash, write_image
from PIL import Image

from hd4k_tools import HD4K

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
}


class MeanColourEmbedding(MultiModalEmbedding):
    """A deterministic toy CLIP: an image is its mean RGB; a text is the sum of the colour words in it.

    Both land in the same 3-d space, so text-to-image retrieval picks the image of the named colour.
    """

    def _get_image_embedding(self, img_file_path: ImageType) -> list[float]:
        with Image.open(img_file_path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0) / 255.0
        return rgb.tolist()

    async def _aget_image_embedding(self, img_file_path: ImageType) -> list[float]:
        return self._get_image_embedding(img_file_path)

    def _get_text_embedding(self, text: str) -> list[float]:
        vector = np.full(3, 1e-3)
        for word in re.findall(r"[a-z]+", text.lower()):
            vector += COLOURS.get(word, (0.0, 0.0, 0.0))
        return vector.tolist()

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._get_text_embedding(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._get_query_embedding(query)

    async def _aget_text_embedding(self, text: str) -> list[float]:
        return self._get_text_embedding(text)


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    return {
        "red": write_image(tmp_path / "red.png", (220, 30, 30)),
        "green": write_image(tmp_path / "green.png", (30, 200, 40)),
        "blue": write_image(tmp_path / "blue.png", (30, 40, 220)),
    }


def build_index(images: dict[str, Path]) -> MultiModalVectorStoreIndex:
    # Every image needs a caption: LlamaIndex silently skips image nodes with empty text at indexing.
    documents = [ImageDocument(image_path=str(path), text=f"A {name} picture.") for name, path in images.items()]
    return MultiModalVectorStoreIndex.from_documents(
        documents, embed_model=MockEmbedding(embed_dim=3), image_embed_model=MeanColourEmbedding()
    )


def test_colour_embedding_retrieves_the_named_image(images: dict[str, Path]) -> None:
    retriever = build_index(images).as_retriever(similarity_top_k=1, image_similarity_top_k=1)
    for name, path in images.items():
        nodes = retriever.text_to_image_retrieve(f"Which picture is {name}?")
        assert [n.node.image_path for n in nodes] == [str(path)]


@pytest.mark.parametrize("colour", ["blue", "green"])
def test_retrieved_image_reaches_the_llm(runner: RecordingRunner, images: dict[str, Path], colour: str) -> None:
    llm = HD4KMultiModalLLM(hd=HD4K(runner), hd_num=1, max_new_tokens=8)
    engine = RetrieverQueryEngine.from_args(
        retriever=build_index(images).as_retriever(similarity_top_k=1, image_similarity_top_k=1),
        llm=llm,
        multimodal=True,
    )
    response = engine.query(f"What is shown in the {colour} picture?")

    # The image leg retrieved the named picture; the text leg (MockEmbedding, so any caption) adds one more.
    retrieved = [Path(n.node.image_path) for n in response.source_nodes if isinstance(n.node, ImageNode)]
    assert images[colour] in retrieved
    # Exactly the retrieved images' pixels reached the model, in order, with the question.
    assert len(runner.requests) == 1
    assert runner.image_hashes() == [file_hash(path) for path in retrieved]
    assert f"{colour} picture?" in runner.requests[0].messages[-1].text
    # A response came back, and it is the model's answer to that prompt.
    assert response.response and response.response == runner.results[0].text
