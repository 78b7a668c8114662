"""RemoteRunner against a broken or hostile server (issue 12, item 7): a raw socket server on 127.0.0.1
answers with wrong types, deep JSON, malformed stream events, or drips bytes. Every case is a typed
RemoteError (no bad value emitted first), ``timeout`` bounds the whole call, and the same runner answers
the next normal request."""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hd4k_tools.errors import RemoteConnectionError, RemoteError, RemoteResponseError
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.runtime.remote import RemoteRunner
from hd4k_tools.runtime.runner import GenerationRequest, Message

REQUEST = GenerationRequest((Message.user("hi"),), generation=GenerationConfig(max_new_tokens=4))
GOOD_BODY = {"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 3}}
Script = Callable[[socket.socket], None]


def _respond(body: bytes, status: str = "200 OK", content_type: str = "application/json") -> Script:
    def send(sock: socket.socket) -> None:
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"  # one request per connection: the client must not reuse it
        )
        sock.sendall(head.encode() + body)

    return send


def _json(value: Any, status: str = "200 OK") -> Script:
    return _respond(json.dumps(value).encode(), status)


def _sse(*events: Any) -> Script:
    lines = b"".join(
        b"data: " + (e if isinstance(e, bytes) else json.dumps(e).encode()) + b"\n\n" for e in (*events, b"[DONE]")
    )
    return _respond(lines, content_type="text/event-stream")


def _drip(payload: bytes, interval: float = 0.5) -> Script:
    def send(sock: socket.socket) -> None:
        for i in range(len(payload)):
            sock.sendall(payload[i : i + 1])
            time.sleep(interval)

    return send


class _Hostile(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    script: Script = staticmethod(_json(GOOD_BODY))  # type: ignore[assignment]


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            while len(body) < length:
                body += sock.recv(65536)
            self.server.script(sock)  # type: ignore[attr-defined]
        except OSError:
            pass  # the client gave up (a drip test)


@pytest.fixture(scope="module")
def hostile() -> Iterator[_Hostile]:
    server = _Hostile(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture()
def remote(hostile: _Hostile) -> Iterator[RemoteRunner]:
    host, port = hostile.server_address[:2]
    runner = RemoteRunner(f"http://{host}:{port}", "tiny", max_retries=0, timeout=3)
    yield runner
    hostile.script = _json(GOOD_BODY)
    assert runner.generate(REQUEST).text == "fine"  # healthy: the same runner answers a normal reply
    runner.close()


WHOLE: list[tuple[str, Script]] = [
    ("usage-str", _json({**GOOD_BODY, "usage": {"prompt_tokens": "many"}})),
    ("usage-list", _json({**GOOD_BODY, "usage": [1, 2]})),
    ("usage-negative", _json({**GOOD_BODY, "usage": {"completion_tokens": -5}})),
    ("usage-float", _json({**GOOD_BODY, "usage": {"prompt_tokens": 1.5}})),
    ("usage-bool", _json({**GOOD_BODY, "usage": {"prompt_tokens": True}})),
    (
        "usage-huge",
        _respond(b'{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":1' + b"0" * 5000 + b"}}"),
    ),
    ("usage-inf", _respond(b'{"choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":1e999}}')),
    ("image-tokens-str", _json({**GOOD_BODY, "hd4k": {"image_tokens": -1}})),
    ("content-object", _json({"choices": [{"message": {"content": {"text": "x"}}}]})),
    ("content-int", _json({"choices": [{"message": {"content": 5}}]})),
    ("content-list", _json({"choices": [{"message": {"content": ["a"]}}]})),
    ("finish-int", _json({"choices": [{"message": {"content": "x"}, "finish_reason": 3}]})),
    ("choices-string", _json({"choices": "x"})),
    ("choices-empty", _json({"choices": []})),
    ("choice-string", _json({"choices": ["x"]})),
    ("message-string", _json({"choices": [{"message": "x"}]})),
    ("nested-arrays", _respond(b"[" * 100_000 + b"]" * 100_000)),
    ("nested-objects", _respond(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)),
    ("nested-error-400", _respond(b'{"error":' + b"[" * 100_000 + b"]" * 100_000 + b"}", "400 Bad Request")),
    ("error-message-object", _json({"error": {"message": {"deep": [1]}}}, "400 Bad Request")),
    ("not-json", _respond(b"<html>hi</html>")),
    ("json-array", _json([1, 2])),
    ("not-utf8", _respond(b'{"choices":"\xff\xfe"}')),
]


@pytest.mark.parametrize("script", [s for _, s in WHOLE], ids=[n for n, _ in WHOLE])
def test_malformed_whole_answer_is_remote_response_error(
    remote: RemoteRunner, hostile: _Hostile, script: Script
) -> None:
    hostile.script = script
    with pytest.raises(RemoteResponseError):
        remote.generate(REQUEST)


STREAMS: list[tuple[str, Script]] = [
    ("choice-string", _sse({"choices": ["x"]})),
    ("choices-int", _sse({"choices": 5})),
    ("delta-string", _sse({"choices": [{"delta": "text"}]})),
    ("content-int", _sse({"choices": [{"delta": {"content": 5}}]})),
    ("content-list", _sse({"choices": [{"delta": {"content": ["a", "b"]}}]})),
    ("content-object", _sse({"choices": [{"delta": {"content": {"t": "x"}}}]})),
    ("finish-list", _sse({"choices": [{"delta": {"content": "a"}, "finish_reason": ["stop"]}]})),
    ("good-then-bad", _sse({"choices": [{"delta": {"content": "ok "}}]}, {"choices": [{"delta": {"content": 7}}]})),
    ("event-array", _sse([1, 2])),
    ("event-nested", _sse(b"[" * 100_000 + b"]" * 100_000)),
    ("event-not-json", _sse(b"{not json")),
    (
        "usage-str",
        _sse({"choices": [{"delta": {"content": "a"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": "x"}}),
    ),
    ("usage-list", _sse({"choices": [{"delta": {"content": "a"}, "finish_reason": "stop"}], "usage": [1]})),
    ("error-event", _sse({"error": {"message": "boom"}})),
]


@pytest.mark.parametrize("script", [s for _, s in STREAMS], ids=[n for n, _ in STREAMS])
def test_malformed_stream_is_typed_and_emits_only_text(remote: RemoteRunner, hostile: _Hostile, script: Script) -> None:
    hostile.script = script
    emitted: list[object] = []
    with pytest.raises(RemoteError):
        for delta in remote.stream(REQUEST):
            emitted.append(delta)
    assert all(isinstance(d, str) for d in emitted), emitted


_DRIP_BODY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 200\r\nConnection: close\r\n\r\n"
    + b" " * 200
)


@pytest.mark.parametrize(
    ("script", "stream"),
    [
        (_drip(_DRIP_BODY), False),
        (_drip(_DRIP_BODY[:5] + b"" + _DRIP_BODY[5:]), True),
        (_drip(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n" + b"data: " + b" " * 100), True),
    ],
    ids=["whole-body", "stream-headers", "stream-events"],
)
def test_timeout_bounds_the_whole_call_against_a_dripping_server(
    remote: RemoteRunner, hostile: _Hostile, script: Script, stream: bool
) -> None:
    hostile.script = script
    started = time.monotonic()
    with pytest.raises(RemoteConnectionError, match="timeout"):
        if stream:
            list(remote.stream(REQUEST))
        else:
            remote.generate(REQUEST)
    assert time.monotonic() - started < remote.timeout + 2.5  # not one read timeout per byte
