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
from collections.abc import Iterator
from contextlib import contextmanager

from hd4k_tools.inputs.http_transport import CoreTransport, DeadlineBackend

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


class DeadlineTransport(CoreTransport):
    """An httpx transport over an httpcore connection pool whose sockets obey :func:`call_deadline`."""

    def __init__(self, *, max_connections: int = 10, max_keepalive_connections: int = 10) -> None:
        super().__init__(
            DeadlineBackend(_DEADLINE.get),
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive_connections,
        )
