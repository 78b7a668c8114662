"""Binding the server's address before anything slow starts: a port in use is one line at once, not a
traceback after minutes of loading (the native server and ``--engine vllm`` both use it)."""

from __future__ import annotations

import errno
import socket

from hd4k_tools.errors import HD4KError

__all__ = ["ServeError", "bind_port"]


class ServeError(HD4KError):
    """The server cannot start: the address is taken or cannot be bound, or uvicorn failed at startup."""


def bind_port(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)``, not yet listening (uvicorn starts listening on it).

    Binding here, before the model loads, turns a port already in use into an immediate one-line error
    instead of uvicorn's log lines after minutes of loading; handing the bound socket to uvicorn leaves
    no window for another process to take the port in between.

    Raises:
        ServeError: the port is in use, or the address cannot be bound (unknown host, privileged port).
    """
    # Same choices as uvicorn's own binding: IPv6 for literal IPv6 hosts, SO_REUSEADDR so a restart does
    # not wait for TIME_WAIT (on Linux it still refuses a port another socket listens on).
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise ServeError(
                f"port {port} on {host} is already in use; pass --port with a free port (e.g. --port "
                f"{port + 1 if port < 65535 else 8000}) or stop the process that holds it"
            ) from None
        reason = err.strerror or str(err)
        if err.errno == errno.EACCES:
            reason += " (ports below 1024 need privileges; pass --port 8000 or higher)"
        raise ServeError(f"cannot listen on {host}:{port}: {reason}; check --host and --port") from None
    except BaseException:
        sock.close()
        raise
    return sock
