"""Servers for tests (not a test module): a free loopback port, a server process (``hd4k serve``, or any
command line such as the README's vLLM one) polled on ``/health`` until it answers and stopped afterwards,
and an ASGI app on a real uvicorn in a thread.

Standard library, pytest and httpx only (uvicorn is imported when a thread server starts), so the vLLM
environment of ``tests/engine_vllm`` imports it too. ``tests`` is on pytest's ``pythonpath``: import it as
``servers``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

HOST = "127.0.0.1"
#: What every test server process runs with: never a hub, no progress bars.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HD4K_NO_PROGRESS": "1"}


def free_port() -> int:
    """A loopback port nothing listens on (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def hd4k_command() -> list[str]:
    """The ``hd4k`` console script ([project.scripts]) next to this interpreter, so the tests run what a user
    runs; ``python -m hd4k_tools.cli`` (the same ``main``) where the project is not installed as a script."""
    for name in ("hd4k", "hd4k.exe"):
        script = Path(sys.executable).with_name(name)
        if script.is_file():
            return [str(script)]
    return [sys.executable, "-m", "hd4k_tools.cli"]


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment, offline (:data:`OFFLINE_ENV`), without ``$HD4K_API_KEY`` (a key in the
    caller's environment would lock an open test server), plus ``extra``."""
    env = {**os.environ, **OFFLINE_ENV, **extra}
    if "HD4K_API_KEY" not in extra:
        env.pop("HD4K_API_KEY", None)
    return env


@dataclass(frozen=True)
class ServerProcess:
    """A running server: its base URL (``http://127.0.0.1:PORT``), process and log file."""

    base: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of the server's output."""
        return self.log_path.read_text(errors="replace")[-tail:]


@contextmanager
def server_process(
    argv: Sequence[str],
    port: int,
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    start_timeout_s: float = 120.0,
    poll_s: float = 0.2,
    stop_timeout_s: float = 15.0,
) -> Iterator[ServerProcess]:
    """Start ``argv`` (a server that will listen on ``HOST:port``), wait until ``GET /health`` answers 200,
    yield it, then stop it (SIGTERM, SIGKILL after ``stop_timeout_s``). Its output goes to ``log_path``; a
    server that exits or does not answer in ``start_timeout_s`` fails the test with the log's tail."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else server_env(),
        )
    server = ServerProcess(f"http://{HOST}:{port}", proc, log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"{argv[0]} exited with {proc.returncode} before serving:\n{server.log()}")
            try:
                if httpx.get(f"{server.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"{argv[0]} did not answer /health in {start_timeout_s:g} s:\n{server.log()}")
            time.sleep(poll_s)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=stop_timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def hd4k_serve(
    *args: str, log_path: Path, env: Mapping[str, str] | None = None, **options: Any
) -> Iterator[ServerProcess]:
    """``hd4k serve ARGS --host 127.0.0.1 --port <free>`` as a real process (see :func:`server_process` for
    ``options``)."""
    port = free_port()
    argv = [*hd4k_command(), "serve", *args, "--host", HOST, "--port", str(port)]
    with server_process(argv, port, log_path, env=env, **options) as server:
        yield server


@contextmanager
def uvicorn_thread(app: Any, *, lifespan: str = "auto", start_timeout_s: float = 20.0) -> Iterator[str]:
    """Serve ``app`` with a real uvicorn on 127.0.0.1 in a thread; yields the base URL."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host=HOST, port=port, log_level="warning", lifespan=lifespan)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://{HOST}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
