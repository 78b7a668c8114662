"""The FastAPI routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics``.

Real FastAPI routes, so ``/docs`` and ``/openapi.json`` describe the API. The chat handler reads the raw
body itself (the size limit is enforced while reading, and every error is answered in OpenAI's shape); its
request schema is declared for the OpenAPI document (:func:`openapi_components`). Each app keeps its state
in ``app.state.hd4k`` (:class:`ServerState`): the handlers are plain functions.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
from fastapi import APIRouter
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from hd4k_tools.errors import CancelledError, HD4KError
from hd4k_tools.runtime.runner import RunnerResult, TextStream
from hd4k_tools.runtime.stops import StopFilter
from hd4k_tools.serve import limits, responses
from hd4k_tools.serve.chat import Prepared, ServeSettings, check_model, prepare
from hd4k_tools.serve.completions import completion_as_chat, completion_body, completion_events
from hd4k_tools.serve.errors import APIError, api_error_from, internal_error
from hd4k_tools.serve.generate import Answer, answer
from hd4k_tools.serve.metrics import CONTENT_TYPE, ServerMetrics, cache_stats
from hd4k_tools.serve.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorBody,
    Health,
    ModelCard,
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


def _completion_route(
    summary: str, whole: type[BaseModel], chunk: str, request_schema: str, errors: tuple[int, ...]
) -> dict[str, Any]:
    """The OpenAPI description of a completion route: a JSON ``whole`` answer, or with ``stream: true`` a
    text/event-stream of ``chunk`` events, a required ``request_schema`` body and ``errors`` in OpenAI's shape
    (the route reads its body itself, so FastAPI cannot infer these)."""
    stream = {"text/event-stream": {"schema": {"$ref": f"#/components/schemas/{chunk}"}}}
    body = {"application/json": {"schema": {"$ref": f"#/components/schemas/{request_schema}"}}}
    return {
        "summary": summary,
        "response_model": whole,
        "responses": {
            200: {
                "description": f"The answer; with ``stream: true`` a text/event-stream of {chunk} events.",
                "content": stream,
            },
            **_error_responses(*errors),
        },
        "openapi_extra": {"requestBody": {"required": True, "content": body}},
    }


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
        regions=prep.regions,
    )
    return JSONResponse(body)


async def _first_or_keepalive(task: asyncio.Task[Any], interval: float) -> AsyncIterator[bytes]:
    """Keep-alive comments every ``interval`` seconds until ``task`` is done."""
    while not task.done():
        finished, _ = await asyncio.wait({task}, timeout=interval)
        if not finished:
            yield responses.KEEPALIVE


@dataclass
class _StreamRun:
    """One streamed answer in flight: the engine's text stream (None for structured output, answered whole),
    the task computing its first delta, and what the stream ended with."""

    stream: TextStream | None
    first_task: asyncio.Future[Any]
    cancel: threading.Event
    result: RunnerResult | None = None
    stopped: bool = False
    attempts: int | None = None


_DONE = object()  # the end of a text stream (next(stream, _DONE))


async def _start_stream(
    request: Request, prep: Prepared, settings: ServeSettings, metrics: ServerMetrics
) -> _StreamRun:
    """Start the generation and the wait for its first delta (for structured output: the whole answer)."""
    cancel = threading.Event()
    stream: TextStream | None = None
    if prep.structured is None:
        stream = await anyio.to_thread.run_sync(lambda: settings.runner.stream(prep.request, cancel=cancel))
        live = stream

        def first_call() -> Any:
            return next(live, _DONE)
    else:

        def first_call() -> Any:
            return answer(settings.runner, prep, cancel)

    metrics.start_generation()
    first_task = asyncio.ensure_future(in_thread_until_disconnect(request, first_call, cancel))
    return _StreamRun(stream, first_task, cancel)


async def _text_chunks(
    run: _StreamRun, first: Any, prep: Prepared, chunk: Callable[..., bytes]
) -> AsyncIterator[bytes]:
    """The answer's chunks from ``first`` on: the whole structured answer in one delta, or the stream's deltas
    cut at the stop strings; records the result, whether a stop string ended it, and the attempts."""
    if isinstance(first, Answer):  # structured output: the whole validated JSON in one delta
        run.result, run.attempts = first.result, first.attempts
        yield chunk({"content": first.text}, None, token_logprobs=first.result.logprobs)
        return
    stream = run.stream
    assert stream is not None
    filt = StopFilter(prep.stops)
    delta = first
    sent = 0  # logprob entries already sent (logprobs: true)
    while delta is not _DONE:
        out = filt.feed(delta)
        if out:
            entries = stream.logprobs[sent:] if prep.logprobs else None
            sent += len(entries or ())
            yield chunk({"content": out}, None, token_logprobs=entries)
        if filt.stopped:
            break
        delta = await anyio.to_thread.run_sync(lambda: next(stream, _DONE))
    if filt.stopped:
        run.cancel.set()
    tail = filt.finish()
    await anyio.to_thread.run_sync(stream.close)
    rest = stream.logprobs[sent:] if prep.logprobs and not filt.stopped else None
    if tail or rest:
        yield chunk({"content": tail}, None, token_logprobs=rest)
    run.result, run.stopped = stream.result, filt.stopped


def _closing_chunks(run: _StreamRun, prep: Prepared, cid: str, created: int, model: str) -> list[bytes]:
    """The finish chunk (with the hd4k extension), the usage chunk when asked for, and ``[DONE]``."""
    result = run.result
    out = [
        responses.chunk(
            cid,
            created,
            model,
            {},
            responses.finish_reason(result, run.stopped),
            hd4k=responses.extension(result, prep.request, structured_attempts=run.attempts, regions=prep.regions),
        )
    ]
    if prep.include_usage:
        usage = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": []}
        out.append(responses.sse({**usage, "usage": responses.usage(result)}))
    out.append(b"data: [DONE]\n\n")
    return out


def _error_chunks(err: Exception, cid: str) -> list[bytes]:
    """The status line is already sent: an error is reported as an event, the way OpenAI does."""
    api_err = api_error_from(err)
    if isinstance(err, CancelledError):
        api_err = APIError(499, "The request was cancelled.", code="cancelled")
    if api_err.status_code >= 500:
        logger.error("error while streaming %s", cid, exc_info=err)
    return [responses.sse(api_err.body()), b"data: [DONE]\n\n"]


async def _raise_early_error(run: _StreamRun, metrics: ServerMetrics) -> None:
    """Re-raise an error the generation ended with before the status line, after releasing its slot."""
    if run.first_task.done() and run.first_task.exception() is not None:
        metrics.dequeued()
        metrics.end_generation()
        if run.stream is not None:
            await anyio.to_thread.run_sync(run.stream.close)
        run.first_task.result()  # raises: answered with its status code by the caller


async def _answer_stream(request: Request, prep: Prepared, cid: str, created: int) -> Response:
    """A streamed answer. The first delta (or, for structured output, the whole answer) is awaited before
    the status line for up to ``sse_keepalive_s``, so that early errors (context overflow) keep their status
    code; a longer prefill starts the 200 stream and sends keep-alive comments until the first token."""
    state = _state(request)
    settings, metrics = state.settings, state.metrics
    start = time.perf_counter()
    run = await _start_stream(request, prep, settings, metrics)
    await asyncio.wait({run.first_task}, timeout=settings.sse_keepalive_s)
    await _raise_early_error(run, metrics)
    model = settings.model_name

    def chunk(delta: dict[str, Any], finish: str | None, **extra: Any) -> bytes:
        return responses.chunk(cid, created, model, delta, finish, **extra)

    async def events() -> AsyncIterator[bytes]:
        finished = False
        first_seen = False
        try:
            yield chunk({"role": "assistant", "content": ""}, None)
            async for comment in _first_or_keepalive(run.first_task, settings.sse_keepalive_s):
                yield comment
            first = run.first_task.result()
            metrics.first_token(time.perf_counter() - start)
            first_seen = True
            if isinstance(first, Answer) and first.attempts == 2:
                metrics.structured_retry()
            async for piece in _text_chunks(run, first, prep, chunk):
                yield piece
            _usage_for_log(request, run.result)
            if run.result is not None:
                metrics.finished(run.result.usage, run.result.timings)
            for piece in _closing_chunks(run, prep, cid, created, model):
                yield piece
            finished = True
        except Exception as err:
            for piece in _error_chunks(err, cid):
                yield piece
        finally:
            if not finished:
                # Client gone (task cancelled) or an error: stop the generation, release the worker.
                run.cancel.set()
            with anyio.CancelScope(shield=True):
                with contextlib.suppress(BaseException):
                    await run.first_task
                if run.stream is not None:
                    await anyio.to_thread.run_sync(run.stream.close)
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
    **_completion_route(
        "Chat completion (OpenAI-compatible, with images)",
        ChatCompletion,
        "ChatCompletionChunk",
        "ChatCompletionRequest",
        (400, 401, 413, 422, 500),
    ),
)
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions with image parts (data URLs; http(s) when the server allows them), streaming,
    ``response_format`` (``json_object`` / ``json_schema``, by constrained decoding and validation)
    and the hd4k extensions ``hd_num``, ``top_k``, ``repetition_penalty``, ``num_beams``, ``layout``.
    ``tools`` are refused (400 ``tools_not_supported``): the model has no tool calling."""
    try:
        prep = await _prepared(request)
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if prep.stream:
            return await _answer_stream(request, prep, cid, created)
        return await _answer_whole(request, prep, cid, created)
    except Exception as err:
        return error_response(_api_error(err, "/v1/chat/completions"))


