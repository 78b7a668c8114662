"""``HD4KToolSpec``: the three hd4k tools (read a document, answer a chart question, describe an image)
as LlamaIndex ``FunctionTool``\\ s for agents.

The tools are thin adapters over :class:`hd4k_tools.AgentTools`, so LlamaIndex and LangChain agents get
the same schemas, descriptions, untrusted-argument rules (allowed folder, URL policy, size limits) and
error texts.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from llama_index.core.tools import FunctionTool, ToolMetadata, ToolOutput
from llama_index.core.tools.tool_spec.base import SPEC_FUNCTION_TYPE, BaseToolSpec
from pydantic import ValidationError

from hd4k_tools import (
    HD4K,
    TOOL_ARGS,
    AgentTools,
    HD4KError,
    ImageRegistry,
    Runner,
    TaskRegistry,
    ToolAnswer,
    ToolSettings,
    error_message,
    invalid_arguments,
)
from hd4k_tools.adapters import as_hd4k, run_cancellable

__all__ = ["HD4KFunctionTool", "HD4KToolSpec"]

logger = logging.getLogger(__name__)


class HD4KFunctionTool(FunctionTool):
    """A ``FunctionTool`` for one hd4k tool.

    ``ToolOutput.content`` is the tool's text for the LLM and ``raw_output`` the full result object
    (``TaskResult``/``ChartResult``/``DocumentResult`` with the HD-N plan, usage and timings). A failed
    call does not raise: it returns ``ToolOutput(is_error=True)`` whose content is the actionable
    error text (what to change), with the exception in ``raw_output`` and ``exception``; agents feed
    that text back to the LLM, which can retry with other arguments.
    """

    def _success(self, output: ToolOutput) -> ToolOutput:
        answer = output.raw_output
        if not isinstance(answer, ToolAnswer):
            return output
        return ToolOutput(
            content=answer.content,
            tool_name=output.tool_name,
            raw_input=output.raw_input,
            raw_output=answer.result,
        )

    def _failure(self, err: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> ToolOutput:
        if not isinstance(err, HD4KError):
            logger.warning("hd4k tool %s failed unexpectedly", self.metadata.name, exc_info=err)
        return ToolOutput(
            content=error_message(err),
            tool_name=self.metadata.get_name(),
            raw_input={"args": args, "kwargs": kwargs},
            raw_output=err,
            is_error=True,
            exception=err,
        )

    def _validated(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        # Checked against the shared schema (extra="forbid") before the call, so a missing or
        # hallucinated argument gets an answer naming the valid ones instead of a bare TypeError.
        schema = self.metadata.fn_schema
        if args or schema is None:
            return kwargs
        try:
            return schema.model_validate(kwargs).model_dump()
        except ValidationError as err:
            raise invalid_arguments(self.metadata.get_name(), err, schema) from err

    def call(self, *args: Any, **kwargs: Any) -> ToolOutput:
        """Run the tool; errors come back as ``is_error`` outputs (see the class docstring)."""
        try:
            return self._success(super().call(*args, **self._validated(args, kwargs)))
        except Exception as err:
            return self._failure(err, args, kwargs)

    async def acall(self, *args: Any, **kwargs: Any) -> ToolOutput:
        """Async :meth:`call` (the model runs in a worker thread)."""
        try:
            return self._success(await super().acall(*args, **self._validated(args, kwargs)))
        except Exception as err:
            return self._failure(err, args, kwargs)


class HD4KToolSpec(BaseToolSpec):
    """Read documents, answer chart questions and describe images at high resolution, as agent tools.

    Tool arguments come from an LLM and are untrusted: files are read only inside
    ``settings.allowed_root`` (none at all without one), URLs only with ``settings.allow_urls`` (and
    never private or link-local hosts), images and PDFs are bounded in bytes, pixels and pages. Images
    the application already holds can be put in ``registry`` and named ``image://<name>`` in prompts.

    >>> spec = HD4KToolSpec(hd, ToolSettings(allowed_root="scans"))    # doctest: +SKIP
    >>> agent = FunctionAgent(tools=spec.to_tool_list(), llm=llm)       # doctest: +SKIP

    Calling a spec function directly (``spec.read_document(image="a.png")``) returns a
    :class:`hd4k_tools.ToolAnswer` and raises on errors; the tools from :meth:`to_tool_list` return
    the error text to the agent instead.
    """

    # One (sync, async) pair per tool task (generated from the task specs): a new task is a new tool.
    spec_functions: list[SPEC_FUNCTION_TYPE] = [(name, "a" + name) for name in TOOL_ARGS]  # noqa: RUF012

    def __init__(
        self,
        hd: HD4K | Runner,
        settings: ToolSettings | None = None,
        registry: ImageRegistry | None = None,
        tasks: TaskRegistry | None = None,
    ) -> None:
        """``hd``: the model (an :class:`hd4k_tools.HD4K`, or a :class:`hd4k_tools.Runner` to wrap);
        ``settings``: limits for untrusted arguments (default: no file or URL access);
        ``registry``: images the agent may name as ``image://...``; ``tasks``: the tasks offered as tools
        (default :data:`hd4k_tools.TASKS`)."""
        self.agent_tools = AgentTools(as_hd4k(hd), settings, registry, tasks)
        self.spec_functions = [(name, "a" + name) for name in self.agent_tools.tool_args]

    @property
    def settings(self) -> ToolSettings:
        return self.agent_tools.settings

    @property
    def registry(self) -> ImageRegistry:
        return self.agent_tools.registry

    # -- the tools -----------------------------------------------------------------------------------
    @property
    def _tool_args(self) -> dict[str, Any]:
        return self.__dict__["agent_tools"].tool_args if "agent_tools" in self.__dict__ else {}

    def __getattr__(self, name: str) -> Any:
        # spec functions for every tool task: "<task>" runs it, "a<task>" is its async twin.
        tool_args = self._tool_args
        if name in tool_args:
            return functools.partial(self.call, name)
        if name.startswith("a") and name[1:] in tool_args:
            return functools.partial(self.acall, name[1:])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _validated(self, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.agent_tools.spec(name).args.model_validate(arguments).model_dump()  # type: ignore[union-attr]
        except ValidationError as err:
            raise invalid_arguments(name, err) from err

    def call(self, name: str, /, **arguments: Any) -> ToolAnswer:
        """Run tool ``name`` (a tool task of :attr:`agent_tools`) with arguments checked against its schema."""
        return self.agent_tools.run(name, self._validated(name, arguments))

    async def acall(self, name: str, /, **arguments: Any) -> ToolAnswer:
        """Async :meth:`call`: the model runs in a worker thread, and cancelling the awaiting task stops it
        at its next token (the core's cancel event), instead of leaving it busy."""
        args = self._validated(name, arguments)
        return await run_cancellable(lambda cancel: self.agent_tools.run(name, args, cancel=cancel))

    def read_document(
        self, image: str, pages: str | None = None, hd_num: int | None = None, region: list[float] | None = None
    ) -> ToolAnswer:
        """Transcribe a document image or PDF (pages: '1', '2-4', '1,3'); see ``ReadDocumentArgs``."""
        return self.call("read_document", image=image, pages=pages, hd_num=hd_num, region=region)

    def answer_chart_question(
        self, image: str, question: str, hd_num: int | None = None, region: list[float] | None = None
    ) -> ToolAnswer:
        """Answer a question about a chart; see ``ChartQuestionArgs``."""
        return self.call("answer_chart_question", image=image, question=question, hd_num=hd_num, region=region)

    def describe_image(
        self, image: str, detail: str = "detailed", hd_num: int | None = None, region: list[float] | None = None
    ) -> ToolAnswer:
        """Describe an image ('brief' or 'detailed'); see ``DescribeImageArgs``."""
        return self.call("describe_image", image=image, detail=detail, hd_num=hd_num, region=region)

    async def aread_document(
        self, image: str, pages: str | None = None, hd_num: int | None = None, region: list[float] | None = None
    ) -> ToolAnswer:
        """Async :meth:`read_document` (cancellable)."""
        return await self.acall("read_document", image=image, pages=pages, hd_num=hd_num, region=region)

    async def aanswer_chart_question(
        self, image: str, question: str, hd_num: int | None = None, region: list[float] | None = None
    ) -> ToolAnswer:
        """Async :meth:`answer_chart_question` (cancellable)."""
        return await self.acall("answer_chart_question", image=image, question=question, hd_num=hd_num, region=region)

    async def adescribe_image(
        self, image: str, detail: str = "detailed", hd_num: int | None = None, region: list[float] | None = None
    ) -> ToolAnswer:
        """Async :meth:`describe_image` (cancellable)."""
        return await self.acall("describe_image", image=image, detail=detail, hd_num=hd_num, region=region)

    # -- LlamaIndex plumbing -------------------------------------------------------------------------
    def get_metadata_from_fn_name(
        self, fn_name: str, spec_functions: list[SPEC_FUNCTION_TYPE] | None = None
    ) -> ToolMetadata | None:
        """Name, description and argument schema shared with the other integrations."""
        tool_args = self._tool_args
        name = fn_name[1:] if fn_name not in tool_args and fn_name[1:] in tool_args else fn_name
        if name not in tool_args:
            return None
        return ToolMetadata(name=name, description=self.agent_tools.tool_descriptions[name], fn_schema=tool_args[name])

    def to_tool_list(
        self,
        spec_functions: list[SPEC_FUNCTION_TYPE] | None = None,
        func_to_metadata_mapping: dict[str, ToolMetadata] | None = None,
    ) -> list[FunctionTool]:
        """One :class:`HD4KFunctionTool` (sync and async) per tool; ``spec_functions`` may pick a subset,
        by name (``["describe_image"]``) or as (sync, async) pairs."""
        mapping = func_to_metadata_mapping or {}
        tools: list[FunctionTool] = []
        for spec in spec_functions or self.spec_functions:
            if isinstance(spec, str):
                sync_name = spec[1:] if spec.startswith("a") and spec[1:] in self._tool_args else spec
                async_name = "a" + sync_name
            elif isinstance(spec, tuple) and len(spec) == 2:
                sync_name, async_name = spec
            else:
                raise ValueError("spec_functions must be tool names or (sync name, async name) pairs.")
            metadata = mapping.get(sync_name) or self.get_metadata_from_fn_name(sync_name)
            if metadata is None:
                raise ValueError(f"Unknown hd4k tool {sync_name!r}; tools are {sorted(self._tool_args)}.")
            tools.append(
                HD4KFunctionTool(fn=getattr(self, sync_name), async_fn=getattr(self, async_name), metadata=metadata)
            )
        return tools
