"""``RemoteRunner`` against fake servers on 127.0.0.1: retries, backoff, dropped connections, SSE parsing,
concurrency, payloads; and the client-side HD pre-sizing."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest
from PIL import Image

from hd4k_tools.errors import InputError, RemoteConnectionError, RemoteResponseError
from hd4k_tools.models.xcomposer2_4khd.tiling import hd_transform, plan
from hd4k_tools.runtime.generation import GenerationConfig
from hd4k_tools.runtime.remote import RemoteRunner, _retry_after, presize
from hd4k_tools.runtime.runner import GenerationRequest, Message, Runner

HOST = "127.0.0.1"


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _completion(text: str = "An answer.", **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14},
        **extra,
    }


def _text_request(text: str = "hi", **gen: Any) -> GenerationRequest:
    return GenerationRequest(messages=(Message.user(text),), generation=GenerationConfig(**gen))


# ----------------------------------------------------------------------------------------------------
# Fake servers
# ----------------------------------------------------------------------------------------------------
Reply = tuple[int, dict[str, str], bytes]


class FakeServer:
    """``http.server`` in a thread; ``script(n, body) -> (status, headers, body)`` answers request ``n``."""

    def __init__(self, script: Callable[[int, dict[str, Any]], Reply]) -> None:
        self.script = script
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with owner.lock:
                    n = len(owner.bodies)
                    owner.bodies.append(body)
                    owner.headers.append(dict(self.headers))
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    status, headers, payload = owner.script(n, body)
                finally:
                    with owner.lock:
                        owner.in_flight -= 1
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer((HOST, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{HOST}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def count(self) -> int:
        return len(self.bodies)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


class RawSocketServer:
    """Accepts connections and answers each with ``reply`` bytes (maybe nothing), then closes it."""

    def __init__(self, reply: bytes = b"") -> None:
        self.reply = reply
        self.accepted = 0
        self.sock = socket.socket()
        self.sock.bind((HOST, 0))
        self.sock.listen(16)
        self.url = f"http://{HOST}:{self.sock.getsockname()[1]}"
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                if self.reply:
                    conn.settimeout(5)
                    try:
                        _read_request(conn)  # all of it: unread bytes would turn our close into a reset
                        conn.sendall(self.reply)
                    except OSError:
                        pass

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


@pytest.fixture()
def fake_server() -> Iterator[Callable[[Callable[[int, dict[str, Any]], Reply]], FakeServer]]:
    servers: list[FakeServer] = []

    def start(script: Callable[[int, dict[str, Any]], Reply]) -> FakeServer:
        server = FakeServer(script)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture()
def raw_server() -> Iterator[Callable[[bytes], RawSocketServer]]:
    servers: list[RawSocketServer] = []

    def start(reply: bytes = b"") -> RawSocketServer:
        server = RawSocketServer(reply)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> Reply:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


def _runner(url: str, **kwargs: Any) -> RemoteRunner:
    kwargs.setdefault("backoff", 0.001)
    kwargs.setdefault("timeout", 10.0)
    return RemoteRunner(url, "m", **kwargs)


class _RecordingWaits:
    """Replaces ``RemoteRunner._wait`` so tests see the requested delays without sleeping."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, seconds: float, cancel: threading.Event | None) -> bool:
        self.delays.append(seconds)
        return True


# ----------------------------------------------------------------------------------------------------
# Retries
# ----------------------------------------------------------------------------------------------------
def test_503_then_200_is_retried_with_backoff(fake_server: Any) -> None:
    server = fake_server(
        lambda n, body: (
            _json_reply(503, {"error": {"message": "warming up"}}) if n == 0 else _json_reply(200, _completion())
        )
    )
    runner = _runner(server.url, max_retries=3, backoff=0.25)
    waits = _RecordingWaits()
    runner._wait = waits  # type: ignore[method-assign]
    result = runner.generate(_text_request())
    assert result.text == "An answer."
    assert server.count == 2
    assert len(waits.delays) == 1
    assert 0.125 <= waits.delays[0] <= 0.375  # backoff * 2**0 with ±50% jitter
    assert result.usage.prompt_tokens == 11 and result.usage.completion_tokens == 3


