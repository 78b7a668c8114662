"""The three HD4K vision tools as LangChain tools, and a toolkit that builds them on one model.

The tools are thin adapters over :class:`hd4k_tools.AgentTools`, so LangChain and LlamaIndex agents
get the same names, descriptions, argument schemas, limits and error texts.
"""

from __future__ import annotations

import base64
import binascii
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForToolRun, CallbackManagerForToolRun
from langchain_core.messages import BaseMessage
from langchain_core.tools import BaseTool, BaseToolkit, ToolException
from PIL import Image
from pydantic import ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from hd4k_tools import (
    HD4K,
    AgentTools,
    HD4KError,
    ImagePolicy,
    ImageRegistry,
    InputError,
    Runner,
    TaskRegistry,
    ToolAnswer,
    ToolSettings,
    error_message,
    errors,
    invalid_arguments,
)
from hd4k_tools.adapters import as_hd4k, run_cancellable


class InvalidArgumentsMessage:
    """``handle_validation_error`` of the HD4K tools: the text an LLM sees when its arguments do not
    match the schema (the same wording as the LlamaIndex tools: the problems, then the valid names)."""

    def __init__(self, task: str) -> None:
        self.task = task

    def __call__(self, err: Exception) -> str:
        if isinstance(err, ValidationError):
            return error_message(invalid_arguments(self.task, err))
        return error_message(InputError(f"Invalid arguments for {self.task}: {err}"))  # pragma: no cover - pydantic.v1


