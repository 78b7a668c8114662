"""The three agent tools as an MCP server, on the official MCP Python SDK's low-level :class:`mcp.server.Server`.

Everything a client sees about a tool comes from :mod:`hd4k_tools.agent_tools`: the name, the description
(the task specs of its ``tasks``), the input schema (their ``args`` models) and the untrusted-argument rules
(:class:`AgentTools` under its :class:`ToolSettings`). This module only adds what MCP has and the other
frameworks do not:

- the ``image`` argument may also be MCP image content (``{"type": "image", "data": <base64>, "mimeType":
  ...}``); it is kept in a bounded :class:`ImageRegistry` and the result names its ``image://`` reference,
  so follow-up calls need not send it again;
- results are the answer as text, plus structured content (:class:`ToolOutput`: per page the HD-N plan, tile
  grid, token counts, timings and page number) and, with ``thumbnails=True``, a small JPEG of the input;
- ``read_document`` reports MCP progress (pages done / total) when the client asks for it;
- an MCP cancellation (``notifications/cancelled``, or closing the request's HTTP stream, on either
  protocol era: :class:`StreamCloseMiddleware` reports a closed stream) sets the model's cancel event, so
  generation stops at the next token or page and the model is free for the next call;
- error texts name ``hd4k mcp``'s own options (``--allowed-root``, ``--max-image-bytes``...), not the
  library's field names (:func:`mcp_error_text`).

Failures are tool results with ``isError: true`` whose text is :func:`error_message` (what to change);
the server lives on.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Literal

import anyio
import anyio.from_thread
import anyio.to_thread
import mcp_types as types
from mcp.server import Server, ServerRequestContext
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hd4k_tools import __version__
from hd4k_tools.agent_tools import AgentTools, ToolAnswer, error_message
from hd4k_tools.errors import CancelledError, FileTooLargeError, HD4KError, InputError, InvalidBase64Error
from hd4k_tools.results import DocumentResult, PlanSummary, TaskResult, Timings, Usage
from hd4k_tools.zoom import DetailLoss

__all__ = [
    "MCP_IMAGE_LIMIT",
    "SERVER_NAME",
    "PageOutput",
    "StreamCloseMiddleware",
    "ToolOutput",
    "build_server",
    "mcp_error_text",
    "tool_definitions",
]

logger = logging.getLogger(__name__)

SERVER_NAME = "hd4k"
#: How many images sent as MCP image content stay referable as ``image://img-N`` (the oldest is forgotten
#: first); the CLI gives its :class:`ImageRegistry` this bound.
MCP_IMAGE_LIMIT = 16

_INSTRUCTIONS = (
    "High-resolution reading of documents, charts and images (InternLM-XComposer2-4KHD). Pass the image as a "
    "file path inside the server's allowed folder, a data: URL, an image:// reference from an earlier result, "
    "or MCP image content ({type: 'image', data: <base64>, mimeType}). Failed calls return an error text "
    "that says what to change."
)


# ----------------------------------------------------------------------------------------------------
# Structured output
# ----------------------------------------------------------------------------------------------------
class PageOutput(BaseModel):
    """One model call: the answer for one image or one PDF page, and what produced it."""

    page: int | None = Field(description="1-based PDF page number; null for an image.")
    text: str
    hd_num: int | None = Field(description="The HD-N budget used (maximum number of 336x336 tiles).")
    grid: str | None = Field(description="The tile grid, rows x cols (plus one global view).")
    plan: PlanSummary | None
    usage: Usage
    timings: Timings
    finish_reason: str
    region: tuple[float, float, float, float] | None = Field(
        default=None,
        description="The part read, [x0, y0, x1, y1] in page fractions (the region asked for, snapped outward "
        "to whole pixels); null: all of it.",
    )
    requested_region: tuple[float, float, float, float] | None = Field(
        default=None, description="The region asked for, as given; null: none."
    )
    detail: DetailLoss | None = Field(
        default=None, description="How much the source was shrunk to fit the plan (source px per model px)."
    )
    windows: int = Field(default=0, description="Windows the page was read in (0: read whole).")


class ToolOutput(BaseModel):
    """The structured content of every tool result."""

    model_config = ConfigDict(extra="forbid")

    tool: str = Field(description="The tool that answered.")
    model: str
    text: str = Field(description="The answer (for a document: every page, separated by page markers).")
    source: str | None = Field(default=None, description="The document read (file name), when known.")
    pages: list[PageOutput] = Field(description="One entry per model call (one per PDF page).")
    image_ref: str | None = Field(
        default=None, description="image:// reference of MCP image content sent with this call, for follow-ups."
    )

    @classmethod
    def from_answer(cls, name: str, answer: ToolAnswer, image_ref: str | None) -> ToolOutput:
        result = answer.result
        if isinstance(result, DocumentResult):
            calls, source = result.pages, result.source
        else:
            calls, source = [result], result.source
        return cls(
            tool=name,
            model=calls[0].model if calls else "",
            text=answer.content,
            source=source,
            pages=[_page_output(r) for r in calls],
            image_ref=image_ref,
        )


def _page_output(result: TaskResult) -> PageOutput:
    plan = result.plan
    return PageOutput(
        page=result.page,
        text=result.text,
        hd_num=result.hd_num,
        grid=plan.grid if plan is not None else None,
        plan=plan,
        usage=result.usage,
        timings=result.timings,
        finish_reason=result.finish_reason,
        region=result.region,
        requested_region=result.requested_region,
        detail=result.detail,
        windows=len(result.windows),
    )


# ----------------------------------------------------------------------------------------------------
# Tool definitions (from agent_tools)
# ----------------------------------------------------------------------------------------------------
class _ImageContentArg(BaseModel):
    """MCP image content given as the ``image`` argument."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    type: Literal["image"]
    data: str = Field(min_length=1)
    mime_type: str = Field(alias="mimeType", min_length=1, max_length=200)


