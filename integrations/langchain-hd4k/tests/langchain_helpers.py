"""Helpers of the LangChain integration tests (langchain-hd4k's own and the repository's tests/langchain): a
generation cap around the real runner, a scripted runner, test images, PDFs and tool calls. The fixtures
are in each folder's ``conftest.py``."""

from __future__ import annotations

import dataclasses
import io
import re
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

from hd4k_tools import HD4K, GenerationRequest, PlanSummary, Runner, RunnerResult, TextStream, Usage

# Tool calls cannot choose generation settings (AgentTools has no such option), and the task defaults
# (describe: 512 tokens x 3 beams, read: 1024 tokens) make a random tiny model run for many seconds.
TOOL_MAX_NEW_TOKENS = 6


class CappedRunner:
    """The real runner with ``max_new_tokens`` capped (and an optional hook before each call); ``requests``
    are the requests as sent on (capped), ``results`` the whole answers.

    Everything else — images, tiling, vision tower, prompt, decoding — is the wrapped runner's own
    work; this only keeps the tool tests fast and lets a test observe or hold model calls. Framework-free:
    the repository's LlamaIndex tests use it too (``llamaindex_support.RecordingRunner``).
    """

    def __init__(
        self,
        runner: Runner,
        max_new_tokens: int = TOOL_MAX_NEW_TOKENS,
        before_call: Callable[[GenerationRequest], None] | None = None,
    ) -> None:
        self.inner = runner
        self.max_new_tokens = max_new_tokens
        self.before_call = before_call
        self.requests: list[GenerationRequest] = []
        self.results: list[RunnerResult] = []
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    def count_text_tokens(self, text: str) -> int:
        return self.inner.count_text_tokens(text)

    def _capped(self, request: GenerationRequest) -> GenerationRequest:
        generation = request.generation.replace(
            max_new_tokens=min(request.generation.max_new_tokens, self.max_new_tokens)
        )
        capped = dataclasses.replace(request, generation=generation)
        with self._lock:
            self.requests.append(capped)
        if self.before_call is not None:
            self.before_call(capped)
        return capped

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        result = self.inner.generate(self._capped(request), cancel=cancel)
        with self._lock:
            self.results.append(result)
        return result

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        return self.inner.stream(self._capped(request), cancel=cancel)

    def close(self) -> None:
        """The wrapped runner is shared by the session; closing a wrapper leaves it alone."""


class ScriptedRunner:
    """A :class:`hd4k_tools.Runner` that answers with scripted texts in order (the last one repeats)
    and records every request.

    Random tiny weights never write JSON, so this is how tests reach the success paths of structured
    output; the images of a request are still planned, so plans and image tokens are real.
    """

    model_id = "scripted-model"

    def __init__(self, answers: Sequence[str], context_length: int = 16384) -> None:
        if not answers:
            raise ValueError("ScriptedRunner needs at least one answer")
        self.answers = list(answers)
        self._context_length = context_length
        self.requests: list[GenerationRequest] = []
        self._lock = threading.Lock()

    @property
    def context_length(self) -> int:
        return self._context_length

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    @property
    def prompts(self) -> list[str]:
        """The text of the last message of each request (the instruction the model answered)."""
        return [request.messages[-1].text for request in self.requests]

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        with self._lock:
            text = self.answers[min(len(self.requests), len(self.answers) - 1)]
            self.requests.append(request)
        plans = [PlanSummary.from_plan(p) for p in request.plans()]
        image_tokens = sum(p.image_tokens for p in plans)
        prompt_tokens = image_tokens + sum(self.count_text_tokens(m.text) for m in request.messages)
        return RunnerResult(
            text=text,
            model=self.model_id,
            plans=plans,
            usage=Usage(prompt_tokens=prompt_tokens, image_tokens=image_tokens, completion_tokens=len(text.split())),
        )

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        result = self.generate(request, cancel=cancel)
        # Several deltas (words with their trailing space), so streaming really assembles pieces.
        pieces = re.findall(r"\S+\s*|\s+", result.text)
        return TextStream(iter(pieces), [result], cancel or threading.Event())

    def close(self) -> None:
        """Nothing to release."""


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def chart_image() -> Image.Image:
    """A small bar chart with labels (wider than high, so the HD plan differs between hd_num values)."""
    image = Image.new("RGB", (240, 120), "white")
    draw = ImageDraw.Draw(image)
    for i, (height, colour) in enumerate([(40, "red"), (80, "green"), (60, "blue")]):
        draw.rectangle((20 + 70 * i, 110 - height, 70 + 70 * i, 110), fill=colour)
        draw.text((30 + 70 * i, 10), f"Q{i + 1}", fill="black")
    return image


def page_image(number: int, size: tuple[int, int] = (300, 400)) -> Image.Image:
    """A document page whose look differs per page (text and a coloured band)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    band = [(200, 60, 60), (60, 160, 60), (60, 60, 200), (180, 180, 40)][(number - 1) % 4]
    draw.rectangle((0, 0, size[0], 40 + 30 * number), fill=band)
    for line in range(6):
        draw.text((20, 120 + 30 * line), f"Page {number}, line {line + 1}: total {17 * number + line}", fill="black")
    return image


def write_pdf(path: Path, num_pages: int) -> Path:
    """A ``num_pages``-page PDF written with Pillow (one image per page)."""
    pages = [page_image(n) for n in range(1, num_pages + 1)]
    pages[0].save(path, format="PDF", save_all=True, append_images=pages[1:], resolution=72.0)
    return path


def huge_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A ``width`` x ``height`` 1-bit PNG: a few KB on disk, 400 M pixels once decoded.

    Written row by row (all-zero rows compress to almost nothing) without allocating the image.
    """
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    row = b"\x00" + bytes((width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def tool_call(name: str, args: dict[str, Any], call_id: str = "call-1") -> dict[str, Any]:
    return {"type": "tool_call", "id": call_id, "name": name, "args": args}


def make_image_root(root: Path) -> Path:
    """Fill ``root`` as the tools' allowed folder: ``chart.png``, ``page.png`` and a 3-page ``report.pdf``."""
    chart_image().save(root / "chart.png")
    page_image(1).save(root / "page.png")
    write_pdf(root / "report.pdf", 3)
    return root


# Fixtures both LangChain test folders use (imported into each conftest.py; ``hd4k_tiny`` is each folder's own).
@pytest.fixture(scope="session")
def hd4k_capped(hd4k_tiny: HD4K) -> HD4K:
    """The same model behind :class:`CappedRunner`, for tools (whose generation length is fixed)."""
    return HD4K(CappedRunner(hd4k_tiny.runner))


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tools' allowed folder: a chart PNG, a document page PNG, a 3-page PDF."""
    return make_image_root(tmp_path_factory.mktemp("lc_root"))
