"""An httpx transport over an httpcore connection pool with a network backend of our own.

Two places need to own the sockets of an HTTP call: URL fetches (``inputs/urlfetch.py``: connect only to
the addresses the SSRF check pinned) and the remote client (``runtime/deadline_http.py``: every socket
operation bounded by the call's deadline). Both build on :class:`CoreTransport`, which turns httpx
requests into httpcore requests and back, and httpcore's errors into the httpx errors callers expect.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx

__all__ = ["CoreTransport"]

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