async def _prepared(request: Request, convert: Callable[[bytes], bytes] | None = None) -> Prepared:
    """A completion route's request checked (API key), read and validated off the event loop; ``convert``
    first turns the body into a chat request (``/v1/completions``)."""
    settings = _state(request).settings
    check_auth(request)
    raw = await read_body(request)
    return await anyio.to_thread.run_sync(lambda: prepare(convert(raw) if convert else raw, settings))


def _api_error(err: Exception, where: str) -> APIError:
    """What a completion route answers for ``err``: its own status for client errors, 499 for a cancel,
    a generic 500 (details in the log) for bugs."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, CancelledError):
        return APIError(499, "The request was cancelled.", code="cancelled")
    if isinstance(err, HD4KError):
        api_err = api_error_from(err)
        if api_err.status_code >= 500:
            logger.error("error on %s", where, exc_info=err)
        return api_err
    logger.error("unhandled error on %s", where, exc_info=err)
    return internal_error()


@router.post(
    "/v1/completions",
    **_completion_route(
        "Text completion (OpenAI-compatible; the prompt is answered as one user turn)",
        Completion,
        "Completion",
        "CompletionRequest",
        (400, 401, 404, 413, 500),
    ),
)
async def completions(request: Request) -> Response:
    """OpenAI text completions (what LlamaIndex ``OpenAILike`` calls by default): one text ``prompt``,
    answered by the model as one user turn of its conversation template, whole or streamed. Every chat
    field (``max_tokens``, ``temperature``, ``stop``, ``stream``, the hd4k extensions) means the same as on
    ``/v1/chat/completions``; images go there, as ``image_url`` parts. ``echo``, ``suffix``, ``best_of``
    > 1 and ``logprobs`` are refused with a 400."""
    try:
        prep = await _prepared(request, completion_as_chat)
        cid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if prep.stream:
            streamed = await _answer_stream(request, prep, cid, created)
            assert isinstance(streamed, StreamingResponse)
            streamed.body_iterator = completion_events(streamed.body_iterator)
            return streamed
        whole = await _answer_whole(request, prep, cid, created)
        return JSONResponse(completion_body(json.loads(whole.body)))
    except Exception as err:
        return error_response(_api_error(err, "/v1/completions"))


def error_response(err: APIError) -> JSONResponse:
    """``err`` as a JSON response in OpenAI's shape."""
    return JSONResponse(err.body(), status_code=err.status_code)


