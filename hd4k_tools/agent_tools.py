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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hd4k_tools.errors import HD4KError, InputError, PathNotAllowedError, URLNotAllowedError
from hd4k_tools.hd4k import HD4K
from hd4k_tools.inputs.images import ImageSource
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.progress import check_cancelled
from hd4k_tools.results import ChartResult, DocumentResult, TaskResult
from hd4k_tools.runtime.generation_config import MAX_NUM_BEAMS
from hd4k_tools.tasks import TASKS, TaskRegistry, TaskSpec, tool_specs
from hd4k_tools.zoom import detail_note

IMAGE_REF_SCHEME = "image://"

# Generated from the task specs (hd4k_tools.tasks.TASKS): a task with an args schema is a tool.
TOOL_DESCRIPTIONS: dict[str, str] = {name: spec.description for name, spec in tool_specs().items()}
TOOL_ARGS: dict[str, type[BaseModel]] = {name: spec.args for name, spec in tool_specs().items()}  # type: ignore[misc]


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
    can say ``image://img-1`` instead of carrying base64 in its arguments. Thread-safe.

    ``max_images`` bounds how many are kept (the oldest is forgotten first) where untrusted clients add
    images, e.g. an MCP server; ``None`` keeps every image.
    """

    def __init__(self, max_images: int | None = None) -> None:
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_images must be None or at least 1, got {max_images}")
        self._images: dict[str, bytes | Image.Image] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self.max_images = max_images

    def add(self, image: bytes | Image.Image, name: str | None = None) -> str:
        """Store ``image`` (encoded bytes or a PIL image) and return its reference ``image://<name>``."""
        with self._lock:
            key = name or f"img-{next(self._counter)}"
            if key.startswith(IMAGE_REF_SCHEME):
                key = key[len(IMAGE_REF_SCHEME) :]
            self._images.pop(key, None)  # re-adding a name makes it the newest
            self._images[key] = image
            while self.max_images is not None and len(self._images) > self.max_images:
                del self._images[next(iter(self._images))]
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


def invalid_arguments(name: str, err: ValidationError, schema: type[BaseModel] | None = None) -> InputError:
    """The error for tool arguments that do not match the tool's schema (``TOOL_ARGS[name]`` unless given):
    the problems, then the valid names. Every adapter (LangChain, LlamaIndex, MCP) words it this way."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(arguments)'}: {e['msg']}" for e in err.errors(include_url=False)[:10]
    )
    valid = ", ".join((schema or TOOL_ARGS[name]).model_fields)
    return InputError(f"Invalid arguments for {name}: {problems}. Its arguments are: {valid}.")


def error_message(err: BaseException) -> str:
    """The text an LLM sees when a tool call fails."""
    if isinstance(err, HD4KError):
        return f"Error ({type(err).__name__}): {err}"
    return f"Error: the tool failed unexpectedly ({type(err).__name__}). Try different arguments."


def _detail_line(result: TaskResult | ChartResult | DocumentResult) -> str | None:
    """One line when detail was lost (the page that lost the most), from :func:`hd4k_tools.zoom.detail_note`."""
    calls = result.pages if isinstance(result, DocumentResult) else [result]
    lossy = [r for r in calls if r.detail is not None and r.detail.lost]
    if not lossy:
        return None
    worst = max(lossy, key=lambda r: r.detail.scale)  # type: ignore[union-attr]
    what = "the region" if worst.region is not None else "the image" if worst.page is None else f"page {worst.page}"
    return detail_note(worst.detail, what=what)


def tool_text(result: TaskResult | ChartResult | DocumentResult) -> str:
    """What the LLM reads of a task's result: the answer (a multi-page document page by page), and one line
    when the source was shrunk enough to lose small print, with a ``region`` to look closer."""
    if isinstance(result, DocumentResult):
        if len(result.pages) == 1:
            text = result.pages[0].text
        else:
            text = "\n\n".join(f"--- page {p.page} ---\n{p.text}" for p in result.pages)
    else:
        text = result.text
    note = _detail_line(result)
    return text if note is None else f"{text}\n\n{note}"


@dataclass(frozen=True)
class ToolAnswer:
    """A tool's text for the LLM and the full result object for the application."""

    content: str
    result: TaskResult | ChartResult | DocumentResult


