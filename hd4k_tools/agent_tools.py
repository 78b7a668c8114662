"""Framework-neutral agent tools: argument schemas, untrusted-argument rules, image references.

The LangChain and LlamaIndex integrations are thin adapters over :class:`AgentTools`, so both
frameworks get the same three tools with the same descriptions, limits and error texts.

Tool arguments come from an LLM and are untrusted:
- files are read only inside ``ToolSettings.allowed_root`` (symlinks resolved first); without a root
  no file is read at all;
- http(s) URLs are refused unless ``allow_urls``; private, loopback and link-local hosts are refused
  even then (unless ``allow_private_urls``, meant for tests on 127.0.0.1);
- images and PDFs are bounded in bytes, pixels and pages.
Errors are :class:`~hd4k_tools.errors.HD4KError` subclasses whose text tells the LLM what to change;
:func:`error_message` formats them for a tool result.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from hd4k_tools.errors import HD4KError, InputError, PathNotAllowedError, URLNotAllowedError
from hd4k_tools.generation_config import MAX_NUM_BEAMS
from hd4k_tools.hd4k import HD4K
from hd4k_tools.imaging import ImagePolicy, ImageSource
from hd4k_tools.tasks import ChartResult, DocumentResult, TaskResult

IMAGE_REF_SCHEME = "image://"

_IMAGE_ARG_DESCRIPTION = (
    "The image to look at: a file path relative to the allowed folder (PNG, JPEG, WebP, TIFF, BMP, GIF"
    "{pdf}), or a reference like 'image://img-1' to an image from the conversation, or a 'data:' URL"
    "{urls}. Do not paste raw base64."
)
_HD_NUM_DESCRIPTION = (
    "Optional resolution budget: the maximum number of 336x336 tiles the image is cut into (1-100). "
    "Omit it for the task's default ({default}); raise it to read smaller text, lower it to save tokens."
)


def _image_field(*, pdf: bool) -> Any:
    return Field(
        description=_IMAGE_ARG_DESCRIPTION.format(
            pdf=", or a PDF" if pdf else "", urls=", or an http(s) URL when URLs are enabled"
        ),
        min_length=1,
        max_length=8192,
    )


class ReadDocumentArgs(BaseModel):
    """Arguments of the read-document tool."""

    model_config = ConfigDict(extra="forbid")

    image: str = _image_field(pdf=True)
    pages: str | None = Field(
        default=None,
        description="PDF pages to read, 1-based: '1', '2-4', '1,3,5'. Omit for all pages (up to the limit).",
        max_length=200,
    )
    hd_num: int | None = Field(default=None, ge=1, le=100, description=_HD_NUM_DESCRIPTION.format(default=55))


class ChartQuestionArgs(BaseModel):
    """Arguments of the chart-question tool."""

    model_config = ConfigDict(extra="forbid")

    image: str = _image_field(pdf=False)
    question: str = Field(description="The question to answer about the chart.", min_length=1, max_length=2000)
    hd_num: int | None = Field(default=None, ge=1, le=100, description=_HD_NUM_DESCRIPTION.format(default=25))


class DescribeImageArgs(BaseModel):
    """Arguments of the describe-image tool."""

    model_config = ConfigDict(extra="forbid")

    image: str = _image_field(pdf=False)
    detail: Literal["brief", "detailed"] = Field(
        default="detailed", description="'detailed' for a full description, 'brief' for one or two sentences."
    )
    hd_num: int | None = Field(default=None, ge=1, le=100, description=_HD_NUM_DESCRIPTION.format(default=16))


TOOL_DESCRIPTIONS: dict[str, str] = {
    "read_document": (
        "Read a document image or PDF at high resolution (InternLM-XComposer2-4KHD, up to 4K) and return "
        "its text as Markdown, page by page. Use it for scans, screenshots, forms, slides and small print."
    ),
    "answer_chart_question": (
        "Answer a question about a chart, plot, table image or infographic, reading its labels and values "
        "at high resolution. Returns a short answer (a word, number or phrase)."
    ),
    "describe_image": ("Describe an image (photo, screenshot, diagram) in detail or briefly, at high resolution."),
}
TOOL_ARGS: dict[str, type[BaseModel]] = {
    "read_document": ReadDocumentArgs,
    "answer_chart_question": ChartQuestionArgs,
    "describe_image": DescribeImageArgs,
}


class ToolSettings(BaseModel):
    """Limits for untrusted tool arguments."""

    # forbid: a misspelt limit must fail loudly, never leave the default (e.g. a looser one) in force.
    model_config = ConfigDict(frozen=True, extra="forbid")

    allowed_root: Path | None = Field(
        default=None, description="Folder the tools may read files from; None: no file access at all."
    )
    allow_urls: bool = False
    allow_private_urls: bool = False
    allowed_private_hosts: frozenset[str] = Field(
        default=frozenset(),
        description="Private/loopback hosts (as written in URLs) exempt from the private-address refusal, "
        "e.g. an intranet image server; everything else private stays refused.",
    )
    max_pixels: int = 64_000_000
    max_bytes: int = 32 * 2**20
    max_pdf_pages: int = 20
    url_timeout: float = 10.0
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Cap on the answer length of every tool call (None: the task's default)."
    )
    num_beams: int | None = Field(
        default=None, ge=1, le=MAX_NUM_BEAMS, description="Beams per tool call (None: the task's default)."
    )

    def generation(self) -> dict[str, int]:
        """Generation overrides for tool calls (bounded latency per agent step)."""
        out: dict[str, int] = {}
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        if self.num_beams is not None:
            out["num_beams"] = self.num_beams
        return out

    def image_policy(self) -> ImagePolicy:
        """The :class:`ImagePolicy` that enforces these settings."""
        roots = (self.allowed_root.resolve(),) if self.allowed_root is not None else ()
        return ImagePolicy(
            max_pixels=self.max_pixels,
            max_bytes=self.max_bytes,
            allowed_roots=roots,
            allow_urls=self.allow_urls,
            allow_private_urls=self.allow_private_urls,
            allowed_private_hosts=self.allowed_private_hosts,
            url_timeout=self.url_timeout,
        )


class ImageRegistry:
    """Images an agent already holds (e.g. sent by the user in a message), named so that a tool call
    can say ``image://img-1`` instead of carrying base64 in its arguments. Thread-safe."""

    def __init__(self) -> None:
        self._images: dict[str, bytes | Image.Image] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    def add(self, image: bytes | Image.Image, name: str | None = None) -> str:
        """Store ``image`` (encoded bytes or a PIL image) and return its reference ``image://<name>``."""
        with self._lock:
            key = name or f"img-{next(self._counter)}"
            if key.startswith(IMAGE_REF_SCHEME):
                key = key[len(IMAGE_REF_SCHEME) :]
            self._images[key] = image
        return IMAGE_REF_SCHEME + key

    def get(self, ref: str) -> bytes | Image.Image:
        key = ref[len(IMAGE_REF_SCHEME) :] if ref.startswith(IMAGE_REF_SCHEME) else ref
        with self._lock:
            try:
                return self._images[key]
            except KeyError:
                known = ", ".join(IMAGE_REF_SCHEME + k for k in self._images) or "none"
                raise InputError(f"No image is registered as {ref!r}. Known image references: {known}.") from None

    def __contains__(self, ref: str) -> bool:
        key = ref[len(IMAGE_REF_SCHEME) :] if ref.startswith(IMAGE_REF_SCHEME) else ref
        with self._lock:
            return key in self._images

    def refs(self) -> list[str]:
        with self._lock:
            return [IMAGE_REF_SCHEME + k for k in self._images]


