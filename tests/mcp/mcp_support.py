"""Helpers of the MCP end-to-end tests: the server subprocesses and a synchronous client handle."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from anyio.from_thread import BlockingPortal
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_types import CallToolResult
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 120
CALL_TIMEOUT_S = 120
MAX_PIXELS = 1_000_000
MAX_IMAGE_BYTES = 1_000_000
# Options every test server gets: the tiny model on CPU, short answers, a pixel limit a small file can break.
SERVER_OPTIONS = [
    "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8", "--max-pixels", str(MAX_PIXELS),
    "--max-image-bytes", str(MAX_IMAGE_BYTES),
    "--allow-urls", "--thumbnails", "--log-level", "info",
]  # fmt: skip
PDF_PAGE_SIZE = (200, 280)  # points at 72 dpi; 556x778 px once rendered at 200 dpi


def environment() -> dict[str, str]:
    keep = ("PATH", "HOME", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR", "LANG")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HD4K_NO_PROGRESS="1", PYTHONUNBUFFERED="1")
    return env


def write_pdf(path: Path, pages: int) -> Path:
    images = [Image.new("RGB", PDF_PAGE_SIZE, (20 + 10 * i, 120, 200)) for i in range(pages)]
    images[0].save(path, "PDF", save_all=True, append_images=images[1:], resolution=72.0)
    return path


class McpConnection:
    """An MCP ``Client`` connected to a server subprocess, usable from synchronous tests."""

    def __init__(self, portal: BlockingPortal, client: Client, transport: str, log: Callable[[], str]) -> None:
        self.portal = portal
        self.client = client
        self.transport = transport
        self.log = log

    def run(self, call: Callable[[], Awaitable[Any]]) -> Any:
        return self.portal.call(call)

    def call(self, name: str, arguments: dict[str, Any], progress: Any = None) -> CallToolResult:
        return self.portal.call(lambda: self.client.call_tool(name, arguments, progress_callback=progress))

    def start(self, name: str, arguments: dict[str, Any], progress: Any = None) -> concurrent.futures.Future:
        """Start a call in the background; cancelling the future cancels the MCP request."""
        return self.portal.start_task_soon(lambda: self.client.call_tool(name, arguments, progress_callback=progress))


def stdio_transport(checkpoint: Path, root: Path, errlog: Any) -> Any:
    """The SDK's stdio transport spawning ``python -m hd4k_tools.cli mcp ...`` (the ``hd4k mcp`` command)."""
    args = ["-m", "hd4k_tools.cli", "mcp", "--model", str(checkpoint), "--allowed-root", str(root), *SERVER_OPTIONS]
    params = StdioServerParameters(command=sys.executable, args=args, env=environment(), cwd=str(REPO))
    return stdio_client(params, errlog=errlog)


def start_http_server(
    checkpoint: Path, root: Path, lines: list[str], *, host: str = "127.0.0.1", extra: Sequence[str] = ()
) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "hd4k_tools.mcp", "--transport", "streamable-http", "--host", host]
    command += ["--port", "0", "--model", str(checkpoint), "--allowed-root", str(root), *SERVER_OPTIONS, *extra]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=environment())
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # keeps reading so the pipe never fills
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if not found and "serving streamable HTTP on " in line:
                found.append(line.split(" on ", 1)[1].strip())
                ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(STARTUP_TIMEOUT_S) or not found:
        proc.kill()
        raise RuntimeError("the MCP HTTP server did not start:\n" + "".join(lines))
    return proc, found[0]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:  # pragma: no cover
        proc.kill()
        proc.wait(5)


def wait_for(predicate: Callable[[], bool], timeout: float = CALL_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)