class AgentTools:
    """The agent tools (one per task of ``tasks`` with an ``args`` schema; default the three of
    :data:`~hd4k_tools.tasks.TASKS`) over one :class:`HD4K`, with untrusted-argument handling.

    ``tasks`` is an explicit :class:`~hd4k_tools.tasks.TaskRegistry`: the LangChain and LlamaIndex
    toolkits and the MCP server built on this object offer exactly its tools.
    """

    def __init__(
        self,
        hd: HD4K,
        settings: ToolSettings | None = None,
        registry: ImageRegistry | None = None,
        tasks: TaskRegistry | None = None,
    ) -> None:
        self.hd = hd
        self.settings = settings or ToolSettings()
        self.registry = registry if registry is not None else ImageRegistry()
        self.tasks = TASKS if tasks is None else tasks
        self._policy = self.settings.image_policy()
        self._generation = self.settings.generation() or None

    @property
    def tool_args(self) -> dict[str, type[BaseModel]]:
        """Argument schema per tool name."""
        return {name: spec.args for name, spec in self.tasks.tools().items()}  # type: ignore[misc]

    @property
    def tool_descriptions(self) -> dict[str, str]:
        """What an LLM reads about each tool, by tool name."""
        return {name: spec.description for name, spec in self.tasks.tools().items()}

    def spec(self, name: str) -> TaskSpec:
        """The task spec of tool ``name`` (:class:`InputError` naming the tools if there is none)."""
        spec = self.tasks.tools().get(name)
        if spec is None:
            raise InputError(f"Unknown tool {name!r}; tools are {sorted(self.tasks.tools())}.")
        return spec

    def _source(self, image: str) -> ImageSource:
        return resolve_image_argument(image, self.settings, self.registry)

    def read_document(
        self, image: str, pages: str | None = None, hd_num: int | None = None, region: list[float] | None = None
    ) -> ToolAnswer:
        """Transcribe a document image or PDF (the read-document tool)."""
        return self.call("read_document", image=image, pages=pages, hd_num=hd_num, region=region)

    def answer_chart_question(
        self, image: str, question: str, hd_num: int | None = None, region: list[float] | None = None
    ) -> ToolAnswer:
        """Answer a question about a chart (the chart-question tool)."""
        return self.call("answer_chart_question", image=image, question=question, hd_num=hd_num, region=region)

    def describe_image(
        self, image: str, detail: str = "detailed", hd_num: int | None = None, region: list[float] | None = None
    ) -> ToolAnswer:
        """Describe an image (the describe-image tool)."""
        return self.call("describe_image", image=image, detail=detail, hd_num=hd_num, region=region)

    def run(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        cancel: threading.Event | None = None,
        on_page: Callable[[int, int], None] | None = None,
    ) -> ToolAnswer:
        """Run tool ``name`` (a task of :attr:`tasks`) with already-validated arguments, through
        :meth:`HD4K.run_task`.

        The image argument is resolved under the tool settings; the task runs under this object's policy
        and generation limits, and a task that reads documents also gets the page limit, no progress bar
        and ``on_page(done, total)`` (see :meth:`HD4K.read_document`)."""
        spec = self.spec(name)
        args = dict(arguments)
        source = self._source(args.pop("image"))
        options: dict[str, Any] = {"policy": self._policy, "generation": self._generation, "cancel": cancel}
        if spec.documents:
            options.update(max_pages=self.settings.max_pdf_pages, progress=False, on_page=on_page)
        result = self.hd.run_task(spec, source, **args, **options)
        return ToolAnswer(content=tool_text(result), result=result)

    def _schema(self, name: str) -> type[BaseModel]:
        return self.spec(name).args  # type: ignore[return-value]

    def call(self, name: str, **arguments: Any) -> ToolAnswer:
        """Validate ``arguments`` against the tool's schema and run it."""
        args = self._schema(name).model_validate(arguments)
        return self.run(name, args.model_dump())

    def invoke(
        self,
        name: str,
        arguments: Mapping[str, Any] | None,
        *,
        cancel: threading.Event | None = None,
        on_page: Callable[[int, int], None] | None = None,
    ) -> ToolAnswer:
        """Run a tool on untrusted ``arguments`` (as a protocol server receives them).

        Unlike :meth:`call`, arguments that do not match the schema raise :class:`InputError` naming the
        problems and the valid arguments. Setting ``cancel`` stops the model between two tokens and raises
        :class:`~hd4k_tools.errors.CancelledError` (a cut answer is never returned as a whole one);
        ``on_page(done, total)`` reports the pages of ``read_document``.
        """
        schema = self._schema(name)
        try:
            args = schema.model_validate(dict(arguments or {}))
        except ValidationError as err:
            raise invalid_arguments(name, err, schema) from None
        answer = self.run(name, args.model_dump(), cancel=cancel, on_page=on_page)
        check_cancelled(cancel, f"The {name} call")
        return answer
