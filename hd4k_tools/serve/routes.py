"""The FastAPI routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``, ``GET /metrics``.

Real FastAPI routes, so ``/docs`` and ``/openapi.json`` describe the API. The chat handler reads the raw
body itself (the size limit is enforced while reading, and every error is answered in OpenAI's shape); its
request schema is declared for the OpenAPI document (:func:`openapi_components`). Each app keeps its state
in ``app.state.hd4k`` (:class:`ServerState`): the handlers are plain functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from hd4k_tools.errors import CancelledError, HD4KError
from hd4k_tools.runtime.runner import RunnerResult, TextStream
from hd4k_tools.runtime.stops import StopFilter
from hd4k_tools.serve import limits, responses
from hd4k_tools.serve.chat import Prepared, ServeSettings, prepare
from hd4k_tools.serve.errors import APIError, api_error_from, internal_error
from hd4k_tools.serve.generate import Answer, answer
from hd4k_tools.serve.metrics import CONTENT_TYPE, ServerMetrics, cache_stats
from hd4k_tools.serve.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ErrorBody,
    Health,
    ModelList,
)

__all__ = ["ServerState", "openapi_components", "router"]

logger = logging.getLogger("hd4k_tools.serve.app")

# Past the body limit we still read (and discard) up to this many extra bytes, so that a client that is
# still uploading reads our 413 instead of a connection reset; beyond it we answer and let the
# connection drop.
_DRAIN_LIMIT = 8 * 2**20
_DISCONNECT_POLL_S = 0.25

T = TypeVar("T")


@dataclass
class ServerState:
    """What the routes of one app share: its settings, metrics and start time."""

    settings: ServeSettings
    metrics: ServerMetrics
    started: int = field(default_factory=lambda: int(time.time()))
    started_monotonic: float = field(default_factory=time.monotonic)


def _state(request: Request) -> ServerState:
    return request.app.state.hd4k


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorBody, "description": "An error in OpenAI's shape."} for code in codes}


router = APIRouter()


# ----------------------------------------------------------------------------------------------------
# Request plumbing
# ----------------------------------------------------------------------------------------------------
def check_auth(request: Request) -> None:
    """With an API key configured, ``Authorization: Bearer <key>`` is required (401 otherwise)."""
    key = _state(request).settings.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    if not hmac.compare_digest(header.encode(), f"Bearer {key}".encode()):
        raise APIError(
            401,
            "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
            type="authentication_error",
            code="invalid_api_key",
        )


async def read_body(request: Request) -> bytes:
    """The body, at most ``max_request_bytes`` (413 beyond, whatever Content-Length claims), received within
    ``body_timeout`` (408) while at most ``max_concurrent_uploads`` bodies are received at once (503)."""
    settings = _state(request).settings
    try:
        return await limits.read_body(
            request,
            max_bytes=settings.max_request_bytes,
            drain_bytes=_DRAIN_LIMIT,
            timeout=settings.body_timeout,
            slots=settings.upload_slots,
        )
    except limits.LimitExceeded as err:
        raise APIError(err.status_code, str(err), code=err.code) from None


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


def _report(request: Request, result: RunnerResult | None, elapsed_s: float | None = None) -> None:
    """Tokens for the access log; tokens, speed (and, for whole answers, time to first token) for metrics."""
    if result is None:
        return
    _usage_for_log(request, result)
    u = result.usage
    metrics = _state(request).metrics
    if elapsed_s is not None:
        metrics.first_token(max(0.0, elapsed_s - result.timings.decode_s))
    metrics.finished(u, result.timings)


# ----------------------------------------------------------------------------------------------------
# Chat completions
# ----------------------------------------------------------------------------------------------------
async def _answer_whole(request: Request, prep: Prepared, cid: str, created: int) -> JSONResponse:
    state = _state(request)
    cancel = threading.Event()
    start = time.perf_counter()
    with state.metrics.generation():
        try:
            done: Answer = await in_thread_until_disconnect(
                request, lambda: answer(state.settings.runner, prep, cancel), cancel
            )
        except BaseException:
            state.metrics.dequeued()
            raise
    if done.attempts == 2:
        state.metrics.structured_retry()
    _report(request, done.result, time.perf_counter() - start)
    body = responses.completion_body(
        cid,
        created,
        state.settings.model_name,
        done.text,
        responses.finish_reason(done.result, done.stopped),
        done.result,
        prep.request,
        structured_attempts=done.attempts,
    )
    return JSONResponse(body)


async def _first_or_keepalive(task: asyncio.Task[Any], interval: float) -> AsyncIterator[bytes]:
    """Keep-alive comments every ``interval`` seconds until ``task`` is done."""
    while not task.done():
        finished, _ = await asyncio.wait({task}, timeout=interval)
        if not finished:
            yield responses.KEEPALIVE


async def _answer_stream(request: Request, prep: Prepared, cid: str, created: int) -> Response:
    """A streamed answer. The first delta (or, for structured output, the whole answer) is awaited before
    the status line for up to ``sse_keepalive_s``, so that early errors (context overflow) keep their status
    code; a longer prefill starts the 200 stream and sends keep-alive comments until the first token."""
    state = _state(request)
    settings, metrics = state.settings, state.metrics
    cancel = threading.Event()
    done = object()
    start = time.perf_counter()
    stream: TextStream | None = None
    if prep.structured is None:
        stream = await anyio.to_thread.run_sync(lambda: settings.runner.stream(prep.request, cancel=cancel))
        live = stream

        def first_call() -> Any:
            return next(live, done)
    else:

        def first_call() -> Any:
            return answer(settings.runner, prep, cancel)

    metrics.start_generation()
    first_task = asyncio.ensure_future(in_thread_until_disconnect(request, first_call, cancel))
    await asyncio.wait({first_task}, timeout=settings.sse_keepalive_s)
    if first_task.done() and first_task.exception() is not None:
        metrics.dequeued()
        metrics.end_generation()
        if stream is not None:
            await anyio.to_thread.run_sync(stream.close)
        first_task.result()  # raises: answered with its status code by the caller
    model = settings.model_name

    async def events() -> AsyncIterator[bytes]:
        filt = StopFilter(prep.stops)
        finished = False
        first_seen = False
        try:
            yield responses.chunk(cid, created, model, {"role": "assistant", "content": ""}, None)
            async for comment in _first_or_keepalive(first_task, settings.sse_keepalive_s):
                yield comment
            first = first_task.result()
            metrics.first_token(time.perf_counter() - start)
            first_seen = True
            if isinstance(first, Answer):  # structured output: the whole validated JSON in one delta
                if first.attempts == 2:
                    metrics.structured_retry()
                result: RunnerResult | None = first.result
                yield responses.chunk(
                    cid, created, model, {"content": first.text}, None, token_logprobs=first.result.logprobs
                )
                stopped = False
                attempts: int | None = first.attempts
            else:
                assert stream is not None
                delta = first
                sent = 0  # logprob entries already sent (logprobs: true)
                while delta is not done:
                    out = filt.feed(delta)
                    if out:
                        entries = stream.logprobs[sent:] if prep.logprobs else None
                        sent += len(entries or ())
                        yield responses.chunk(cid, created, model, {"content": out}, None, token_logprobs=entries)
                    if filt.stopped:
                        break
                    delta = await anyio.to_thread.run_sync(lambda: next(stream, done))
                if filt.stopped:
                    cancel.set()
                tail = filt.finish()
                await anyio.to_thread.run_sync(stream.close)
                rest = stream.logprobs[sent:] if prep.logprobs and not filt.stopped else None
                if tail or rest:
                    yield responses.chunk(cid, created, model, {"content": tail}, None, token_logprobs=rest)
                result = stream.result
                stopped = filt.stopped
                attempts = None
            _usage_for_log(request, result)
            if result is not None:
                metrics.finished(result.usage, result.timings)
            yield responses.chunk(
                cid,
                created,
                model,
                {},
                responses.finish_reason(result, stopped),
                hd4k=responses.extension(result, prep.request, structured_attempts=attempts),
            )
            if prep.include_usage:
                yield responses.sse(
                    {
                        "id": cid,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": responses.usage(result),
                    }
                )
            yield b"data: [DONE]\n\n"
            finished = True
        except Exception as err:
            # The status line is already sent: report the error as an event, the way OpenAI does.
            api_err = api_error_from(err)
            if isinstance(err, CancelledError):
                api_err = APIError(499, "The request was cancelled.", code="cancelled")
            if api_err.status_code >= 500:
                logger.error("error while streaming %s", cid, exc_info=err)
            yield responses.sse(api_err.body())
            yield b"data: [DONE]\n\n"
        finally:
            if not finished:
                # Client gone (task cancelled) or an error: stop the generation, release the worker.
                cancel.set()
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(BaseException):
                    await first_task
                if stream is not None:
                    await anyio.to_thread.run_sync(stream.close)
            if not first_seen:  # an error or a disconnect before the first token: out of the queue too
                metrics.dequeued()
            metrics.end_generation()

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _usage_for_log(request: Request, result: RunnerResult | None) -> None:
    if result is not None:
        u = result.usage
        request.state.hd4k_usage = {
            "prompt_tokens": u.prompt_tokens,
            "image_tokens": u.image_tokens,
            "completion_tokens": u.completion_tokens,
        }


@router.post(
    "/v1/chat/completions",
    summary="Chat completion (OpenAI-compatible, with images)",
    response_model=ChatCompletion,
    responses={
        200: {
            "description": "The answer; with ``stream: true`` a text/event-stream of ChatCompletionChunk events.",
            "content": {"text/event-stream": {"schema": {"$ref": "#/components/schemas/ChatCompletionChunk"}}},
        },
        **_error_responses(400, 401, 413, 422, 500),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
        }
    },
)
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions with image parts (data URLs; http(s) when the server allows them), streaming,
    ``response_format`` (``json_object`` / ``json_schema``, by constrained decoding and validation)
    and the hd4k extensions ``hd_num``, ``top_k``, ``repetition_penalty``, ``num_beams``, ``layout``.
    ``tools`` are refused (400 ``tools_not_supported``): the model has no tool calling."""
    state = _state(request)
    try:
        check_auth(request)
        raw = await read_body(request)
        prep = await anyio.to_thread.run_sync(lambda: prepare(raw, state.settings))
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if prep.stream:
            return await _answer_stream(request, prep, cid, created)
        return await _answer_whole(request, prep, cid, created)
    except APIError as err:
        return error_response(err)
    except CancelledError:
        return error_response(APIError(499, "The request was cancelled.", code="cancelled"))
    except HD4KError as err:
        api_err = api_error_from(err)
        if api_err.status_code >= 500:
            logger.error("error on /v1/chat/completions", exc_info=err)
        return error_response(api_err)
    except Exception as err:
        logger.error("unhandled error on /v1/chat/completions", exc_info=err)
        return error_response(internal_error())