def resolve_image_argument(value: str, settings: ToolSettings, registry: ImageRegistry | None) -> ImageSource:
    """Turn an LLM-given ``image`` argument into a source that :func:`load_image` reads under
    ``settings.image_policy()`` (which enforces the root, URL and size rules)."""
    value = value.strip()
    if not value:
        raise InputError("The 'image' argument is empty; pass a file path, an image:// reference or a data URL.")
    if value.startswith(IMAGE_REF_SCHEME) or (registry is not None and value in registry):
        if registry is None:
            raise InputError(f"{value!r} is an image reference, but this tool has no image registry.")
        stored = registry.get(value)
        return stored
    lowered = value.lower()
    if lowered.startswith("data:"):
        return value
    if lowered.startswith(("http://", "https://")):
        if not settings.allow_urls:
            raise URLNotAllowedError(
                "URLs are disabled for this tool. Pass a file path inside the allowed folder, an image:// "
                "reference, or a data: URL instead."
            )
        return value
    if "://" in value[:16]:
        raise URLNotAllowedError(f"Unsupported scheme in {value[:40]!r}; only http(s) URLs and data: URLs work.")
    if settings.allowed_root is None:
        raise PathNotAllowedError(
            "This tool may not read files (no allowed folder is configured). Pass an image:// reference or "
            "a data: URL instead."
        )
    root = settings.allowed_root.resolve()
    path = Path(value)
    return path if path.is_absolute() else root / path