class HD4KBaseTool(BaseTool):
    """One HD4K tool over :class:`hd4k_tools.AgentTools` (model, limits, image registry): untrusted-argument
    errors as ``ToolException``, ``(text, result)`` as output, and cancellation of an async call stopping
    the model at its next token.

    The tool is the task named ``name`` (a tool of its ``agent_tools.tasks``, generated from the task
    specs); name, description and argument schema come from there, so a new task needs no code here. The
    named subclasses fix ``name`` for the three tasks of today.
    """

    task: ClassVar[str | None] = None

    agent_tools: AgentTools = Field(exclude=True)
    """Model, :class:`hd4k_tools.ToolSettings` and :class:`hd4k_tools.ImageRegistry` of this tool."""
    response_format: Literal["content", "content_and_artifact"] = "content_and_artifact"
    handle_tool_error: bool | str | Callable[[ToolException], Any] | None = True
    handle_validation_error: bool | str | Callable[[Any], str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _build_agent_tools(cls, data: Any) -> Any:
        """Accept ``hd=`` (an HD4K or a Runner) with optional ``settings=``/``registry=`` instead of a
        ready ``agent_tools``, and fill in the name, description and schema of the task."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        task = cls.task or data.get("name")
        hd = data.pop("hd", None)
        settings = data.pop("settings", None)
        registry = data.pop("registry", None)
        tasks = data.pop("tasks", None)
        if data.get("agent_tools") is None:
            if hd is None:
                raise TypeError(f"{cls.__name__} needs hd= (an hd4k_tools.HD4K or Runner) or agent_tools=")
            data["agent_tools"] = AgentTools(as_hd4k(hd), settings, registry, tasks)
        elif hd is not None or settings is not None or registry is not None or tasks is not None:
            raise TypeError("pass either agent_tools= or hd=/settings=/registry=/tasks=, not both")
        agent_tools: AgentTools = data["agent_tools"]
        tool_args = agent_tools.tool_args
        if task not in tool_args:
            raise TypeError(
                f"{cls.__name__} needs name= one of the hd4k tools {sorted(tool_args)} (got {task!r}); or use "
                "HD4KReadDocumentTool, HD4KChartQuestionTool, HD4KDescribeImageTool or HD4KToolkit(hd).get_tools()."
            )
        data.setdefault("name", task)
        data.setdefault("description", agent_tools.tool_descriptions[task])
        data.setdefault("args_schema", tool_args[task])
        if data.get("handle_validation_error") is None:
            data["handle_validation_error"] = InvalidArgumentsMessage(task)
        return data

    @property
    def settings(self) -> ToolSettings:
        """The limits for untrusted arguments."""
        return self.agent_tools.settings

    @property
    def registry(self) -> ImageRegistry:
        """Images that tool calls may name as ``image://...``."""
        return self.agent_tools.registry

    def _arguments(self, arguments: dict[str, Any]) -> dict[str, Any]:
        # LangChain passes the validated fields the call gave; the schema's defaults fill in the rest.
        return self.agent_tools.spec(self.name).args.model_validate(arguments).model_dump()  # type: ignore[union-attr]

    def _answer(self, arguments: dict[str, Any], cancel: threading.Event | None = None) -> tuple[str, Any]:
        try:
            answer: ToolAnswer = self.agent_tools.run(self.name, self._arguments(arguments), cancel=cancel)
        except HD4KError as err:
            # Only ToolException reaches the LLM as an error result; the message says what to change.
            raise ToolException(error_message(err)) from err
        return answer.content, answer.result

    def _run(self, run_manager: CallbackManagerForToolRun | None = None, **arguments: Any) -> tuple[str, Any]:
        return self._answer(arguments)

    async def _arun(
        self, run_manager: AsyncCallbackManagerForToolRun | None = None, **arguments: Any
    ) -> tuple[str, Any]:
        # The model runs in a worker thread; cancelling this call (e.g. an agent's task) sets the cancel
        # event, so the model stops at its next token instead of running on unseen.
        return await run_cancellable(lambda cancel: self._answer(arguments, cancel))


class HD4KReadDocumentTool(HD4KBaseTool):
    """Transcribe a document image or PDF (selected pages) as Markdown; artifact: a
    :class:`hd4k_tools.DocumentResult` (one result per page, with plan, usage and timings)."""

    task: ClassVar[str | None] = "read_document"


class HD4KChartQuestionTool(HD4KBaseTool):
    """Answer a question about a chart; artifact: a :class:`hd4k_tools.ChartResult`."""

    task: ClassVar[str | None] = "answer_chart_question"


class HD4KDescribeImageTool(HD4KBaseTool):
    """Describe an image briefly or in detail; artifact: a :class:`hd4k_tools.TaskResult`."""

    task: ClassVar[str | None] = "describe_image"


# The named classes of today's tasks; any other tool task is an HD4KBaseTool with its name.
_NAMED_TOOLS: dict[str, type[HD4KBaseTool]] = {
    cls.task: cls for cls in (HD4KReadDocumentTool, HD4KChartQuestionTool, HD4KDescribeImageTool) if cls.task
}


class HD4KToolkit(BaseToolkit):
    """The three HD4K tools (``read_document``, ``answer_chart_question``, ``describe_image``) on one
    model, sharing one set of limits and one image registry.

    Tool arguments come from an LLM and are untrusted: files are read only under
    ``settings.allowed_root`` (none without a root), URLs only with ``settings.allow_urls`` (never
    private addresses unless ``allow_private_urls``), and images are bounded in bytes and pixels.
    Violations come back to the LLM as error tool messages it can act on.

    Images the agent already holds (e.g. sent by the user) are registered with
    :meth:`register_image` / :meth:`register_message_images`, and a tool call names them as
    ``image://img-1`` instead of carrying base64.

    Example:
        .. code-block:: python

            from hd4k_tools import HD4K, ToolSettings
            from langchain_hd4k import HD4KToolkit

            hd = HD4K.from_pretrained("internlm/internlm-xcomposer2-4khd-7b")
            toolkit = HD4KToolkit(hd, settings=ToolSettings(allowed_root="./docs"))
            agent = create_agent(tool_calling_llm, tools=toolkit.get_tools())
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    hd: HD4K = Field(exclude=True)
    """The model (a bare ``Runner`` is wrapped in an :class:`hd4k_tools.HD4K`)."""
    settings: ToolSettings = Field(default_factory=ToolSettings)
    """Limits for untrusted tool arguments (allowed root, URLs, sizes)."""
    registry: ImageRegistry = Field(default_factory=ImageRegistry, exclude=True)
    """Images that tool calls may name as ``image://...``."""
    tasks: TaskRegistry | None = Field(default=None, exclude=True)
    """The tasks offered as tools (default :data:`hd4k_tools.TASKS`: the three of today)."""

    _agent_tools: AgentTools = PrivateAttr()

    def __init__(self, hd: HD4K | Runner | None = None, /, **data: Any) -> None:
        if hd is not None:
            data["hd"] = hd
        super().__init__(**data)

    @model_validator(mode="before")
    @classmethod
    def _wrap_runner(cls, data: Any) -> Any:
        if isinstance(data, dict) and "hd" in data:
            data = {**data, "hd": as_hd4k(data["hd"])}
        if isinstance(data, dict) and data.get("registry") is None:
            data.pop("registry", None)
        if isinstance(data, dict) and data.get("settings") is None:
            data.pop("settings", None)
        return data

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str,
        *,
        settings: ToolSettings | None = None,
        registry: ImageRegistry | None = None,
        device: str = "auto",
        dtype: str = "auto",
        quantization: str | None = None,
        policy: ImagePolicy | None = None,
    ) -> HD4KToolkit:
        """Load the model from a checkpoint folder or hub id and build the toolkit on it."""
        hd = HD4K.from_pretrained(path_or_hub_id, device=device, dtype=dtype, quantization=quantization, policy=policy)
        return cls(hd, settings=settings, registry=registry)

    def model_post_init(self, context: Any, /) -> None:
        self._agent_tools = AgentTools(self.hd, self.settings, self.registry, self.tasks)

    @property
    def agent_tools(self) -> AgentTools:
        """The framework-neutral tools shared by every tool of this toolkit."""
        return self._agent_tools

    def get_tools(self) -> list[BaseTool]:
        """One tool per task of :attr:`tasks` with an ``args`` schema (the three of today by default), sharing
        this toolkit's model, settings and image registry."""
        return [
            _NAMED_TOOLS.get(name, HD4KBaseTool)(agent_tools=self._agent_tools, name=name)
            for name in self._agent_tools.tool_args
        ]

    def register_image(self, image: bytes | Image.Image | str, name: str | None = None) -> str:
        """Register an image (encoded bytes, a PIL image, or a ``data:`` URL) and return the reference
        (``image://img-1``, or ``image://<name>``) that tool calls can use."""
        return self.registry.add(_image_payload(image), name)

    def register_message_images(self, message: BaseMessage) -> list[str]:
        """Register every inline image of ``message`` (any LangChain image format, read through
        ``content_blocks``) and return their references in order.

        Images given by ``http(s)`` URL are not copied (pass the URL itself where URLs are allowed);
        ``file_id`` images cannot be resolved here and are skipped too.
        """
        refs: list[str] = []
        for block in message.content_blocks:
            if block.get("type") != "image":
                continue
            if block.get("base64"):
                refs.append(self.registry.add(_decode_base64(str(block["base64"]))))
            elif isinstance(block.get("url"), str) and block["url"][:5].lower() == "data:":
                refs.append(self.registry.add(_image_payload(block["url"])))
        return refs


def _image_payload(image: bytes | Image.Image | str) -> bytes | Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    if isinstance(image, str) and image[:5].lower() == "data:":
        header, comma, payload = image.partition(",")
        if not comma or ";base64" not in header.lower():
            raise errors.InvalidDataURLError("Expected a data URL like data:image/png;base64,<base64 bytes>.")
        return _decode_base64(payload)
    raise InputError(
        "register_image takes encoded image bytes, a PIL image or a data: URL; file paths and URLs are "
        "passed to the tools directly."
    )


def _decode_base64(payload: str) -> bytes:
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as err:
        raise errors.InvalidBase64Error(f"The image's base64 data does not decode ({err}).") from err


__all__ = [
    "HD4KBaseTool",
    "HD4KChartQuestionTool",
    "HD4KDescribeImageTool",
    "HD4KReadDocumentTool",
    "HD4KToolkit",
]
