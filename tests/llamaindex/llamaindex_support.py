"""Helpers shared by the LlamaIndex integration tests (not a test module).

``ScriptedTextLLM`` is a text-only LlamaIndex LLM (no function calling) for ReAct loops: it answers
each call with the next scripted text and records the prompt text it was shown.

``RecordingRunner`` wraps the *real* runner over the tiny checkpoint: it records every request and
result (so a test can check which image pixels reached the model and what it answered) and caps
``max_new_tokens``: the tiny random model never emits an end token, and the task defaults (512-1024
tokens, some with 3 beams) would make every tool call take seconds. Everything else — loading,
tiling, vision, prompt assembly, generation settings — is the real pipeline.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Any

# The capped, recording runner of langchain-hd4k's tests (on the test pythonpath; it imports no LangChain).
from langchain_helpers import CappedRunner
from llama_index.core.base.llms.types import CompletionResponse, CompletionResponseGen, LLMMetadata
from llama_index.core.llms import CustomLLM
from llama_index.core.llms.callbacks import llm_completion_callback
from PIL import Image, ImageDraw
from pydantic import Field

from hd4k_tools import Runner, image_content_hash, load_image

MAX_NEW_TOKENS = 12


class RecordingRunner(CappedRunner):
    """A :class:`hd4k_tools.Runner` that delegates to ``inner`` and records the requests and results
    (langchain-hd4k's test ``CappedRunner``, framework-free), capped at :data:`MAX_NEW_TOKENS`."""

    def __init__(self, inner: Runner, max_new_tokens: int = MAX_NEW_TOKENS) -> None:
        super().__init__(inner, max_new_tokens)

    def image_hashes(self) -> list[str]:
        """Content hashes of every image the model was asked about, in order."""
        return [image_content_hash(img) for request in self.requests for img in request.images]


class ScriptedTextLLM(CustomLLM):
    """A plain text LLM: call ``i`` returns ``responses[i]``; ``prompts[i]`` is the text it was shown.

    Only ``complete``/``stream_complete`` are implemented, so ``chat`` goes through ``CustomLLM``'s
    ``messages_to_prompt``: an agent talks to it in text alone, as with a model that has no tool calling.
    """

    responses: list[str]
    prompts: list[str] = Field(default_factory=list)

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(is_chat_model=False, is_function_calling_model=False, model_name="scripted-text")

    def _answer(self, prompt: str) -> str:
        self.prompts.append(prompt)
        turn = len(self.prompts) - 1
        if turn >= len(self.responses):
            raise AssertionError(f"the script has {len(self.responses)} responses; call {turn + 1} was made")
        return self.responses[turn]

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return CompletionResponse(text=self._answer(prompt))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        text = self._answer(prompt)

        def pieces() -> CompletionResponseGen:
            # Several deltas, so that a streaming agent really accumulates the text.
            done = ""
            for line in text.splitlines(keepends=True):
                done += line
                yield CompletionResponse(text=done, delta=line)

        return pieces()


def file_hash(path: Path) -> str:
    """Content hash of the RGB pixels the core loads from ``path``."""
    return image_content_hash(load_image(path))


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (96, 64), label: str = "") -> Path:
    """A small PNG: a coloured field with a darker square and an optional label (deterministic)."""
    image = Image.new("RGB", size, color)
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 40, 40), fill=tuple(c // 2 for c in color))
    if label:
        draw.text((44, 20), label, fill=(0, 0, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (80, 60)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_pdf(path: Path, labels: list[str]) -> Path:
    """A PDF with one page per label, each page visibly different (colour band and text)."""
    colors = [(230, 90, 90), (90, 200, 90), (90, 90, 230), (220, 200, 60)]
    pages = []
    for i, label in enumerate(labels):
        page = Image.new("RGB", (200, 260), (255, 255, 255))
        draw = ImageDraw.Draw(page)
        draw.rectangle((0, 0, 200, 40 + 30 * i), fill=colors[i % len(colors)])
        draw.text((10, 120), label, fill=(0, 0, 0))
        pages.append(page)
    pages[0].save(path, format="PDF", save_all=True, append_images=pages[1:], resolution=72)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_huge_png(path: Path, width: int = 20_000, height: int = 20_000) -> Path:
    """A valid 1-bit ``width`` x ``height`` PNG of zeros, written row by row (no pixel buffer)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", body) + _png_chunk(b"IEND", b"")
    )
    return path