_IMAGE_CONTENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "MCP image content: the image's bytes in base64 and its media type.",
    "properties": {
        "type": {"const": "image"},
        "data": {"type": "string", "contentEncoding": "base64"},
        "mimeType": {"type": "string"},
    },
    "required": ["type", "data", "mimeType"],
}


def _title(name: str) -> str:
    """A display title from the tool name: ``read_document`` -> ``Read document (hd4k)``."""
    return f"{name.replace('_', ' ').capitalize()} ({SERVER_NAME})"


def _input_schema(args: type[BaseModel]) -> dict[str, Any]:
    """The tool's argument schema (its task spec's ``args``), its ``image`` also accepting MCP image content."""
    schema = args.model_json_schema()
    if "image" not in schema.get("properties", {}):
        return schema
    image = schema["properties"]["image"]
    description = image.pop("description", "")
    title = image.pop("title", None)
    schema["properties"]["image"] = {
        **({"title": title} if title else {}),
        "description": f"{description} Or MCP image content (type 'image', base64 data, mimeType).".strip(),
        "anyOf": [image, _IMAGE_CONTENT_SCHEMA],
    }
    return schema


def tool_definitions(tools: AgentTools) -> list[types.Tool]:
    """The MCP tool list: one tool per task of ``tools.tasks`` with an ``args`` schema (names, descriptions
    and schemas from the task specs)."""
    output_schema = ToolOutput.model_json_schema()
    return [
        types.Tool(
            name=name,
            title=_title(name),
            description=spec.description,
            input_schema=_input_schema(spec.args),
            output_schema=output_schema,
            annotations=types.ToolAnnotations(
                title=_title(name),
                read_only_hint=True,
                destructive_hint=False,
                idempotent_hint=True,
                # It reaches beyond its own files only when http(s) URLs are enabled.
                open_world_hint=tools.settings.allow_urls,
            ),
        )
        for name, spec in tools.tasks.tools().items()
        if spec.args is not None
    ]