def test_backoff_grows_and_honours_retry_after(fake_server: Any) -> None:
    def script(n: int, body: dict[str, Any]) -> Reply:
        if n < 3:
            return _json_reply(
                429 if n == 2 else 502, {"error": {"message": "busy"}}, {"Retry-After": "7"} if n == 2 else {}
            )
        return _json_reply(200, _completion())

    server = fake_server(script)
    runner = _runner(server.url, max_retries=3, backoff=0.1)
    waits = _RecordingWaits()
    runner._wait = waits  # type: ignore[method-assign]
    assert runner.generate(_text_request()).text == "An answer."
    assert server.count == 4
    d0, d1, d2 = waits.delays
    assert 0.05 <= d0 <= 0.15 and 0.1 <= d1 <= 0.3
    assert d2 >= 7.0  # Retry-After wins over a shorter backoff


def test_retry_after_formats() -> None:
    import httpx

    assert _retry_after(httpx.Response(503, headers={"Retry-After": "3"})) == 3.0
    assert _retry_after(httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0.0
    assert _retry_after(httpx.Response(503, headers={"Retry-After": "soon"})) is None
    assert _retry_after(httpx.Response(503)) is None


@pytest.mark.parametrize(("status", "message"), [(503, "overloaded"), (500, "internal failure")])
def test_persistent_5xx_gives_up_after_max_retries(fake_server: Any, status: int, message: str) -> None:
    server = fake_server(lambda n, body: _json_reply(status, {"error": {"message": message}}))
    runner = _runner(server.url, max_retries=2)
    with pytest.raises(RemoteResponseError, match=message) as info:
        runner.generate(_text_request())
    assert info.value.status_code == status
    assert server.count == 3


def test_500_is_retried_with_backoff_and_retry_after(fake_server: Any) -> None:
    def script(n: int, body: dict[str, Any]) -> Reply:
        if n == 0:
            return _json_reply(500, {"error": {"message": "CUDA out of memory"}})
        if n == 1:
            return _json_reply(500, {"error": {"message": "still failing"}}, {"Retry-After": "4"})
        return _json_reply(200, _completion())

    server = fake_server(script)
    runner = _runner(server.url, max_retries=3, backoff=0.1)
    waits = _RecordingWaits()
    runner._wait = waits  # type: ignore[method-assign]
    assert runner.generate(_text_request()).text == "An answer."
    assert server.count == 3
    d0, d1 = waits.delays
    assert 0.05 <= d0 <= 0.15  # backoff * 2**0 with ±50% jitter
    assert d1 >= 4.0  # Retry-After on a 500 is honoured as well


def test_stream_500_is_retried(fake_server: Any) -> None:
    sse = _sse(_delta("ok"), _delta(None, "stop"), "[DONE]")
    server = fake_server(
        lambda n, body: (
            _json_reply(500, {"error": {"message": "boom"}})
            if n == 0
            else (200, {"Content-Type": "text/event-stream"}, sse)
        )
    )
    assert "".join(_runner(server.url, max_retries=1).stream(_text_request())) == "ok"
    assert server.count == 2


@pytest.mark.parametrize("status", [501, 505])
def test_permanent_5xx_not_retried(fake_server: Any, status: int) -> None:
    server = fake_server(lambda n, body: _json_reply(status, {"error": {"message": "never"}}))
    with pytest.raises(RemoteResponseError, match="never"):
        _runner(server.url, max_retries=3).generate(_text_request())
    assert server.count == 1


def test_400_is_not_retried_and_keeps_the_server_message(fake_server: Any) -> None:
    error = {"error": {"message": "hd_num must be at least 1", "type": "invalid_request_error", "param": "hd_num"}}
    server = fake_server(lambda n, body: _json_reply(400, error))
    runner = _runner(server.url, max_retries=3)
    with pytest.raises(RemoteResponseError, match="hd_num must be at least 1") as info:
        runner.generate(_text_request())
    assert info.value.status_code == 400
    assert server.count == 1


@pytest.mark.parametrize("status", [401, 404, 413, 422])
def test_other_4xx_not_retried(fake_server: Any, status: int) -> None:
    server = fake_server(lambda n, body: _json_reply(status, {"detail": "nope"}))
    with pytest.raises(RemoteResponseError, match="nope"):
        _runner(server.url, max_retries=3).generate(_text_request())
    assert server.count == 1


def test_connection_closed_immediately_is_retried_then_fails(raw_server: Any) -> None:
    server = raw_server(b"")
    runner = _runner(server.url, max_retries=2)
    with pytest.raises(RemoteConnectionError) as info:
        runner.generate(_text_request())
    assert server.accepted == 3
    message = str(info.value)
    assert server.url in message and "3 attempt" in message and "hd4k serve" in message


def test_half_response_is_retried_then_fails(raw_server: Any) -> None:
    half = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n{"choices": ['
    server = raw_server(half)
    with pytest.raises(RemoteConnectionError):
        _runner(server.url, max_retries=1).generate(_text_request())
    assert server.accepted == 2


def test_stream_connection_closed_is_retried_then_fails(raw_server: Any) -> None:
    server = raw_server(b"")
    stream = _runner(server.url, max_retries=1).stream(_text_request())
    with pytest.raises(RemoteConnectionError):
        list(stream)
    assert server.accepted == 2


def test_unreachable_server_names_base_url() -> None:
    with socket.socket() as s:  # a port that nothing listens on once closed
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    runner = _runner(f"http://{HOST}:{port}", max_retries=1)
    with pytest.raises(RemoteConnectionError, match=f"{HOST}:{port}"):
        runner.generate(_text_request())


def test_malformed_success_body(fake_server: Any) -> None:
    server = fake_server(lambda n, body: (200, {"Content-Type": "application/json"}, b"not json"))
    with pytest.raises(RemoteResponseError, match="not JSON"):
        _runner(server.url).generate(_text_request())
    server2 = fake_server(lambda n, body: _json_reply(200, {"choices": []}))
    with pytest.raises(RemoteResponseError, match="choices"):
        _runner(server2.url).generate(_text_request())


def test_cancel_before_sending(fake_server: Any) -> None:
    server = fake_server(lambda n, body: _json_reply(200, _completion()))
    cancel = threading.Event()
    cancel.set()
    result = _runner(server.url).generate(_text_request(), cancel=cancel)
    assert result.finish_reason == "cancelled"
    assert server.count == 0


# ----------------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------------
def _sse(*events: Any) -> bytes:
    return b"".join((b"data: [DONE]\n\n" if e == "[DONE]" else f"data: {json.dumps(e)}\n\n".encode()) for e in events)


def _delta(content: str | None = None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_stream_parses_sse(fake_server: Any) -> None:
    hd4k = {"plans": [], "image_tokens": 0, "timings": {"vision_s": 0.5, "prefill_s": 0.25}}
    body = _sse(
        {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        _delta("Hel"),
        _delta("lo"),
        {**_delta(None, "length"), "hd4k": hd4k},
        {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
        "[DONE]",
    )
    server = fake_server(lambda n, req: (200, {"Content-Type": "text/event-stream"}, b": comment\n\n" + body))
    stream = _runner(server.url).stream(_text_request())
    assert list(stream) == ["Hel", "lo"]
    result = stream.result
    assert result is not None
    assert (result.text, result.finish_reason) == ("Hello", "length")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (4, 2)
    assert result.timings.vision_s == 0.5 and result.timings.total_s > 0
    sent = server.bodies[0]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


def test_stream_from_a_server_that_answers_whole(fake_server: Any) -> None:
    server = fake_server(lambda n, req: _json_reply(200, _completion("All at once.")))
    stream = _runner(server.url).stream(_text_request())
    assert list(stream) == ["All at once."]
    assert stream.result is not None and stream.result.usage.completion_tokens == 3


def test_stream_error_event_raises(fake_server: Any) -> None:
    body = _sse(_delta("a"), {"error": {"message": "model exploded", "type": "server_error"}}, "[DONE]")
    server = fake_server(lambda n, req: (200, {"Content-Type": "text/event-stream"}, body))
    stream = _runner(server.url).stream(_text_request())
    with pytest.raises(RemoteResponseError, match="model exploded"):
        list(stream)


def test_stream_ending_early_is_a_dropped_connection(fake_server: Any) -> None:
    body = _sse(_delta("partial"))  # no finish_reason, no [DONE]
    server = fake_server(lambda n, req: (200, {"Content-Type": "text/event-stream"}, body))
    stream = _runner(server.url).stream(_text_request())
    with pytest.raises(RemoteConnectionError, match="ended before the answer was complete"):
        list(stream)


def test_stream_dropped_mid_chunked_body(raw_server: Any) -> None:
    event = f"data: {json.dumps(_delta('partial'))}\n\n".encode()
    reply = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(event):x}\r\n".encode()
        + event
        + b"\r\n"
    )
    server = raw_server(reply)
    stream = _runner(server.url, max_retries=3).stream(_text_request())
    with pytest.raises(RemoteConnectionError, match="dropped in the middle"):
        list(stream)
    assert server.accepted == 1  # text was already under way: never re-sent


# ----------------------------------------------------------------------------------------------------
# Payload, concurrency, protocol
# ----------------------------------------------------------------------------------------------------
def _decode_data_url(url: str) -> Image.Image:
    header, _, payload = url.partition(",")
    assert header.startswith("data:image/") and header.endswith(";base64")
    return Image.open(io.BytesIO(base64.b64decode(payload)))


def test_payload_presizes_images_and_sends_extensions(fake_server: Any) -> None:
    server = fake_server(lambda n, body: _json_reply(200, _completion()))
    image = _noise(2000, 1000)
    request = GenerationRequest(
        messages=(Message("system", ("Be brief.",)), Message.user(image, "What?")),
        hd_nums=(2,),
        generation=GenerationConfig(max_new_tokens=20, num_beams=3),
        layout="eval",
    )
    result = _runner(server.url).generate(request)
    sent = server.bodies[0]
    assert sent["model"] == "m"
    assert sent["messages"][0] == {"role": "system", "content": "Be brief."}
    parts = sent["messages"][1]["content"]
    assert parts[1] == {"type": "text", "text": "What?"}
    uploaded = _decode_data_url(parts[0]["image_url"]["url"])
    assert uploaded.size == plan(2000, 1000, 2).resized_size == (672, 336)
    assert (sent["hd_num"], sent["layout"], sent["num_beams"], sent["max_tokens"]) == (2, "eval", 3, 20)
    assert sent["temperature"] == 0.0
    assert "top_k" not in sent and "repetition_penalty" not in sent and "seed" not in sent
    # No hd4k extension in the answer: plans are the client's own, for the caller's image.
    assert result.plans[0].input_size == (2000, 1000)
    assert result.plans[0].image_tokens == plan(2000, 1000, 2).num_tokens
    assert result.usage.image_tokens == plan(2000, 1000, 2).num_tokens


def test_payload_for_other_servers(fake_server: Any) -> None:
    server = fake_server(lambda n, body: _json_reply(200, _completion()))
    image = _noise(100, 80)
    request = GenerationRequest(
        messages=(Message.user(image, image, "Compare."),),
        hd_nums=(1, 4),
        generation=GenerationConfig(
            do_sample=True, temperature=0.7, top_p=0.8, top_k=40, seed=5, repetition_penalty=1.05
        ),
    )
    _runner(server.url, send_hd_num=False, presize=False, image_format="JPEG").generate(request)
    sent = server.bodies[0]
    assert "hd_num" not in sent and "layout" not in sent
    assert (sent["temperature"], sent["top_p"], sent["top_k"], sent["seed"], sent["repetition_penalty"]) == (
        0.7,
        0.8,
        40,
        5,
        1.05,
    )
    urls = [p["image_url"]["url"] for p in sent["messages"][0]["content"] if p["type"] == "image_url"]
    assert len(urls) == 2 and all(u.startswith("data:image/jpeg;base64,") for u in urls)
    assert _decode_data_url(urls[0]).size == (100, 80)


def test_per_image_hd_nums_and_server_plans(fake_server: Any) -> None:
    a, b = _noise(900, 450, seed=1), _noise(450, 900, seed=2)
    server_plans = [
        {
            "hd_num": 2,
            "rows": 1,
            "cols": 2,
            "num_tiles": 2,
            "image_tokens": 457,
            "input_size": [672, 336],
            "padded_size": [672, 336],
        },
        {
            "hd_num": 4,
            "rows": 2,
            "cols": 1,
            "num_tiles": 2,
            "image_tokens": 469,
            "input_size": [336, 672],
            "padded_size": [336, 672],
        },
    ]
    ext = {"plans": server_plans, "image_tokens": 926, "timings": {"vision_s": 1.5}}
    server = fake_server(lambda n, body: _json_reply(200, _completion(hd4k=ext)))
    request = GenerationRequest(messages=(Message.user(a, b, "?"),), hd_nums=(2, 4))
    result = _runner(server.url).generate(request)
    assert server.bodies[0]["hd_num"] == [2, 4]
    assert [p.input_size for p in result.plans] == [(900, 450), (450, 900)]
    assert [p.image_tokens for p in result.plans] == [457, 469]
    assert result.usage.image_tokens == 926
    assert result.timings.vision_s == 1.5


def test_api_key_and_base_url(fake_server: Any) -> None:
    server = fake_server(lambda n, body: _json_reply(200, _completion()))
    runner = RemoteRunner(server.url + "/v1/", "m", api_key="sesame")
    assert runner.base_url == server.url + "/v1"
    runner.generate(_text_request())
    assert server.headers[0].get("Authorization") == "Bearer sesame"
    with pytest.raises(InputError):
        RemoteRunner("localhost:8000", "m")


def test_concurrency_limit_is_shared_by_threads(fake_server: Any) -> None:
    gate = threading.Barrier(2, timeout=10)

    def script(n: int, body: dict[str, Any]) -> Reply:
        # The first two requests meet here, so two really are in flight together.
        if n < 2:
            gate.wait()
        return _json_reply(200, _completion())

    server = fake_server(script)
    runner = _runner(server.url, max_concurrency=2)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            runner.generate(_text_request())
        except BaseException as err:  # collected for the assertion below
            errors.append(err)

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    assert server.count == 6
    assert server.max_in_flight == 2


def test_runner_protocol_and_estimates() -> None:
    runner = RemoteRunner("http://127.0.0.1:9", "m", context_length=4096)
    assert isinstance(runner, Runner)
    assert runner.model_id == "m" and runner.context_length == 4096
    assert runner.count_text_tokens("") == 1
    assert runner.count_text_tokens("x" * 300) == 101
    runner.close()


# ----------------------------------------------------------------------------------------------------
# Pre-sizing
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "hd_num"), [((1000, 500), 2), ((500, 1000), 2), ((1500, 900), 4), ((333, 777), 1)])
def test_presized_upload_gives_identical_model_pixels(size: tuple[int, int], hd_num: int) -> None:
    image = _noise(*size)
    small = presize(image, hd_num)
    p = plan(*size, hd_num)
    assert small.size == p.resized_size
    assert small.width * small.height < size[0] * size[1]
    # What the server builds from the upload equals what it would build from the original.
    assert np.array_equal(np.asarray(hd_transform(small, hd_num)), np.asarray(hd_transform(image, hd_num)))


def test_presize_keeps_small_images() -> None:
    image = _noise(100, 60)
    assert presize(image, 9) is image  # HD-9 would upscale it: the server does that itself


@pytest.mark.parametrize(("size", "hd_num"), [((700, 318), 1), ((700, 351), 2), ((700, 483), 4), ((1556, 2434), 16)])
def test_presize_float_truncation_cases_keep_the_grid(size: tuple[int, int], hd_num: int) -> None:
    # For these sizes the reference plans the resized image one pixel shorter (float truncation): the
    # upload is the nearest size that plans to itself, with the same grid and token count.
    p = plan(*size, hd_num)
    assert plan(*p.resized_size, hd_num).resized_size != p.resized_size
    small = presize(_noise(*size), hd_num)
    q = plan(small.width, small.height, hd_num)
    assert q.resized_size == small.size
    assert (q.rows, q.cols, q.num_tokens) == (p.rows, p.cols, p.num_tokens)
    assert max(abs(a - b) for a, b in zip(small.size, p.resized_size, strict=True)) <= 3
