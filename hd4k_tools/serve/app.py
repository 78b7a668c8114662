"""An OpenAI-compatible HTTP server over a :class:`~hd4k_tools.runtime.runner.Runner` (extra ``serve``).

``create_app(runner)`` returns a FastAPI application with

* ``POST /v1/chat/completions``: OpenAI chat completions (text and ``image_url`` content parts, streaming
  with server-sent events), plus the extensions ``hd_num`` (an int, ``"auto"``, or one per image),
  ``top_k``, ``repetition_penalty``, ``num_beams`` and ``layout`` (``"chat"`` or ``"eval"``). Responses
  carry an extension field ``hd4k`` with the tile plans, timings and image-token count.
* ``GET /v1/models`` and ``GET /health``.

Untrusted input never reaches the model unchecked: the request body is capped (``max_request_bytes``),
images go through :func:`hd4k_tools.inputs.images.load_image` under an :class:`ImagePolicy` (pixel and byte
limits; ``http(s)`` image URLs only with ``allow_image_urls=True`` and never to private addresses unless
the policy says so), and every error is answered in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` — 400/413 for bad input, 500 with a generic message
(the traceback goes to the server log only) for bugs.

Decoding defaults are the runner's (:class:`GenerationConfig`: greedy, 512 new tokens) for every setting a
request leaves out; ``temperature: 0`` is greedy, any other temperature samples. So that one request cannot
hold the model for long or exhaust its memory, ``max_tokens`` above the server's ``max_tokens_limit``
(default :data:`DEFAULT_MAX_TOKENS_LIMIT`) is refused with 400 (not clamped: a silently shorter answer
would look like a complete one), and ``num_beams`` is at most
:data:`~hd4k_tools.runtime.generation_config.MAX_NUM_BEAMS`. The request's ``model`` field is not checked (one
server serves one model). Streamed and whole answers are cut at ``stop`` sequences and trimmed of
surrounding whitespace the same way, so the deltas join to the whole answer.

Generation runs in a worker thread, so the event loop keeps answering (``/health`` stays responsive
during a long answer); a client that disconnects cancels its generation between two tokens.

``run_server(model_dir)`` binds the port (a port already in use fails at once, before the model loads),
loads the native model and serves it with uvicorn; ``hd4k serve --model DIR`` (or
``python -m hd4k_tools.serve.app --model DIR``) does the same from a shell.

FastAPI and uvicorn are imported only when an app is built or served; without them
:class:`~hd4k_tools.errors.MissingDependencyError` says what to install.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import anyio
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from hd4k_tools.errors import (
    CancelledError,
    ContextOverflowError,
    FileTooLargeError,
    HD4KError,
    ImageTooLargeError,
    InputError,
    InvalidHDNumError,
    MissingDependencyError,
    URLFetchError,
    URLNotAllowedError,
)
from hd4k_tools.hd4k import plan_images
from hd4k_tools.inputs.images import load_image
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.models.xcomposer2_4khd.tiling import HDNum, HDPlan, check_hd_num
from hd4k_tools.runtime.engines import load_engine
from hd4k_tools.runtime.generation_config import MAX_NUM_BEAMS, GenerationConfig
from hd4k_tools.runtime.runner import GenerationRequest, Message, Runner, RunnerResult, TextStream
from hd4k_tools.runtime.stops import StopFilter, cut_at_stops
from hd4k_tools.serve.ports import ServeError, bind_port
from hd4k_tools.serve.vllm import run_vllm_server

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_MAX_TOKENS_LIMIT",
    "APIError",
    "ChatCompletionRequest",
    "ServeError",
    "build_parser",
    "create_app",
    "main",
    "run_server",
]

logger = logging.getLogger("hd4k_tools.serve.app")

#: Default cap on a request body: a few full-resolution images as base64 data URLs.
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20
#: Default cap on ``max_tokens``: four times the longest task default (``read_document``, 1024 tokens).
DEFAULT_MAX_TOKENS_LIMIT = 4096
# Past the body limit we still read (and discard) up to this many extra bytes, so that a client that is
# still uploading reads our 413 instead of a connection reset; beyond it we answer and let the
# connection drop.
_DRAIN_LIMIT = 8 * 2**20
_DISCONNECT_POLL_S = 0.25
_MAX_STOP_SEQUENCES = 16
_SERVE_HINT = 'pip install "hd4k-tools[serve]"'

T = TypeVar("T")


# ----------------------------------------------------------------------------------------------------
# Request schema (OpenAI chat completions + hd4k extensions)
# ----------------------------------------------------------------------------------------------------
class _ImageURL(BaseModel):
    url: str
    detail: str | None = None


class _TextPart(BaseModel):
    type: Literal["text"]
    text: str


class _ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: _ImageURL | str


_Part = Annotated[_TextPart | _ImagePart, Field(discriminator="type")]


class _ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[_Part] | None = None
    name: str | None = None


class _StreamOptions(BaseModel):
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """The body of ``POST /v1/chat/completions`` (unknown OpenAI fields are accepted and ignored)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    messages: list[_ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(default=None, ge=1)
    max_completion_tokens: StrictInt | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: StrictInt | None = Field(default=None, ge=0)
    stop: str | list[str] | None = None
    n: StrictInt | None = Field(default=None, ge=1)
    stream: StrictBool = False
    stream_options: _StreamOptions | None = None
    # hd4k extensions
    hd_num: StrictInt | Literal["auto"] | list[StrictInt | Literal["auto"]] | None = None
    top_k: StrictInt | None = Field(default=None, ge=0)
    repetition_penalty: float | None = Field(default=None, gt=0)
    num_beams: StrictInt | None = Field(default=None, ge=1, le=MAX_NUM_BEAMS)
    layout: Literal["chat", "eval"] | None = None


# ----------------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# ----------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered to the client as ``{"error": {...}}`` with ``status_code``."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.type = type

    def body(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _internal_error() -> APIError:
    return APIError(
        500,
        "The server failed while handling this request; the details are in the server log.",
        type="server_error",
        code="internal_error",
    )


def _api_error_from(err: BaseException, *, param: str | None = None) -> APIError:
    """Map a library error to the HTTP error a client should see (never a 500 for bad input)."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, ContextOverflowError):
        return APIError(400, str(err), param="messages", code="context_length_exceeded")
    if isinstance(err, FileTooLargeError):
        return APIError(413, str(err), param=param, code="image_too_large")
    if isinstance(err, ImageTooLargeError):
        return APIError(400, str(err), param=param, code="image_too_large")
    if isinstance(err, URLNotAllowedError):
        return APIError(400, str(err), param=param, code="image_url_not_allowed")
    if isinstance(err, URLFetchError):
        return APIError(400, str(err), param=param, code="image_url_fetch_failed")
    if isinstance(err, InvalidHDNumError):
        return APIError(400, str(err), param="hd_num", code="invalid_hd_num")
    if isinstance(err, InputError):
        return APIError(400, str(err), param=param, code="invalid_input")
    return _internal_error()


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "list", "dict"})


def _clean_loc(loc: Sequence[Any]) -> list[str]:
    """A validation error's location without pydantic's union bookkeeping: ``("messages", 0, "content",
    "list[tagged-union[...]]", 0, "image_url", "image_url", "_ImageURL", "url")`` becomes
    ``["messages", "0", "content", "0", "image_url", "url"]``."""
    out: list[str] = []
    i = 0
    while i < len(loc):
        seg = loc[i]
        if seg == "body":
            i += 1
        elif isinstance(seg, str) and ("[" in seg or seg in _TYPE_TAGS or seg.startswith("_")):
            if "tagged-union" in seg and i + 2 < len(loc) and isinstance(loc[i + 1], int):
                out.append(str(loc[i + 1]))  # the list index; the discriminator tag after it is dropped
                i += 3
            else:
                i += 1
        else:
            out.append(str(seg))
            i += 1
    return out


def _validation_message(err: Any) -> tuple[str, str | None]:
    """(message, param) for a pydantic/FastAPI validation error: the most specific problem (the deepest
    location, which for a union is the branch that matched best)."""
    errors = err.errors() if hasattr(err, "errors") else []
    if not errors:
        return "The request body is not valid.", None
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    param = ".".join(_clean_loc(first.get("loc", ()))) or None
    # Sibling branches of the same union (locations that are prefixes of ``param``) are not news.
    others = {".".join(_clean_loc(e.get("loc", ()))) for e in errors}
    others = {o for o in others if not (param or "").startswith(o)}
    extra = f" (and problems in: {', '.join(sorted(o or 'body' for o in others))})" if others else ""
    where = f"{param}: " if param else ""
    return f"Invalid request: {where}{first.get('msg', 'invalid value')}{extra}.", param


# ----------------------------------------------------------------------------------------------------
# Stop sequences and whitespace, identical for streamed and whole answers
# ----------------------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------------------
# Building the runner request
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Prepared:
    request: GenerationRequest
    stream: bool
    include_usage: bool
    stops: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Settings:
    runner: Runner
    policy: ImagePolicy
    allow_image_urls: bool
    default_hd_num: HDNum
    model_name: str
    max_request_bytes: int
    api_key: str | None
    max_tokens_limit: int


def _generation_config(body: ChatCompletionRequest, max_tokens_limit: int) -> GenerationConfig:
    changes: dict[str, Any] = {}
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None:
        if max_tokens > max_tokens_limit:
            field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
            raise APIError(
                400,
                f"{field}={max_tokens} is over this server's limit of {max_tokens_limit} new tokens; ask for "
                f"at most {max_tokens_limit} (the server's --max-tokens-limit).",
                param=field,
                code="max_tokens_too_large",
            )
        changes["max_new_tokens"] = max_tokens
    elif GenerationConfig.max_new_tokens > max_tokens_limit:
        # The client asked for nothing: the server's own default must respect the server's own cap.
        changes["max_new_tokens"] = max_tokens_limit
    if body.temperature is not None:
        # OpenAI's temperature 0 means "as deterministic as possible": greedy decoding.
        if body.temperature == 0:
            changes["do_sample"] = False
        else:
            changes["do_sample"] = True
            changes["temperature"] = body.temperature
    for name in ("top_p", "top_k", "repetition_penalty", "num_beams", "seed"):
        value = getattr(body, name)
        if value is not None:
            changes[name] = value
    try:
        return GenerationConfig(**changes)
    except ValueError as err:
        raise APIError(400, f"Invalid generation settings: {err}", code="invalid_generation_settings") from err


def _stops(stop: str | list[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > _MAX_STOP_SEQUENCES:
        raise APIError(400, f"At most {_MAX_STOP_SEQUENCES} stop sequences are supported.", param="stop")
    if any(not s for s in stops):
        raise APIError(400, "Stop sequences must be non-empty strings.", param="stop")
    return tuple(stops)


def _load_image_part(url: str, settings: _Settings, param: str) -> Any:
    head = url.lstrip()[:16].lower()
    if head.startswith("data:"):
        policy = dataclasses.replace(settings.policy, allow_urls=False)
    elif head.startswith(("http://", "https://")):
        if not settings.allow_image_urls:
            raise APIError(
                400,
                "Image URLs are disabled on this server; send the image inline as a data URL "
                "(data:image/png;base64,...), or start the server with --allow-image-urls.",
                param=param,
                code="image_url_not_allowed",
            )
        policy = dataclasses.replace(settings.policy, allow_urls=True)
    else:
        # Anything else would be read as a path or raw base64 by load_image: never from a client.
        raise APIError(
            400,
            "image_url.url must be a data URL (data:image/...;base64,...) or an http(s) URL.",
            param=param,
            code="invalid_image_url",
        )
    try:
        return load_image(url, policy=policy)
    except HD4KError as err:
        raise _api_error_from(err, param=param) from err


def _messages(body: ChatCompletionRequest, settings: _Settings) -> tuple[Message, ...]:
    out: list[Message] = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        parts: list[Any] = []
        if isinstance(m.content, str):
            parts.append(m.content)
        elif m.content is not None:
            for j, part in enumerate(m.content):
                if isinstance(part, _TextPart):
                    parts.append(part.text)
                else:
                    url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                    param = f"messages.{i}.content.{j}.image_url.url"
                    if role != "user":
                        raise APIError(400, "Images are only accepted in user messages.", param=param)
                    parts.append(_load_image_part(url, settings, param))
        out.append(Message(role, tuple(parts)))  # type: ignore[arg-type]
    if out[-1].role != "user":
        raise APIError(400, "The last message must be a user message (the question to answer).", param="messages")
    if any(m.role == "system" for m in out[1:]):
        raise APIError(400, "A system message is only allowed as the first message.", param="messages")
    return tuple(out)


def _plans(
    body: ChatCompletionRequest, messages: Sequence[Message], gen: GenerationConfig, settings: _Settings
) -> tuple[HDPlan, ...]:
    images = [img for m in messages for img in m.images]
    try:
        return plan_images(
            images,
            body.hd_num,
            default_hd_num=settings.default_hd_num,
            context_length=settings.runner.context_length,
            max_new_tokens=gen.max_new_tokens,
        )
    except ContextOverflowError as err:
        raise APIError(400, str(err), param="max_tokens", code="context_length_exceeded") from err
    except InputError as err:
        raise _api_error_from(err, param="hd_num") from err


def _prepare(raw: bytes, settings: _Settings) -> _Prepared:
    """Parse, validate and load a request body (runs in a worker thread: JSON and image decoding are
    CPU work)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise APIError(400, f"The request body is not valid JSON: {err}", code="invalid_json") from err
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        body = ChatCompletionRequest.model_validate(data)
    except ValidationError as err:
        message, param = _validation_message(err)
        raise APIError(400, message, param=param) from err
    if body.n not in (None, 1):
        raise APIError(400, "Only n=1 is supported: one answer per request.", param="n", code="unsupported_n")
    gen = _generation_config(body, settings.max_tokens_limit)
    stops = _stops(body.stop)
    messages = _messages(body, settings)
    plans = _plans(body, messages, gen, settings)
    request = GenerationRequest.planned(messages, plans, generation=gen, layout=body.layout or "chat")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return _Prepared(request=request, stream=body.stream, include_usage=include_usage, stops=stops)


# ----------------------------------------------------------------------------------------------------
# Responses
# ----------------------------------------------------------------------------------------------------
def _finish_reason(result: RunnerResult | None, stopped: bool) -> str:
    if stopped:
        return "stop"
    reason = result.finish_reason if result is not None else "stop"
    return reason if reason in ("stop", "length") else "stop"


def _usage(result: RunnerResult | None) -> dict[str, int]:
    if result is None:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def _extension(result: RunnerResult | None, request: GenerationRequest) -> dict[str, Any]:
    if result is None:
        return {"hd_nums": list(request.hd_nums), "plans": [], "image_tokens": 0, "timings": None}
    return {
        "hd_nums": list(request.hd_nums),
        "plans": [p.model_dump(mode="json") for p in result.plans],
        "image_tokens": result.usage.image_tokens,
        "timings": result.timings.model_dump(mode="json"),
    }


def _completion_body(
    cid: str, created: int, model: str, text: str, finish: str, result: RunnerResult, request: GenerationRequest
) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": _usage(result),
        "hd4k": _extension(result, request),
    }


def _chunk(cid: str, created: int, model: str, delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        **extra,
    }
    return _sse(body)


def _sse(body: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()


# ----------------------------------------------------------------------------------------------------
# The application
# ----------------------------------------------------------------------------------------------------
def _require_serve() -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise MissingDependencyError(
            f"The HTTP server needs FastAPI and uvicorn, which are not installed: {_SERVE_HINT}"
        ) from err


def create_app(
    runner: Runner,
    *,
    policy: ImagePolicy | None = None,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    allow_image_urls: bool = False,
    default_hd_num: HDNum = 25,
    served_model_name: str | None = None,
    api_key: str | None = None,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
) -> FastAPI:
    """Build the OpenAI-compatible FastAPI app that answers with ``runner``.

    Args:
        runner: any :class:`~hd4k_tools.runtime.runner.Runner` (usually a ``LocalRunner``); it must be safe to
            call from several threads (``LocalRunner`` serialises its model calls).
        policy: image limits (pixels, bytes, private URLs); defaults to ``ImagePolicy()``.
        max_request_bytes: largest accepted request body; larger ones get 413.
        allow_image_urls: accept ``http(s)://`` image URLs (fetched under ``policy``: private and
            loopback addresses stay refused unless ``policy.allow_private_urls``). Data URLs are always
            accepted.
        default_hd_num: tile budget for images when a request has no ``hd_num`` (an int or ``"auto"``).
        served_model_name: the model name reported by the API; defaults to ``runner.model_id``.
        api_key: when set, requests to ``/v1/*`` must send ``Authorization: Bearer <api_key>``.
        max_tokens_limit: largest ``max_tokens`` (or ``max_completion_tokens``) a request may ask for;
            more is refused with 400 ``max_tokens_too_large``. A request without ``max_tokens`` gets the
            runner's default, lowered to this limit if needed.

    Raises:
        MissingDependencyError: FastAPI/uvicorn are not installed (``pip install "hd4k-tools[serve]"``).
    """
    _require_serve()
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse, StreamingResponse

    if isinstance(default_hd_num, str):
        if default_hd_num.strip().lower() != "auto":
            raise InvalidHDNumError(f"default_hd_num must be a positive int or 'auto', got {default_hd_num!r}.")
        default_hd_num = "auto"
    else:
        check_hd_num(default_hd_num)
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    if isinstance(max_tokens_limit, bool) or not isinstance(max_tokens_limit, int) or max_tokens_limit < 1:
        raise ValueError(f"max_tokens_limit must be an int >= 1, got {max_tokens_limit!r}")
    settings = _Settings(
        runner=runner,
        policy=policy or ImagePolicy(),
        allow_image_urls=allow_image_urls,
        default_hd_num=default_hd_num,
        model_name=served_model_name or runner.model_id,
        max_request_bytes=max_request_bytes,
        api_key=api_key,
        max_tokens_limit=max_tokens_limit,
    )
    started = int(time.time())
    app = FastAPI(title="hd4k-tools", description="OpenAI-compatible server for InternLM-XComposer2-4KHD")

    def error_response(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status_code)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), type=kind, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(APIError)
    async def _on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(_internal_error())

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if not hmac.compare_digest(header.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(
                401,
                "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                type="authentication_error",
                code="invalid_api_key",
            )

    async def read_body(request: Request) -> bytes:
        limit = settings.max_request_bytes
        too_large = APIError(
            413,
            f"The request body is larger than this server's limit of {limit:,} bytes; send smaller or "
            "fewer images (e.g. pre-sized with RemoteRunner), or raise --max-request-bytes.",
            code="request_too_large",
        )
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                declared_size = int(declared)
            except ValueError:
                raise APIError(400, "Invalid Content-Length header.", code="invalid_request") from None
            if declared_size > limit:
                if declared_size <= limit + _DRAIN_LIMIT:
                    async for _ in request.stream():
                        pass
                raise too_large
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit + _DRAIN_LIMIT:
                break
            if size <= limit:
                chunks.append(chunk)
        # Past the limit (the header lied or was absent: a chunked upload) we stopped storing and drained
        # a bounded amount, so the client can read this answer.
        if size > limit:
            raise too_large
        return b"".join(chunks)

    async def in_thread_until_disconnect(request: Request, call: Callable[[], T], cancel: threading.Event) -> T:
        """Run ``call`` in a worker thread; if the client goes away meanwhile, set ``cancel``."""
        box: list[T] = []
        failure: list[Exception] = []

        async def watch() -> None:
            while not await request.is_disconnected():
                await anyio.sleep(_DISCONNECT_POLL_S)
            cancel.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                box.append(await anyio.to_thread.run_sync(call))
            except Exception as err:  # re-raised below, unwrapped (a task group would wrap it in a group)
                failure.append(err)
            tg.cancel_scope.cancel()
        if failure:
            raise failure[0]
        return box[0]

    async def answer_whole(request: Request, prep: _Prepared, cid: str, created: int) -> JSONResponse:
        cancel = threading.Event()
        if prep.stops:
            # Stream internally so generation stops as soon as a stop sequence appears.
            def consume() -> tuple[str, bool, RunnerResult | None]:
                stream = settings.runner.stream(prep.request, cancel=cancel)
                filt = StopFilter(prep.stops)
                pieces: list[str] = []
                try:
                    for delta in stream:
                        pieces.append(filt.feed(delta))
                        if filt.stopped:
                            break
                finally:
                    stream.close()
                pieces.append(filt.finish())
                return "".join(pieces), filt.stopped, stream.result

            text, stopped, result = await in_thread_until_disconnect(request, consume, cancel)
        else:
            result = await in_thread_until_disconnect(
                request, lambda: settings.runner.generate(prep.request, cancel=cancel), cancel
            )
            text, stopped = cut_at_stops(result.text, ())
        if result is None:  # pragma: no cover - a runner that produced no result without raising
            raise _internal_error()
        body = _completion_body(
            cid, created, settings.model_name, text, _finish_reason(result, stopped), result, prep.request
        )
        return JSONResponse(body)

    async def answer_stream(request: Request, prep: _Prepared, cid: str, created: int) -> Response:
        cancel = threading.Event()
        done = object()
        stream: TextStream = await anyio.to_thread.run_sync(lambda: settings.runner.stream(prep.request, cancel=cancel))
        # Pull the first delta before answering 200, so that errors found by the runner before the first
        # token (context overflow, bad hd_num) still get a proper status code.
        try:
            first = await in_thread_until_disconnect(request, lambda: next(stream, done), cancel)
        except BaseException:
            await anyio.to_thread.run_sync(stream.close)
            raise
        model = settings.model_name

        async def events() -> AsyncIterator[bytes]:
            filt = StopFilter(prep.stops)
            finished = False
            try:
                yield _chunk(cid, created, model, {"role": "assistant", "content": ""}, None)
                delta = first
                while delta is not done:
                    out = filt.feed(delta)  # type: ignore[arg-type]
                    if out:
                        yield _chunk(cid, created, model, {"content": out}, None)
                    if filt.stopped:
                        break
                    delta = await anyio.to_thread.run_sync(lambda: next(stream, done))
                if filt.stopped:
                    cancel.set()
                tail = filt.finish()
                if tail:
                    yield _chunk(cid, created, model, {"content": tail}, None)
                await anyio.to_thread.run_sync(stream.close)
                result = stream.result
                yield _chunk(
                    cid,
                    created,
                    model,
                    {},
                    _finish_reason(result, filt.stopped),
                    hd4k=_extension(result, prep.request),
                )
                if prep.include_usage:
                    yield _sse(
                        {
                            "id": cid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [],
                            "usage": _usage(result),
                        }
                    )
                yield b"data: [DONE]\n\n"
                finished = True
            except Exception as err:
                # The status line is already sent: report the error as an event, the way OpenAI does.
                api_err = _api_error_from(err)
                if api_err.status_code >= 500:
                    logger.error("error while streaming %s", cid, exc_info=err)
                yield _sse(api_err.body())
                yield b"data: [DONE]\n\n"
            finally:
                if not finished:
                    # Client gone (task cancelled) or an error: stop the generation, release the worker.
                    cancel.set()
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(stream.close)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def chat_completions(request: Request) -> Response:
        try:
            check_auth(request)
            raw = await read_body(request)
            prep = await anyio.to_thread.run_sync(lambda: _prepare(raw, settings))
            cid = f"chatcmpl-{uuid.uuid4().hex}"
            created = int(time.time())
            if prep.stream:
                return await answer_stream(request, prep, cid, created)
            return await answer_whole(request, prep, cid, created)
        except APIError as err:
            return error_response(err)
        except CancelledError:
            return error_response(APIError(499, "The request was cancelled.", code="cancelled"))
        except HD4KError as err:
            api_err = _api_error_from(err)
            if api_err.status_code >= 500:
                logger.error("error on /v1/chat/completions", exc_info=err)
            return error_response(api_err)
        except Exception as err:
            logger.error("unhandled error on /v1/chat/completions", exc_info=err)
            return error_response(_internal_error())

    async def list_models(request: Request) -> JSONResponse:
        try:
            check_auth(request)
        except APIError as err:
            return error_response(err)
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": settings.model_name,
                        "object": "model",
                        "created": started,
                        "owned_by": "hd4k-tools",
                        "context_length": settings.runner.context_length,
                    }
                ],
            }
        )

    async def health(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "model": settings.model_name})

    # Plain Starlette routes: the handlers read the raw request themselves (body limit, OpenAI-shaped
    # errors), so FastAPI's parameter injection has nothing to do.
    app.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_route("/v1/models", list_models, methods=["GET"])
    app.add_route("/health", health, methods=["GET"])
    return app