def error_message(err: BaseException) -> str:
    """The text an LLM sees when a tool call fails."""
    if isinstance(err, HD4KError):
        return f"Error ({type(err).__name__}): {err}"
    return f"Error: the tool failed unexpectedly ({type(err).__name__}). Try different arguments."


@dataclass(frozen=True)
class ToolAnswer:
    """A tool's text for the LLM and the full result object for the application."""

    content: str
    result: TaskResult | ChartResult | DocumentResult


class AgentTools:
    """The three tools over one :class:`HD4K`, with untrusted-argument handling."""

    def __init__(self, hd: HD4K, settings: ToolSettings | None = None, registry: ImageRegistry | None = None) -> None:
        self.hd = hd
        self.settings = settings or ToolSettings()
        self.registry = registry if registry is not None else ImageRegistry()
        self._policy = self.settings.image_policy()
        self._generation = self.settings.generation() or None

    def _source(self, image: str) -> ImageSource:
        return resolve_image_argument(image, self.settings, self.registry)

    def read_document(self, image: str, pages: str | None = None, hd_num: int | None = None) -> ToolAnswer:
        """Transcribe a document image or PDF (the read-document tool)."""
        result = self.hd.read_document(
            self._source(image),
            pages=pages,
            hd_num=hd_num,
            policy=self._policy,
            max_pages=self.settings.max_pdf_pages,
            progress=False,
            generation=self._generation,
        )
        if len(result.pages) == 1:
            content = result.pages[0].text
        else:
            content = "\n\n".join(f"--- page {p.page} ---\n{p.text}" for p in result.pages)
        return ToolAnswer(content=content, result=result)

    def answer_chart_question(self, image: str, question: str, hd_num: int | None = None) -> ToolAnswer:
        """Answer a question about a chart (the chart-question tool)."""
        result = self.hd.answer_chart_question(
            self._source(image), question, hd_num=hd_num, policy=self._policy, generation=self._generation
        )
        return ToolAnswer(content=result.text, result=result)

    def describe_image(self, image: str, detail: str = "detailed", hd_num: int | None = None) -> ToolAnswer:
        """Describe an image (the describe-image tool)."""
        result = self.hd.describe_image(
            self._source(image), detail=detail, hd_num=hd_num, policy=self._policy, generation=self._generation
        )
        return ToolAnswer(content=result.text, result=result)

    def call(self, name: str, **arguments: Any) -> ToolAnswer:
        """Validate ``arguments`` against the tool's schema and run it."""
        schema = TOOL_ARGS.get(name)
        if schema is None:
            raise InputError(f"Unknown tool {name!r}; tools are {sorted(TOOL_ARGS)}.")
        args = schema.model_validate(arguments)
        return getattr(self, name)(**args.model_dump())
