"""Structured access logs and request metrics: an ASGI middleware that writes one JSON line per request to
the ``hd4k_tools.serve.access`` logger (method, path, status, duration, tokens) and counts it in the
app's :class:`~hd4k_tools.serve.metrics.ServerMetrics`.

A route reports the tokens of its answer by setting ``request.state.hd4k_usage`` (a dict); a streamed
answer is logged when its last byte is sent, so its duration and tokens are the whole stream's.

Every response carries ``x-request-id``: the client's own when it sent a sane one (at most
:data:`MAX_REQUEST_ID_CHARS` characters of letters, digits and ``-_.:/+=@``), a new one otherwise; the
access line logs the same id. An exception no handler answered becomes a 500 in OpenAI's shape here, so
that response has its id too (the traceback goes to the ``hd4k_tools.serve.app`` log).
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from hd4k_tools.serve.errors import internal_error
from hd4k_tools.serve.metrics import UNMATCHED_PATH, ServerMetrics

__all__ = ["ACCESS_LOGGER", "MAX_REQUEST_ID_CHARS", "REQUEST_ID_HEADER", "AccessLogMiddleware", "request_id"]

#: The logger of the access lines (one JSON object per line, at INFO).
ACCESS_LOGGER = "hd4k_tools.serve.access"
#: The header that names a request (echoed when the client sent a sane one, generated otherwise).
REQUEST_ID_HEADER = "x-request-id"
#: Longest client request id echoed; a longer one is replaced (it would bloat every log line).
MAX_REQUEST_ID_CHARS = 128
_SANE_ID = re.compile(rf"[A-Za-z0-9_.:/+=@-]{{1,{MAX_REQUEST_ID_CHARS}}}")
_app_logger = logging.getLogger("hd4k_tools.serve.app")


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The id of a request with these raw headers: the client's ``x-request-id`` when it is sane, else a
    new random one."""
    for name, value in headers:
        if name.lower() == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _SANE_ID.fullmatch(text):
                return text
            break
    return uuid.uuid4().hex


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AccessLogMiddleware:
    """Wraps an ASGI app: times each HTTP request, logs it as JSON, records it in ``metrics``."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics
        self.logger = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        rid = request_id(list(scope.get("headers") or ()))
        state["request_id"] = rid
        status = [500]
        started = [False]

        async def send_and_watch(message: Message) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 500))
                started[0] = True
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != REQUEST_ID_HEADER.encode()]
                message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except Exception as exc:
            if started[0]:
                raise  # mid-response: nothing left to answer with
            _app_logger.error("unhandled error on %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
            await _internal_error(send_and_watch)
        finally:
            self._record(scope, status[0], time.perf_counter() - start)

    def _record(self, scope: Scope, status: int, duration_s: float) -> None:
        # Labels stay bounded: the route template (not the path), a known method or "other" (metrics).
        method = str(scope.get("method", ""))
        route = scope.get("route")
        path = getattr(route, "path", None) or UNMATCHED_PATH  # the route template: bounded label values
        self.metrics.record_request(method, path, status, duration_s)
        if not self.logger.isEnabledFor(logging.INFO):
            return
        state = scope.get("state") or {}
        line: dict[str, Any] = {
            "event": "request",
            "request_id": state.get("request_id"),
            "method": method,
            "path": str(scope.get("path", "")),
            "status": status,
            "duration_ms": round(duration_s * 1000, 1),
        }
        client = scope.get("client")
        if client:
            line["client"] = f"{client[0]}:{client[1]}"
        usage = state.get("hd4k_usage")
        if isinstance(usage, dict):
            line.update(usage)
        self.logger.info(json.dumps(line, ensure_ascii=False))


async def _internal_error(send: Send) -> None:
    """A 500 in OpenAI's shape (the details are in the server log)."""
    body = json.dumps(internal_error().body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 500, "headers": headers})
    await send({"type": "http.response.body", "body": body})
