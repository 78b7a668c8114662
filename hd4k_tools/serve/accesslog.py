"""Structured access logs and request metrics: an ASGI middleware that writes one JSON line per request to
the ``hd4k_tools.serve.access`` logger (method, path, status, duration, tokens) and counts it in the
app's :class:`~hd4k_tools.serve.metrics.ServerMetrics`.

A route reports the tokens of its answer by setting ``request.state.hd4k_usage`` (a dict); a streamed
answer is logged when its last byte is sent, so its duration and tokens are the whole stream's.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from hd4k_tools.serve.metrics import ServerMetrics

__all__ = ["ACCESS_LOGGER", "AccessLogMiddleware"]

#: The logger of the access lines (one JSON object per line, at INFO).
ACCESS_LOGGER = "hd4k_tools.serve.access"

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
        state.setdefault("request_id", uuid.uuid4().hex[:16])
        status = [500]

        async def send_and_watch(message: Message) -> None:
            if message.get("type") == "http.response.start":
                status[0] = int(message.get("status", 500))
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self._record(scope, status[0], time.perf_counter() - start)

    def _record(self, scope: Scope, status: int, duration_s: float) -> None:
        method = str(scope.get("method", ""))
        route = scope.get("route")
        path = getattr(route, "path", None) or "(unmatched)"  # the route template: bounded label values
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
