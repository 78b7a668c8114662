"""An httpx transport whose every socket operation is bounded by the *calling* request's deadline.

httpx timeouts bound each read, not a call: a server that drips one byte per second never trips a
3-second read timeout. :class:`DeadlineTransport` gives every connect, TLS handshake, read and write only
the time left until the deadline set with :func:`call_deadline` (a context variable, so each thread or
task has its own), and fails with a timeout once it has passed. Without a deadline it behaves like a
plain httpx transport.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore

from hd4k_tools.inputs.http_transport import CoreTransport

__all__ = ["DeadlineTransport", "call_deadline", "time_left"]

_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("hd4k_http_deadline", default=None)


@contextmanager
def call_deadline(seconds: float) -> Iterator[float]:
    """Bound every socket operation of :class:`DeadlineTransport` in this context by ``seconds`` from
    now, all together; yields the deadline (``time.monotonic()`` based)."""
    deadline = time.monotonic() + seconds
    token = _DEADLINE.set(deadline)
    try:
        yield deadline
    finally:
        _DEADLINE.reset(token)


def time_left() -> float | None:
    """Seconds left until the current deadline (may be negative), or ``None`` without one."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def _bounded(timeout: float | None, expired: type[Exception]) -> float | None:
    left = time_left()
    if left is None:
        return timeout
    if left <= 0:
        raise expired("the call's overall deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        left = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, left))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _DeadlineBackend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        left = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_tcp(host, port, left, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        left = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, left, socket_options))

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class DeadlineTransport(CoreTransport):
    """An httpx transport over an httpcore connection pool whose sockets obey :func:`call_deadline`."""

    def __init__(self, *, max_connections: int = 10, max_keepalive_connections: int = 10) -> None:
        super().__init__(
            _DeadlineBackend(),
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
        )
