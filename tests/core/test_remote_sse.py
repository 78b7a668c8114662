"""The remote client bounds an event-stream line (issue 21 item 6): a server that streams one endless line
gets a typed error once the line passes ``max_sse_line_bytes``, and the client's memory stays near that
bound (before, ``iter_lines`` buffered the whole line: a 256 MB line cost 520-790 MB)."""

from __future__ import annotations

import socket
import threading
import tracemalloc
from collections.abc import Iterator

import pytest

from hd4k_tools.errors import RemoteResponseError
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.runtime.remote import MAX_SSE_LINE_BYTES, RemoteRunner, sse_lines
from hd4k_tools.runtime.runner import GenerationRequest, Message

REQUEST = GenerationRequest((Message.user("hi"),), generation=GenerationConfig(max_new_tokens=4))
MiB = 2**20


class EndlessLineServer:
    """Answers every request with a 200 event stream whose first line never ends (``total`` bytes, sent
    1 MiB at a time until the client hangs up); counts what it managed to send."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\ndata: "
                try:
                    conn.sendall(head)
                    block = b"x" * MiB
                    while self.sent < self.total:
                        conn.sendall(block)
                        self.sent += len(block)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture()
def endless() -> Iterator[EndlessLineServer]:
    server = EndlessLineServer(total=256 * MiB)
    yield server
    server.close()


def test_an_endless_sse_line_is_a_typed_error_with_bounded_memory(endless: EndlessLineServer) -> None:
    runner = RemoteRunner(endless.url, "m", max_retries=0, timeout=60)
    runner.max_sse_line_bytes = 2 * MiB
    tracemalloc.start()
    try:
        with pytest.raises(RemoteResponseError, match="longer than 2,097,152 bytes"):
            "".join(runner.stream(REQUEST))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        runner.close()
    # The line held (2 MiB) plus a chunk and its copy; the server's 256 MiB never reach the client.
    assert peak < 12 * MiB, f"peak {peak / MiB:.1f} MiB"
    assert endless.sent < 64 * MiB


def test_the_default_bound_and_line_endings() -> None:
    assert RemoteRunner("http://127.0.0.1:9", "m").max_sse_line_bytes == MAX_SSE_LINE_BYTES == 8 * MiB
    chunks = [b"data: 1\r\n\r\ndata: 2\r", b"\n\ndata: 3\rdata: \xc3", b"\xa9\n"]
    assert list(sse_lines(iter(chunks), 16)) == ["data: 1", "", "data: 2", "", "data: 3", "data: \u00e9"]
    assert list(sse_lines(iter([b"x" * 16, b"\n"]), 16)) == ["x" * 16]
    with pytest.raises(RemoteResponseError):
        list(sse_lines(iter([b"x" * 10, b"x" * 7]), 16))
