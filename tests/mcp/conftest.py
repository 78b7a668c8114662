"""The ``hd4k mcp`` server as a real subprocess, driven by the MCP SDK's own client.

One server process per transport per module: stdio (``python -m hd4k_tools.cli mcp``, the ``hd4k mcp``
entry point, spawned by the SDK's stdio client; initialize handshake) and streamable HTTP
(``python -m hd4k_tools.mcp`` on a free 127.0.0.1 port; the protocol the client negotiates, 2026-07-28).
The async client runs in an anyio blocking portal, so the tests are plain functions and a call can be
started, watched and cancelled from the test thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("mcp", reason="the MCP tests need the 'mcp' extra")
from anyio.from_thread import start_blocking_portal
from mcp import Client
from mcp_support import (
    CALL_TIMEOUT_S,
    McpConnection,
    start_http_server,
    stdio_transport,
    stop,
    write_pdf,
)


@pytest.fixture(scope="session")
def mcp_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The allowed folder: a photo, a chart, 3- and 20-page PDFs and an image over the pixel limit."""
    base = tmp_path_factory.mktemp("mcp")
    root = base / "allowed"
    root.mkdir()
    Image.new("RGB", (400, 300), (200, 30, 60)).save(root / "photo.png")
    Image.new("RGB", (640, 480), (250, 250, 250)).save(root / "chart.png")
    write_pdf(root / "report.pdf", 3)
    write_pdf(root / "long.pdf", 20)
    Image.new("1", (1200, 1000)).save(root / "huge.png")  # 1.2 MP > MAX_PIXELS, a few KB on disk
    (base / "secret.png").write_bytes((root / "photo.png").read_bytes())  # outside the root
    return root


@pytest.fixture(scope="module", params=["stdio", "streamable-http"])
def mcp_server(request: pytest.FixtureRequest, tiny_checkpoint: Path, mcp_root: Path, tmp_path_factory) -> Iterator:
    """A connected :class:`McpConnection`, one server process per transport for the module."""
    transport = request.param
    with ExitStack() as stack:
        if transport == "stdio":
            log_path = tmp_path_factory.mktemp("mcp-log") / "stderr.txt"
            errlog = stack.enter_context(log_path.open("w"))
            # The initialize handshake (protocol <= 2025-11-25), as today's desktop clients speak it: progress
            # tokens and notifications/cancelled. HTTP below negotiates the 2026-07-28 protocol, where a
            # cancellation closes the request's stream.
            transport_cm = stdio_transport(tiny_checkpoint, mcp_root, errlog)
            client = Client(transport_cm, read_timeout_seconds=CALL_TIMEOUT_S, mode="legacy")

            def log() -> str:
                return log_path.read_text()
        else:
            lines: list[str] = []
            proc, url = start_http_server(tiny_checkpoint, mcp_root, lines)
            stack.callback(stop, proc)
            client = Client(url, read_timeout_seconds=CALL_TIMEOUT_S)

            def log() -> str:
                return "".join(lines)

        portal = stack.enter_context(start_blocking_portal())
        connected = stack.enter_context(portal.wrap_async_context_manager(client))
        yield McpConnection(portal, connected, transport, log)