# ----------------------------------------------------------------------------------------------------
# Serving the native model
# ----------------------------------------------------------------------------------------------------
def run_server(
    model: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    dtype: str = "auto",
    quantization: str | None = None,
    served_model_name: str | None = None,
    allow_image_urls: bool = False,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    max_pixels: int | None = None,
    max_image_bytes: int | None = None,
    default_hd_num: HDNum = 25,
    api_key: str | None = None,
    log_level: str = "info",
    cache_bytes: int = 1 << 30,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
) -> None:
    """Bind ``host:port``, load the native model from ``model`` (a checkpoint folder or hub id) and serve
    it until stopped.

    ``host`` defaults to loopback: pass ``host="0.0.0.0"`` deliberately (ideally with ``api_key``) to
    serve other machines. ``max_pixels``/``max_image_bytes`` tighten the default :class:`ImagePolicy`;
    ``max_tokens_limit`` caps ``max_tokens`` per request (see :func:`create_app`).

    Raises:
        ServeError: the port is already in use or cannot be bound (raised before the model loads), or
            uvicorn did not start.
    """
    _require_serve()
    import uvicorn

    policy_changes: dict[str, Any] = {}
    if max_pixels is not None:
        policy_changes["max_pixels"] = max_pixels
    if max_image_bytes is not None:
        policy_changes["max_bytes"] = max_image_bytes
    policy = ImagePolicy(**policy_changes)
    sock = bind_port(host, port)
    try:
        runner = load_engine(
            "native", model, device=device, dtype=dtype, quantization=quantization, cache_bytes=cache_bytes
        )
        try:
            app = create_app(
                runner,
                policy=policy,
                max_request_bytes=max_request_bytes,
                allow_image_urls=allow_image_urls,
                default_hd_num=default_hd_num,
                served_model_name=served_model_name,
                api_key=api_key,
                max_tokens_limit=max_tokens_limit,
            )
            bound = sock.getsockname()[1]
            where = f"[{host}]" if ":" in host else host

            class _Server(uvicorn.Server):
                async def startup(self, sockets: list[socket.socket] | None = None) -> None:
                    await super().startup(sockets=sockets)
                    # uvicorn announces its address only when it binds the socket itself.
                    if self.started:
                        logging.getLogger("uvicorn.error").info(
                            "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", where, bound
                        )

            server = _Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
            # uvicorn.run treats Ctrl-C as a clean stop too.
            with contextlib.suppress(KeyboardInterrupt):
                server.run(sockets=[sock])
            if not server.started:
                raise ServeError(f"the server on {host}:{bound} did not start; see the log above")
        finally:
            runner.close()
    finally:
        sock.close()