def error_response(err: APIError) -> JSONResponse:
    """``err`` as a JSON response in OpenAI's shape."""
    return JSONResponse(err.body(), status_code=err.status_code)


# ----------------------------------------------------------------------------------------------------
# Models, health, metrics
# ----------------------------------------------------------------------------------------------------
@router.get("/v1/models", summary="The served model", response_model=ModelList, responses=_error_responses(401))
async def list_models(request: Request) -> Response:
    """The one model this server serves (its id is ``--served-model-name``, by default the checkpoint's
    folder name)."""
    try:
        check_auth(request)
    except APIError as err:
        return error_response(err)
    state = _state(request)
    return JSONResponse(
        {
            "object": "list",
            "data": [
                {
                    "id": state.settings.model_name,
                    "object": "model",
                    "created": state.started,
                    "owned_by": "hd4k-tools",
                    "context_length": state.settings.runner.context_length,
                }
            ],
        }
    )


@router.get("/health", summary="Liveness, and with ?verbose=true state and cache statistics", response_model=Health)
async def health(request: Request, verbose: bool = False) -> Response:
    """``{"status": "ok", "model": ...}``: cheap, for load balancers and start-up probes. With
    ``verbose=true`` also ``state`` (``idle``/``busy``), ``queue_depth``, ``active_requests``, ``uptime_s``,
    ``context_length`` and ``caches`` (hits, misses, entries, bytes of the vision-embedding and prefix KV
    caches)."""
    state = _state(request)
    body: dict[str, Any] = {"status": "ok", "model": state.settings.model_name}
    if verbose:
        metrics = state.metrics
        body.update(
            state="busy" if metrics.in_flight else "idle",
            queue_depth=metrics.queue_depth,
            active_requests=metrics.in_flight,
            uptime_s=round(time.monotonic() - state.started_monotonic, 3),
            context_length=state.settings.runner.context_length,
            caches=cache_stats(state.settings.runner),
        )
    return JSONResponse(body)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text exposition format."}},
)
async def metrics(request: Request) -> Response:
    """Requests, queue depth, time to first token, decode tokens/s, token counts and cache hit rates in
    the Prometheus text format. Open like ``/health`` (no API key)."""
    state = _state(request)
    return Response(state.metrics.render(state.settings.runner), media_type=CONTENT_TYPE)


def openapi_components() -> dict[str, Any]:
    """JSON schemas of the request and streamed-chunk models under ``#/components/schemas`` (the chat
    route reads its body itself, so FastAPI does not register them)."""
    _, top = models_json_schema(
        [(ChatCompletionRequest, "validation"), (ChatCompletionChunk, "serialization")],
        ref_template="#/components/schemas/{model}",
    )
    return dict(top.get("$defs", {}))