# ----------------------------------------------------------------------------------------------------
# Calls
# ----------------------------------------------------------------------------------------------------
def _decode_image_content(value: dict[str, Any], max_bytes: int) -> bytes:
    """The bytes of MCP image content given as the ``image`` argument, bounded before decoding."""
    try:
        content = _ImageContentArg.model_validate(value)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors(include_url=False))
        raise InputError(
            f"The 'image' object is not MCP image content ({problems}); pass {{'type': 'image', 'data': <base64>, "
            "'mimeType': 'image/png'}, or a file path, image:// reference or data: URL string."
        ) from None
    if len(content.data) > (max_bytes // 3 + 1) * 4 + 4:
        raise FileTooLargeError(
            f"The image content is larger than the limit of {max_bytes} bytes; send a smaller or more compressed "
            "image (e.g. JPEG, or scaled down)."
        )
    try:
        return base64.b64decode(content.data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidBase64Error(
            "The image content's 'data' is not valid base64; send the image bytes base64-encoded."
        ) from None


def _thumbnail(answer: ToolAnswer) -> types.ImageContent | None:
    result = answer.result
    first = result.pages[0] if isinstance(result, DocumentResult) and result.pages else result
    url = first.thumbnail if isinstance(first, TaskResult) else None
    if not url or "," not in url:
        return None
    header, data = url.split(",", 1)
    return types.ImageContent(data=data, mime_type=header.removeprefix("data:").split(";", 1)[0])


# The library's advice names its Python settings; an MCP user changes hd4k mcp's options instead.
_MCP_OPTION_WORDING: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), replacement)
    for pattern, replacement in (
        (
            r"add its directory to allowed_roots \(ImagePolicy\.allowed_roots; for the agent tools, "
            r"ToolSettings\.allowed_root\)",
            "start hd4k mcp with --allowed-root set to a folder that holds it",
        ),
        (r"no allowed folder is configured", "hd4k mcp was started without --allowed-root"),
        (r"URLs are disabled for this tool", "URLs are disabled on this server (hd4k mcp --allow-urls enables them)"),
        (r"enable URLs with allow_urls=True", "start hd4k mcp with --allow-urls"),
        (r"with allow_urls=True", "with hd4k mcp --allow-urls"),
        (r"raise max_bytes in the ImagePolicy", "raise hd4k mcp's --max-image-bytes"),
        (r"raise max_pixels in the ImagePolicy", "raise hd4k mcp's --max-pixels"),
        (r"\bmax_bytes=", "--max-image-bytes="),
        (r"\bmax_pixels=", "--max-pixels="),
        (r"\bmax_pdf_pages=", "--max-pdf-pages="),
    )
)


def mcp_error_text(err: BaseException) -> str:
    """The error text of a failed call (:func:`error_message`), its advice in ``hd4k mcp``'s options."""
    text = error_message(err)
    for pattern, replacement in _MCP_OPTION_WORDING:
        text = pattern.sub(replacement, text)
    return text


def _error_result(err: BaseException) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(text=mcp_error_text(err))], is_error=True)


# ----------------------------------------------------------------------------------------------------
# A request's HTTP stream closing cancels its call
# ----------------------------------------------------------------------------------------------------
#: Where :class:`StreamCloseMiddleware` leaves the :class:`_StreamWatch` of an HTTP request (its ASGI scope).
STREAM_WATCH_KEY = "hd4k.stream_watch"


class _StreamWatch:
    """Callbacks to run once when the client closes a request's HTTP stream before its response ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []
        self.closed = False

    def on_close(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the stream closes (at once if it already has)."""
        with self._lock:
            if not self.closed:
                self._callbacks.append(callback)
                return
        callback()

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()


_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_ASGIApp = Callable[[_Scope, Callable[[], Awaitable[_Message]], Callable[[_Message], Awaitable[None]]], Awaitable[None]]


class StreamCloseMiddleware:
    """ASGI middleware around the streamable-HTTP app: when a client disconnects before its response has
    ended, the request's :class:`_StreamWatch` (in its scope, which the SDK hands the tool handler as
    ``ctx.request.scope``) runs its callbacks, so the call is cancelled. The SDK cancels on a closed stream
    only in the 2026 protocol; clients of the 2025 protocol (initialize handshake) close a stream and may
    send nothing else."""

    def __init__(self, app: _ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: _Scope, receive: Callable[[], Awaitable[_Message]], send: Callable[[_Message], Awaitable[None]]
    ) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        watch = _StreamWatch()
        scope[STREAM_WATCH_KEY] = watch
        ended = False

        async def watched_send(message: _Message) -> None:
            nonlocal ended
            if message.get("type") == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        async def watched_receive() -> _Message:
            message = await receive()
            if message.get("type") == "http.disconnect" and not ended:
                watch.close()
            return message

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if not ended:
                watch.close()  # the handler gave up on the stream (a disconnect seen by someone else)