def _positive_int_arg(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return n


def _hd_num_arg(value: str) -> HDNum:
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return _positive_int_arg(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {value!r}") from None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The command-line options of ``python -m hd4k_tools.serve.app``; ``hd4k serve`` passes its sub-parser
    to be filled with the same options."""
    p = parser or argparse.ArgumentParser(
        prog="python -m hd4k_tools.serve.app",
        description="Serve InternLM-XComposer2-4KHD over an OpenAI-compatible HTTP API.",
    )
    p.add_argument("--model", required=True, help="checkpoint folder (or hub id)")
    p.add_argument(
        "--engine",
        choices=("native", "vllm"),
        default="native",
        help=(
            "native: this project's server, one request at a time (default); vllm: vLLM's OpenAI server with "
            "continuous batching (extra: vllm; --model must be a folder)"
        ),
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=_positive_int_arg,
        default=1,
        metavar="N",
        help="--engine vllm: GPUs to shard the model over (default 1)",
    )
    p.add_argument(
        "--hd-num",
        type=_positive_int_arg,
        default=None,
        metavar="N",
        help=(
            "--engine vllm: the engine's HD-N budget and default, the largest hd_num a request may ask for "
            "(default: the plugin's DEFAULT_ENGINE_HD_NUM); requests pick theirs with "
            '"mm_processor_kwargs": {"hd_num": n}'
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default=None)
    p.add_argument("--served-model-name", default=None, help="model name reported by the API")
    p.add_argument("--allow-image-urls", action="store_true", help="fetch http(s) image URLs (public hosts)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES)
    p.add_argument("--max-pixels", type=int, default=None, help="largest image (width*height) accepted")
    p.add_argument("--max-image-bytes", type=int, default=None, help="largest encoded image accepted")
    p.add_argument("--default-hd-num", type=_hd_num_arg, default=25, help="an int or 'auto' (default 25)")
    p.add_argument(
        "--max-tokens-limit",
        type=_positive_int_arg,
        default=DEFAULT_MAX_TOKENS_LIMIT,
        metavar="N",
        help=(
            f"largest max_tokens one request may ask for (default {DEFAULT_MAX_TOKENS_LIMIT}); a request over "
            "it is refused with 400, not clamped, so a client never mistakes a cut answer for a whole one. "
            "Requests without max_tokens get min(512, N)"
        ),
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("HD4K_API_KEY"),
        help="require 'Authorization: Bearer KEY' (default: $HD4K_API_KEY; the environment keeps it out of ps)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "vllm_args",
        nargs=argparse.REMAINDER,
        metavar="-- VLLM_OPTION ...",
        help="--engine vllm: options passed on to vLLM's server as they are, after '--'",
    )
    return p


# Options of the native server that vLLM's server has no equivalent for: refused with --engine vllm
# rather than silently ignored.
_NATIVE_ONLY = (
    "device",
    "quantization",
    "allow_image_urls",
    "max_request_bytes",
    "max_pixels",
    "max_image_bytes",
    "default_hd_num",
    "max_tokens_limit",
)


def _serve_vllm(args: argparse.Namespace) -> int:
    defaults = build_parser().parse_args(["--model", "-"])
    changed = [name for name in _NATIVE_ONLY if getattr(args, name) != getattr(defaults, name)]
    if changed:
        flags = ", ".join("--" + name.replace("_", "-") for name in changed)
        raise InputError(
            f"{flags} configure(s) the native server only; vLLM's server has its own options (pass them after "
            "'--', e.g. '-- --allowed-media-domains example.com' to allow image URLs from that host)."
        )
    extra = list(args.vllm_args or ())
    if extra and extra[0] == "--":
        extra = extra[1:]
    run_vllm_server(
        args.model,
        host=args.host,
        port=args.port,
        hd_num=args.hd_num,
        tensor_parallel_size=args.tensor_parallel_size,
        served_model_name=args.served_model_name,
        dtype=args.dtype,
        api_key=args.api_key,
        log_level=args.log_level,
        extra_args=extra,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m hd4k_tools.serve.app``."""
    args = build_parser().parse_args(argv)
    try:
        return serve_from_args(args)
    except HD4KError as err:  # a bad model folder, a missing extra: the message says what to do
        print(f"error: {err}", file=sys.stderr)
        return 1


def serve_from_args(args: argparse.Namespace) -> int:
    """Run :func:`run_server` with options parsed by :func:`build_parser` (``hd4k serve`` calls this and
    reports errors its own way)."""
    if args.engine == "vllm":
        return _serve_vllm(args)
    extra = [a for a in (args.vllm_args or ()) if a != "--"]
    if extra or args.hd_num is not None or args.tensor_parallel_size != 1:
        raise InputError(
            "--hd-num, --tensor-parallel-size and options after '--' are for --engine vllm; the native server "
            "takes --default-hd-num and serves on one device."
        )
    run_server(
        args.model,
        host=args.host,
        port=args.port,
        device=args.device,
        dtype=args.dtype,
        quantization=args.quantization,
        served_model_name=args.served_model_name,
        allow_image_urls=args.allow_image_urls,
        max_request_bytes=args.max_request_bytes,
        max_pixels=args.max_pixels,
        max_image_bytes=args.max_image_bytes,
        default_hd_num=args.default_hd_num,
        api_key=args.api_key,
        log_level=args.log_level,
        max_tokens_limit=args.max_tokens_limit,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
