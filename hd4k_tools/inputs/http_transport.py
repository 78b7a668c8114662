"""An httpx transport over an httpcore connection pool whose sockets obey a deadline.

Two places need to own the sockets of an HTTP call: URL fetches (``inputs/urlfetch.py``: connect only to
the addresses the SSRF check pinned, everything within the fetch's deadline) and the remote client
(``runtime/deadline_http.py``: every socket operation bounded by the call's deadline). Both use
:class:`DeadlineBackend` (one stream wrapper, one backend: optionally pinned addresses, a deadline read
from a callable) under :class:`CoreTransport`, which turns httpx requests into httpcore requests and back,
and httpcore's errors into the httpx errors callers expect.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import httpcore
import httpx

__all__ = ["CoreTransport", "DeadlineBackend", "bounded_timeout"]

#: Returns the deadline (``time.monotonic()`` based) that bounds every socket operation, or ``None``.
Deadline = Callable[[], float | None]


def bounded_timeout(timeout: float | None, deadline: float | None, expired: type[Exception]) -> float | None:
    """``timeout`` cut to the time left until ``deadline``; ``expired`` once it has passed."""
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the overall deadline passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A connection whose every read, write and TLS handshake gets only the time left until the deadline."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: Deadline) -> None:
        self._inner = inner
        self._deadline = deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, bounded_timeout(timeout, self._deadline(), httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, bounded_timeout(timeout, self._deadline(), httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.NetworkStream:
        left = bounded_timeout(timeout, self._deadline(), httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, left), self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's sync backend with every socket operation bounded by ``deadline()``. With ``addresses``
    (pinned), the host asked for is ignored and only those addresses are tried, in order; unix sockets are
    then refused."""

    def __init__(self, deadline: Deadline, addresses: Sequence[str] | None = None) -> None:
        self._deadline = deadline
        self._addresses = list(addresses) if addresses is not None else None
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        last_error: Exception | None = None
        for address in self._addresses if self._addresses is not None else [host]:
            left = bounded_timeout(timeout, self._deadline(), httpcore.ConnectTimeout)
            try:
                stream = self._inner.connect_tcp(address, port, left, local_address, socket_options)
            except httpcore.ConnectError as err:
                last_error = err
                continue
            return _DeadlineStream(stream, self._deadline)
        raise last_error or httpcore.ConnectError("no address to connect to")

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        if self._addresses is not None:
            raise httpcore.ConnectError("unix sockets are not used")
        left = bounded_timeout(timeout, self._deadline(), httpcore.ConnectTimeout)
        return _DeadlineStream(self._inner.connect_unix_socket(path, left, socket_options), self._deadline)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


# httpcore errors raised while sending, as the httpx errors callers expect.
_ERROR_MAP: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
)


class _CoreBody(httpx.SyncByteStream):
    """A response body read from httpcore, with its read errors as httpx errors."""

    def __init__(self, stream: Iterable[bytes]) -> None:
        self._stream = stream

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from self._stream
        except httpcore.TimeoutException as err:
            raise httpx.ReadTimeout(str(err)) from err
        except (httpcore.NetworkError, httpcore.ProtocolError) as err:
            raise httpx.ReadError(str(err)) from err

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close is not None:
            close()


class CoreTransport(httpx.BaseTransport):
    """An httpx transport whose connections go through ``network_backend``; ``pool_options`` are
    httpcore ``ConnectionPool`` options (connection limits). Retries are off: callers retry themselves."""

    def __init__(self, network_backend: httpcore.NetworkBackend, **pool_options: Any) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(), retries=0, network_backend=network_backend, **pool_options
        )

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        core_request = httpcore.Request(
            method=request.method,
            url=httpcore.URL(
                scheme=request.url.raw_scheme,
                host=request.url.raw_host,
                port=request.url.port,
                target=request.url.raw_path,
            ),
            headers=request.headers.raw,
            content=request.stream,  # type: ignore[arg-type]
            extensions=request.extensions,
        )
        try:
            core_response = self._pool.handle_request(core_request)
        except Exception as err:
            for core_error, httpx_error in _ERROR_MAP:
                if isinstance(err, core_error):
                    raise httpx_error(str(err), request=request) from err
            raise
        return httpx.Response(
            status_code=core_response.status,
            headers=core_response.headers,
            stream=_CoreBody(core_response.stream),  # type: ignore[arg-type]
            extensions=core_response.extensions,
        )

    def close(self) -> None:
        self._pool.close()