class _ToolCaller:
    """Runs one ``tools/call`` in a worker thread, bridging MCP progress and cancellation."""

    def __init__(self, tools: AgentTools, *, thumbnails: bool) -> None:
        self.tools = tools
        self.thumbnails = thumbnails

    def _arguments(self, arguments: dict[str, Any] | None) -> tuple[dict[str, Any], str | None]:
        args = dict(arguments or {})
        image = args.get("image")
        if not isinstance(image, dict):
            return args, None
        data = _decode_image_content(image, self.tools.settings.max_bytes)
        ref = self.tools.registry.add(data)
        args["image"] = ref
        return args, ref

    async def __call__(
        self, ctx: ServerRequestContext[Any, Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        name = params.name
        try:
            answer, image_ref = await self._run(ctx, name, params.arguments)
        except HD4KError as err:
            logger.info("tool %s refused: %s", name, err)
            return _error_result(err)
        except Exception as err:  # a bug: the traceback stays in the server log
            logger.exception("tool %s failed unexpectedly", name)
            return _error_result(err)
        content: list[types.ContentBlock] = [types.TextContent(text=answer.content)]
        if self.thumbnails and (thumb := _thumbnail(answer)) is not None:
            content.append(thumb)
        output = ToolOutput.from_answer(name, answer, image_ref)
        return types.CallToolResult(content=content, structured_content=output.model_dump(mode="json"))

    async def _run(
        self, ctx: ServerRequestContext[Any, Any], name: str, raw_arguments: dict[str, Any] | None
    ) -> tuple[ToolAnswer, str | None]:
        """The answer and the ``image://`` reference of image content sent with the call (decoded here, in
        the worker, like everything else that takes time)."""
        cancel = threading.Event()
        pages = [0, 0]  # done, total
        watch = getattr(getattr(ctx, "request", None), "scope", {}).get(STREAM_WATCH_KEY)
        if isinstance(watch, _StreamWatch):

            def stream_closed() -> None:
                if not cancel.is_set():
                    logger.info("tool %s: the client closed the request's stream; cancelling", name)
                cancel.set()

            watch.on_close(stream_closed)

        def on_page(done: int, total: int) -> None:
            pages[:] = [done, total]
            if cancel.is_set():
                return
            try:
                message = f"{done}/{total} pages read"
                anyio.from_thread.run(ctx.session.report_progress, float(done), float(total), message)
            except Exception:  # a lost progress note must not fail the reading
                logger.warning("could not send progress for %s", name, exc_info=True)

        def work() -> tuple[ToolAnswer, str | None]:
            arguments, image_ref = self._arguments(raw_arguments)
            try:
                return self.tools.invoke(name, arguments, cancel=cancel, on_page=on_page), image_ref
            except CancelledError:
                logger.info("tool %s stopped after the cancellation (%d of %d pages read)", name, *pages)
                raise

        try:
            # abandon_on_cancel: the handler gives up at once on a cancellation; the worker sees ``cancel``
            # at the next token and leaves the model (its lock) to the next call.
            return await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
        except anyio.get_cancelled_exc_class():
            cancel.set()
            logger.info("tool %s cancelled by the client", name)
            raise


def build_server(tools: AgentTools, *, thumbnails: bool = False) -> Server[Any]:
    """An MCP server offering ``read_document``, ``answer_chart_question`` and ``describe_image`` over ``tools``.

    ``thumbnails=True`` adds a small JPEG of the input image to every result as MCP image content.
    ``hd4k mcp`` (:func:`hd4k_tools.mcp.cli.run_from_args`) runs it over stdio or streamable HTTP.
    """
    definitions = tool_definitions(tools)
    caller = _ToolCaller(tools, thumbnails=thumbnails)

    async def list_tools(
        ctx: ServerRequestContext[Any, Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        return types.ListToolsResult(tools=definitions)

    return Server(
        SERVER_NAME,
        version=__version__,
        title="hd4k: high-resolution document, chart and image reading",
        instructions=_INSTRUCTIONS,
        on_list_tools=list_tools,
        on_call_tool=caller,
    )