# ----------------------------------------------------------------------------------------------------
# Models, health, metrics
# ----------------------------------------------------------------------------------------------------
def _model_card(state: ServerState, name: str) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": state.started,
        "owned_by": "hd4k-tools",
        "context_length": state.settings.runner.context_length,
    }


@router.get("/v1/models", summary="The served model", response_model=ModelList, responses=_error_responses(401))
async def list_models(request: Request) -> Response:
    """The model this server serves: its id (``--served-model-name``, by default the checkpoint's folder
    name) first, then the other names a request's ``model`` may use (by default also the ``--model``
    argument as given, which is vLLM's default name)."""
    try:
        check_auth(request)
    except APIError as err:
        return error_response(err)
    state = _state(request)
    return JSONResponse({"object": "list", "data": [_model_card(state, n) for n in state.settings.model_names]})


@router.get(
    "/v1/models/{model_id:path}",
    summary="One served model (OpenAI's models.retrieve)",
    response_model=ModelCard,
    responses=_error_responses(401, 404),
)
async def retrieve_model(request: Request, model_id: str) -> Response:
    """The card of ``model_id`` when it is one of the names ``/v1/models`` lists; 404 ``model_not_found``
    otherwise."""
    try:
        check_auth(request)
        check_model(model_id, _state(request).settings)
    except APIError as err:
        return error_response(err)
    return JSONResponse(_model_card(_state(request), model_id))


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
        [
            (ChatCompletionRequest, "validation"),
            (CompletionRequest, "validation"),
            (ChatCompletionChunk, "serialization"),
        ],
        ref_template="#/components/schemas/{model}",
    )
    return dict(top.get("$defs", {}))
