"""The OpenAI-compatible server: a real ``hd4k serve`` process (the console script) on 127.0.0.1 serving a
tiny random checkpoint, plus fast in-process tests of ``create_app`` error paths with a fake runner."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import HOST, hd4k_serve, uvicorn_thread

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient

from hd4k_tools.errors import ContextOverflowError, MissingDependencyError, RemoteResponseError
from hd4k_tools.inputs.images import to_data_url
from hd4k_tools.inputs.policy import ImagePolicy
from hd4k_tools.models.xcomposer2_4khd.tiling import plan
from hd4k_tools.results import PlanSummary, Usage
from hd4k_tools.runtime.generation import GenerationConfig
from hd4k_tools.runtime.generation_config import MAX_NUM_BEAMS
from hd4k_tools.runtime.local import LocalRunner
from hd4k_tools.runtime.remote import RemoteRunner, presize
from hd4k_tools.runtime.runner import GenerationRequest, Message, RunnerResult, TextStream, stream_in_thread
from hd4k_tools.runtime.stops import StopFilter
from hd4k_tools.serve.app import DEFAULT_MAX_TOKENS_LIMIT, create_app

SERVER_MAX_PIXELS = 4_000_000
SERVER_MAX_BODY = 3_000_000
SERVER_MAX_TOKENS = 1024
QUESTION = "What is shown in the picture?"


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.RandomState(seed).randint(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _chat_body(image: Image.Image | str | None, text: str = QUESTION, **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if image is not None:
        url = image if isinstance(image, str) else to_data_url(image)
        content.append({"type": "image_url", "image_url": {"url": url}})
    content.append({"type": "text", "text": text})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def _assert_openai_error(response: httpx.Response, status: int, *, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert "Traceback" not in err["message"]
    if status < 500:
        assert err["type"] == "invalid_request_error"
    if code is not None:
        assert err["code"] == code
    return err


def _sse_events(lines: Iterator[str]) -> list[Any]:
    events: list[Any] = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----------------------------------------------------------------------------------------------------
# The real server process
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def server_checkpoint(tiny_checkpoint: Path) -> Path:
    """The shared tiny checkpoint (conftest); its greedy answers to image questions are visible text."""
    return Path(tiny_checkpoint)


@pytest.fixture(scope="session")
def live_server(server_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``hd4k serve`` on a free loopback port; yields its base URL."""
    limits = ["--max-pixels", str(SERVER_MAX_PIXELS), "--max-request-bytes", str(SERVER_MAX_BODY)]
    limits += ["--max-tokens-limit", str(SERVER_MAX_TOKENS)]
    args = ["--model", str(server_checkpoint), "--served-model-name", "tiny", *limits, "--log-level", "warning"]
    log_path = tmp_path_factory.mktemp("server-log") / "server.log"
    with hd4k_serve(*args, log_path=log_path, start_timeout_s=60) as live:
        yield live.base


@pytest.fixture(scope="module")
def local_runner(server_checkpoint: Path) -> Iterator[LocalRunner]:
    runner = LocalRunner.from_pretrained(str(server_checkpoint))
    yield runner
    runner.close()


@pytest.fixture()
def remote(live_server: str) -> Iterator[RemoteRunner]:
    runner = RemoteRunner(live_server, "tiny", max_retries=0)
    yield runner
    runner.close()


def _request(image: Image.Image, hd_num: int, max_new_tokens: int = 12) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message.user(image, QUESTION),),
        hd_nums=(hd_num,),
        generation=GenerationConfig(max_new_tokens=max_new_tokens),
    )


def test_health_and_models(live_server: str) -> None:
    assert httpx.get(f"{live_server}/health").json() == {"status": "ok", "model": "tiny"}
    models = httpx.get(f"{live_server}/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["object"] == "model"


def test_chat_completion_raw_httpx(live_server: str) -> None:
    image = _noise(672, 336)
    response = httpx.post(
        f"{live_server}/v1/chat/completions", json=_chat_body(image, max_tokens=8, hd_num=2), timeout=60
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert 1 <= usage["completion_tokens"] <= 8
    p = plan(672, 336, 2)
    assert body["hd4k"]["hd_nums"] == [2]
    assert body["hd4k"]["plans"][0]["image_tokens"] == p.num_tokens
    assert body["hd4k"]["image_tokens"] == p.num_tokens
    assert usage["prompt_tokens"] > p.num_tokens


def test_remote_answer_equals_in_process(remote: RemoteRunner, local_runner: LocalRunner) -> None:
    # 1000×500 at hd_num=2 plans to 672×336, which plans to itself: the upload is pre-sized and the
    # server's model inputs are pixel-identical to the in-process ones, so greedy answers must match.
    image = _noise(1000, 500, seed=1)
    uploaded = presize(image, 2)
    assert uploaded.size == plan(1000, 500, 2).resized_size == (672, 336)
    request = _request(image, 2)
    here = local_runner.generate(request)
    there = remote.generate(request)
    assert here.text  # this checkpoint answers with visible text, so the comparison means something
    assert there.text == here.text
    assert there.finish_reason == here.finish_reason
    assert there.usage == here.usage
    assert there.plans == here.plans  # input_size is the caller's 1000×500, not the upload's size
    assert there.model == "tiny"


def test_remote_portrait_image_equals_in_process(remote: RemoteRunner, local_runner: LocalRunner) -> None:
    # Portrait images go through the reference's transpose-resize-transpose on both sides.
    image = _noise(400, 900, seed=2)
    assert presize(image, 4).size == plan(400, 900, 4).resized_size
    request = _request(image, 4)
    assert remote.generate(request).text == local_runner.generate(request).text


def test_stream_deltas_join_to_whole_answer(remote: RemoteRunner) -> None:
    request = _request(_noise(672, 336, seed=3), 2)
    whole = remote.generate(request)
    stream = remote.stream(request)
    deltas = list(stream)
    assert len(deltas) >= 1
    assert "".join(deltas) == whole.text
    assert stream.result is not None
    assert stream.result.text == whole.text
    assert stream.result.usage == whole.usage
    assert stream.result.finish_reason == whole.finish_reason


def test_raw_sse_stream(live_server: str) -> None:
    body = _chat_body(_noise(672, 336, seed=3), max_tokens=12, hd_num=2)
    whole = httpx.post(f"{live_server}/v1/chat/completions", json=body, timeout=60).json()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{live_server}/v1/chat/completions", json=streamed, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [f["choices"][0]["finish_reason"] for f in finals] == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == whole["usage"]


def test_hd4k_remote_facade(live_server: str) -> None:
    from hd4k_tools import HD4K

    with HD4K.remote(live_server, "tiny", max_retries=0) as hd:
        result = hd.chat(QUESTION, [_noise(672, 336)], hd_num=2, generation={"max_new_tokens": 6})
    assert result.model == "tiny"
    assert result.hd_num == 2
    assert result.usage.completion_tokens >= 1


def test_malformed_json_is_400(live_server: str) -> None:
    response = httpx.post(
        f"{live_server}/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"}
    )
    _assert_openai_error(response, 400, code="invalid_json")


def test_missing_messages_is_400(live_server: str) -> None:
    err = _assert_openai_error(httpx.post(f"{live_server}/v1/chat/completions", json={"model": "tiny"}), 400)
    assert err["param"] == "messages"


def test_n_greater_than_one_is_400(live_server: str) -> None:
    response = httpx.post(f"{live_server}/v1/chat/completions", json=_chat_body(None, n=2))
    assert _assert_openai_error(response, 400)["param"] == "n"


def test_oversized_image_is_refused(live_server: str) -> None:
    # A real 9000×9000 PNG (1-bit, so it is small on the wire) over the server's --max-pixels.
    buffer = io.BytesIO()
    Image.new("1", (9000, 9000)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = httpx.post(f"{live_server}/v1/chat/completions", json=_chat_body(url), timeout=60)
    err = _assert_openai_error(response, 400, code="image_too_large")
    assert "9000x9000" in err["message"]
    assert "max_pixels" in err["message"]
    assert err["param"] == "messages.0.content.0.image_url.url"


def test_body_over_limit_is_413(live_server: str) -> None:
    body = json.dumps(_chat_body(None, text="x" * (SERVER_MAX_BODY + 1_000_000))).encode()
    response = httpx.post(
        f"{live_server}/v1/chat/completions", content=body, headers={"content-type": "application/json"}
    )
    _assert_openai_error(response, 413, code="request_too_large")


def test_chunked_body_over_limit_is_413(live_server: str) -> None:
    # No Content-Length: the limit must hold on the bytes actually received.
    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(4):
            yield b"x" * 1_000_000
        yield b'"}]}'

    response = httpx.post(f"{live_server}/v1/chat/completions", content=chunks())
    _assert_openai_error(response, 413, code="request_too_large")


def test_http_image_url_refused_when_disabled(live_server: str) -> None:
    response = httpx.post(f"{live_server}/v1/chat/completions", json=_chat_body("http://127.0.0.1:9/cat.png"))
    err = _assert_openai_error(response, 400, code="image_url_not_allowed")
    assert "data URL" in err["message"]


def test_remote_runner_gets_server_error_message(remote: RemoteRunner, local_runner: LocalRunner) -> None:
    # hd_num=300 needs far more image tokens than the 16k context: 400 context_length_exceeded.
    request = _request(_noise(672, 336), 300)
    with pytest.raises(RemoteResponseError, match="context") as info:
        remote.generate(request)
    assert info.value.status_code == 400


def test_generation_limits_of_the_served_process(live_server: str) -> None:
    # --max-tokens-limit given to `hd4k serve` reaches the app; a huge num_beams is refused, not run.
    url = f"{live_server}/v1/chat/completions"
    over = httpx.post(url, json=_chat_body(None, max_tokens=SERVER_MAX_TOKENS + 1), timeout=60)
    err = _assert_openai_error(over, 400, code="max_tokens_too_large")
    assert str(SERVER_MAX_TOKENS) in err["message"] and err["param"] == "max_tokens"
    beams = httpx.post(url, json=_chat_body(None, max_tokens=4, num_beams=100_000), timeout=60)
    err = _assert_openai_error(beams, 400)
    assert err["param"] == "num_beams" and str(MAX_NUM_BEAMS) in err["message"]


def _read_sse_events(sock: socket.socket, count: int) -> bytes:
    """Bytes from ``sock`` until ``count`` SSE ``data:`` events have arrived."""
    received = b""
    while received.count(b"data:") < count:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the stream early: {received!r}"
        received += chunk
    return received


def test_dropped_stream_leaves_the_server_answering(live_server: str) -> None:
    image = _noise(672, 336, seed=5)
    url = f"{live_server}/v1/chat/completions"
    baseline = httpx.post(url, json=_chat_body(image, max_tokens=12, hd_num=2), timeout=120)
    assert baseline.status_code == 200, baseline.text
    expected = baseline.json()["choices"][0]["message"]["content"]

    # A long streamed answer (the tiny model never stops before max_tokens) abandoned after its first tokens.
    body = json.dumps(_chat_body(image, max_tokens=SERVER_MAX_TOKENS, hd_num=2, stream=True)).encode()
    host, port = live_server.removeprefix("http://").rsplit(":", 1)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=60) as client:
        client.sendall(head + body)
        received = _read_sse_events(client, 3)  # the role chunk and the first content deltas
        assert received.startswith(b"HTTP/1.1 200"), received[:200]
        # Abruptly: linger 0 makes close() send a reset instead of an orderly FIN.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    assert httpx.get(f"{live_server}/health", timeout=60).json() == {"status": "ok", "model": "tiny"}
    # The model is free again and its state (KV and vision caches) was not left half-written: the same
    # question gets the same greedy answer, whole and streamed.
    again = httpx.post(url, json=_chat_body(image, max_tokens=12, hd_num=2), timeout=120)
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] == expected
    streamed = {**_chat_body(image, max_tokens=12, hd_num=2), "stream": True}
    with httpx.stream("POST", url, json=streamed, timeout=120) as response:
        assert response.status_code == 200
        events = _sse_events(response.iter_lines())
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e.get("choices"))
    assert text == expected


def test_server_survives_client_errors(live_server: str) -> None:
    # After all the refusals above, the process still serves.
    assert httpx.get(f"{live_server}/health").status_code == 200


# ----------------------------------------------------------------------------------------------------
# In-process tests of create_app with a fake runner (fast)
# ----------------------------------------------------------------------------------------------------
class FakeRunner:
    """Records requests; answers with fixed deltas (their join, stripped, is the whole answer)."""

    def __init__(
        self,
        deltas: tuple[str, ...] = (" Hello", " world", ".", " Bye", "\n"),
        *,
        error: BaseException | None = None,
        error_after: int | None = None,
        context_length: int = 16384,
        block_until_cancel: bool = False,
    ) -> None:
        self.deltas = deltas
        self.error = error
        self.error_after = error_after
        self._context_length = context_length
        self.block_until_cancel = block_until_cancel
        self.requests: list[GenerationRequest] = []
        self.started = threading.Event()
        self.cancel_seen = threading.Event()

    model_id = "fake-model"

    @property
    def context_length(self) -> int:
        return self._context_length

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def _result(self, request: GenerationRequest, text: str, finish: str) -> RunnerResult:
        plans = [PlanSummary.from_plan(p) for p in request.plans()]
        return RunnerResult(
            text=text.strip(),
            model=self.model_id,
            finish_reason=finish,
            plans=plans,
            usage=Usage(prompt_tokens=10, image_tokens=sum(p.image_tokens for p in plans), completion_tokens=5),
        )

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        self.requests.append(request)
        if self.block_until_cancel:
            assert cancel is not None
            self.started.set()
            if cancel.wait(30):
                self.cancel_seen.set()
            return self._result(request, "", "cancelled")
        if self.error is not None:
            raise self.error
        return self._result(request, "".join(self.deltas), "stop")

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        self.requests.append(request)

        def produce(emit: Any, ev: threading.Event) -> RunnerResult:
            if self.error is not None and self.error_after is None:
                raise self.error
            sent: list[str] = []
            if self.block_until_cancel:
                while not ev.wait(0.01):
                    emit("tick ")
                    sent.append("tick ")
                self.cancel_seen.set()
                return self._result(request, "".join(sent), "cancelled")
            for i, d in enumerate(self.deltas):
                if self.error is not None and i == self.error_after:
                    raise self.error
                if ev.is_set():
                    self.cancel_seen.set()
                    return self._result(request, "".join(sent), "cancelled")
                emit(d)
                sent.append(d)
            return self._result(request, "".join(sent), "stop")

        return stream_in_thread(produce, cancel)

    def close(self) -> None:
        pass


def _client(runner: FakeRunner | None = None, **kwargs: Any) -> TestClient:
    kwargs.setdefault("model_aliases", ["m", "tiny"])  # the names _text_body and _chat_body send
    return TestClient(create_app(runner or FakeRunner(), **kwargs), raise_server_exceptions=False)


def _post(client: TestClient, body: Any, **kwargs: Any) -> httpx.Response:
    return client.post("/v1/chat/completions", json=body, **kwargs)


def _text_body(text: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **extra}


def _stream_text(client: TestClient, body: dict[str, Any]) -> tuple[str, list[Any]]:
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = _sse_events(response.iter_lines())
    text = "".join(
        e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and e.get("choices")
    )
    return text, events


def test_in_process_basic_answer_and_models() -> None:
    client = _client(served_model_name="served")
    body = _post(client, _text_body()).json()
    assert body["choices"][0]["message"]["content"] == "Hello world. Bye"
    assert body["model"] == "served"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    assert client.get("/v1/models").json()["data"][0]["id"] == "served"
    assert client.get("/health").json() == {"status": "ok", "model": "served"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "messages.0.content.0"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages.0.content.0.image_url.url",
        ),
        (_text_body(max_tokens=0), "max_tokens"),
        (_text_body(max_tokens="many"), "max_tokens"),
        (_text_body(temperature=5), "temperature"),
        (_text_body(hd_num=True), "hd_num"),
        (_text_body(hd_num="most"), "hd_num"),
        (_text_body(stop=5), "stop"),
        (_text_body(stream="yes"), "stream"),
        (_text_body(num_beams=0), "num_beams"),
        (_text_body(num_beams=MAX_NUM_BEAMS + 1), "num_beams"),
    ],
)
def test_schema_errors_are_400(body: dict[str, Any], param: str) -> None:
    err = _assert_openai_error(_post(_client(), body), 400)
    assert err["param"] == param


@pytest.mark.parametrize("raw", [b"", b"{", b"[1, 2]", b'"text"', b"\xff\xfe"])
def test_bad_json_is_400(raw: bytes) -> None:
    response = _client().post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    _assert_openai_error(response, 400, code="invalid_json")


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([{"role": "assistant", "content": "hi"}], "last message must be a user"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}, {"role": "user", "content": "c"}],
            "system message",
        ),
    ],
)
def test_conversation_shape_errors(messages: list[dict[str, Any]], fragment: str) -> None:
    err = _assert_openai_error(_post(_client(), {"messages": messages}), 400)
    assert fragment in err["message"]


def test_n_must_be_one() -> None:
    assert _post(_client(), _text_body(n=1)).status_code == 200
    assert _assert_openai_error(_post(_client(), _text_body(n=3)), 400, code="unsupported_n")["param"] == "n"


@pytest.mark.parametrize(
    "url",
    ["/etc/passwd", "file:///etc/passwd", "ftp://example.org/x.png", "iVBORw0KGgo" + "A" * 600],
)
def test_image_url_must_be_data_or_http(url: str) -> None:
    err = _assert_openai_error(_post(_client(), _chat_body(url)), 400, code="invalid_image_url")
    assert err["param"] == "messages.0.content.0.image_url.url"


def test_http_image_url_disabled_and_private_refused() -> None:
    _assert_openai_error(_post(_client(), _chat_body("http://127.0.0.1:9/x.png")), 400, code="image_url_not_allowed")
    # Enabled, but loopback stays refused by the policy's private-address rule (nothing is fetched).
    client = _client(allow_image_urls=True)
    err = _assert_openai_error(_post(client, _chat_body("http://127.0.0.1:9/x.png")), 400, code="image_url_not_allowed")
    assert "127.0.0.1" in err["message"] or "private" in err["message"].lower()


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64,!!!notbase64!!!",
        "data:image/png;base64," + base64.b64encode(b"not an image at all").decode(),
        "data:text/plain;base64," + base64.b64encode(b"hello").decode(),
        "data:image/png;base64,",
    ],
)
def test_bad_data_urls_are_400(url: str) -> None:
    _assert_openai_error(_post(_client(), _chat_body(url)), 400)


def test_image_limits_from_policy() -> None:
    image = _noise(200, 200)
    pixels = _client(policy=ImagePolicy(max_pixels=10_000))
    assert (
        "max_pixels" in _assert_openai_error(_post(pixels, _chat_body(image)), 400, code="image_too_large")["message"]
    )
    size = _client(policy=ImagePolicy(max_bytes=1_000))
    assert "max_bytes" in _assert_openai_error(_post(size, _chat_body(image)), 413, code="image_too_large")["message"]


def test_images_only_in_user_messages() -> None:
    body = {
        "messages": [
            {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": to_data_url(_noise(8, 8))}}]},
            {"role": "user", "content": "what?"},
        ]
    }
    _assert_openai_error(_post(_client(), body), 400)


def test_body_limit_content_length_and_chunked() -> None:
    client = _client(max_request_bytes=1_000)
    _assert_openai_error(_post(client, _text_body("x" * 2_000)), 413, code="request_too_large")

    def chunks() -> Iterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        yield b"y" * 2_000
        yield b'"}]}'

    response = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    _assert_openai_error(response, 413, code="request_too_large")
    assert _post(client, _text_body("small")).status_code == 200


def test_generation_settings_reach_the_runner() -> None:
    runner = FakeRunner()
    client = _client(runner)
    assert _post(client, _text_body(temperature=0, max_tokens=7, seed=3)).status_code == 200
    g = runner.requests[-1].generation
    assert (g.do_sample, g.max_new_tokens, g.seed) == (False, 7, 3)
    body = _text_body(
        temperature=0.7, top_p=0.9, top_k=5, repetition_penalty=1.1, max_completion_tokens=9, max_tokens=100
    )
    assert _post(client, body).status_code == 200
    g = runner.requests[-1].generation
    assert (g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty, g.max_new_tokens) == (
        True,
        0.7,
        0.9,
        5,
        1.1,
        9,
    )
    assert _post(client, _text_body(num_beams=3, layout="eval")).status_code == 200
    assert runner.requests[-1].generation.num_beams == 3
    assert runner.requests[-1].layout == "eval"
    # Beam search with sampling is not supported: a clear 400, not a 500.
    err = _assert_openai_error(_post(client, _text_body(num_beams=3, temperature=0.5)), 400)
    assert "num_beams" in err["message"]


def test_num_beams_is_bounded() -> None:
    # num_beams=100000 used to reach the decoder and get the server OOM-killed.
    runner = FakeRunner()
    client = _client(runner)
    for beams in (MAX_NUM_BEAMS + 1, 100_000):
        err = _assert_openai_error(_post(client, _text_body(num_beams=beams)), 400)
        assert err["param"] == "num_beams"
        assert str(MAX_NUM_BEAMS) in err["message"]
    assert runner.requests == []
    assert _post(client, _text_body(num_beams=MAX_NUM_BEAMS)).status_code == 200
    assert runner.requests[-1].generation.num_beams == MAX_NUM_BEAMS


def test_max_tokens_over_the_server_limit_is_400() -> None:
    runner = FakeRunner()
    client = _client(runner, max_tokens_limit=100)
    for field in ("max_tokens", "max_completion_tokens"):
        err = _assert_openai_error(_post(client, _text_body(**{field: 101})), 400, code="max_tokens_too_large")
        assert err["param"] == field
        assert "100" in err["message"] and "--max-tokens-limit" in err["message"]
        streamed = _post(client, _text_body(stream=True, **{field: 10**9}))
        _assert_openai_error(streamed, 400, code="max_tokens_too_large")
    assert runner.requests == []
    assert _post(client, _text_body(max_tokens=100)).status_code == 200
    assert runner.requests[-1].generation.max_new_tokens == 100
    # Without max_tokens the runner's default (512) is lowered to the server's limit.
    assert _post(client, _text_body()).status_code == 200
    assert runner.requests[-1].generation.max_new_tokens == 100


def test_max_tokens_limit_default_and_validation() -> None:
    runner = FakeRunner()
    client = _client(runner)
    assert _post(client, _text_body(max_tokens=DEFAULT_MAX_TOKENS_LIMIT)).status_code == 200
    _assert_openai_error(_post(client, _text_body(max_tokens=DEFAULT_MAX_TOKENS_LIMIT + 1)), 400)
    assert _post(client, _text_body()).status_code == 200
    assert runner.requests[-1].generation.max_new_tokens == GenerationConfig().max_new_tokens
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="max_tokens_limit"):
            create_app(FakeRunner(), max_tokens_limit=bad)  # type: ignore[arg-type]


def test_roles_and_parts_become_messages() -> None:
    runner = FakeRunner()
    image = _noise(40, 30)
    body = {
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look:"},
                    {"type": "image_url", "image_url": to_data_url(image)},
                    {"type": "text", "text": "what?"},
                ],
            },
        ]
    }
    assert _post(_client(runner), body).status_code == 200
    messages = runner.requests[-1].messages
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    last = messages[-1].content
    assert last[0] == "look:" and last[2] == "what?"
    assert isinstance(last[1], Image.Image) and last[1].size == (40, 30)
    assert np.array_equal(np.asarray(last[1]), np.asarray(image))


def test_hd_num_resolution() -> None:
    runner = FakeRunner(context_length=4096)
    client = _client(runner, default_hd_num=9)
    two = [_noise(300, 200, seed=1), _noise(200, 300, seed=2)]

    def body(**extra: Any) -> dict[str, Any]:
        parts = [{"type": "image_url", "image_url": {"url": to_data_url(im)}} for im in two]
        return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "?"}]}], **extra}

    assert _post(client, body()).status_code == 200
    assert runner.requests[-1].hd_nums == (9, 9)
    assert _post(client, body(hd_num=4)).status_code == 200
    assert runner.requests[-1].hd_nums == (4, 4)
    assert _post(client, body(hd_num=[1, 6])).status_code == 200
    assert runner.requests[-1].hd_nums == (1, 6)
    assert _post(client, body(hd_num="auto", max_tokens=100)).status_code == 200
    # "auto" reserves the prompt's own text tokens (issue 19 item 3), no longer a fixed 256-token margin.
    from hd4k_tools.models.xcomposer2_4khd.prompt import prompt_text_tokens

    text = prompt_text_tokens(runner.count_text_tokens, runner.requests[-1].messages, "chat")
    budget = (4096 - 100 - text) // 2
    resolved = runner.requests[-1].hd_nums
    for image, n in zip(two, resolved, strict=True):
        assert plan(image.width, image.height, n).num_tokens <= budget
        assert plan(image.width, image.height, n + 1).num_tokens > budget or n == 65
    _assert_openai_error(_post(client, body(hd_num=[1, 2, 3])), 400, code="invalid_hd_num")
    _assert_openai_error(_post(client, body(hd_num=0)), 400, code="invalid_hd_num")


def test_context_overflow_is_400() -> None:
    runner = FakeRunner(error=ContextOverflowError("The prompt needs 99999 tokens but the context is 16384."))
    client = _client(runner)
    _assert_openai_error(_post(client, _text_body()), 400, code="context_length_exceeded")
    # Streaming: the error comes before the first token, so it is still a status code, not an event.
    response = _post(client, _text_body(stream=True))
    _assert_openai_error(response, 400, code="context_length_exceeded")


def test_unexpected_error_is_generic_500(caplog: pytest.LogCaptureFixture) -> None:
    runner = FakeRunner(error=RuntimeError("secret internal detail /home/me/key"))
    response = _post(_client(runner), _text_body())
    err = _assert_openai_error(response, 500)
    assert err["type"] == "server_error"
    assert "secret" not in response.text
    assert "Traceback" not in response.text
    assert any("secret internal detail" in str(r.exc_info[1]) for r in caplog.records if r.exc_info)


def test_error_mid_stream_is_an_event() -> None:
    runner = FakeRunner(error=RuntimeError("secret mid-stream"), error_after=2)
    text, events = _stream_text(_client(runner), _text_body())
    assert text == "Hello world"
    error_events = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(error_events) == 1
    assert error_events[0]["error"]["type"] == "server_error"
    assert "secret" not in json.dumps(error_events)
    assert events[-1] == "[DONE]"


def test_stream_matches_whole_answer_and_usage_chunk() -> None:
    client = _client()
    whole = _post(client, _text_body()).json()
    text, events = _stream_text(client, {**_text_body(), "stream_options": {"include_usage": True}})
    assert text == whole["choices"][0]["message"]["content"] == "Hello world. Bye"
    assert events[-2]["usage"] == whole["usage"]
    assert events[-2]["choices"] == []
    _, plain = _stream_text(client, _text_body())
    assert all("usage" not in e for e in plain if isinstance(e, dict))


@pytest.mark.parametrize(
    ("stop", "expected"),
    [
        (["wor"], "Hello"),  # the answer is stripped, also before a stop string
        ("d. B", "Hello worl"),
        (["Bye", "llo"], "He"),
        (["\n"], "Hello world. Bye"),
        (["zzz"], "Hello world. Bye"),
    ],
)
def test_stop_sequences_cut_stream_and_whole_alike(stop: str | list[str], expected: str) -> None:
    client = _client()
    whole = _post(client, _text_body(stop=stop)).json()
    assert whole["choices"][0]["message"]["content"] == expected
    assert whole["choices"][0]["finish_reason"] == "stop"
    text, events = _stream_text(client, _text_body(stop=stop))
    assert text == expected
    finals = [e for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0]["finish_reason"]]
    assert finals[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_filter_holds_back_partial_stops() -> None:
    f = StopFilter(["STOP"])
    out = [f.feed(d) for d in ["  ab", "cS", "T", "x ", " STO", "P tail"]]
    # The spaces before "STOP" are never sent: the answer ends at "STx", as the non-streamed one does.
    assert out == ["ab", "c", "", "STx", "", ""]
    assert f.stopped and f.finish() == ""
    g = StopFilter([])
    assert "".join([g.feed("\n a "), g.feed(" b\n"), g.finish()]) == "a  b"


def test_api_key() -> None:
    client = _client(api_key="sesame")
    _assert_openai_error_any(_post(client, _text_body()), 401)
    assert _post(client, _text_body(), headers={"Authorization": "Bearer sesame"}).status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/health").status_code == 200


def _assert_openai_error_any(response: httpx.Response, status: int) -> None:
    assert response.status_code == status
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_unknown_route_and_method_in_openai_shape() -> None:
    client = _client()
    _assert_openai_error(client.get("/v1/nothing"), 404, code="not_found")
    _assert_openai_error(client.get("/v1/chat/completions"), 405, code="method_not_allowed")


def test_missing_fastapi_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(MissingDependencyError, match=r"hd4k-tools\[serve\]"):
        create_app(FakeRunner())


# ----------------------------------------------------------------------------------------------------
# Disconnects cancel the generation (uvicorn in a thread, fake runner, loopback socket)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def threaded_server() -> Iterator[Any]:
    """``start(runner)``: the app over ``runner`` on a real uvicorn in a thread; its base URL."""
    with contextlib.ExitStack() as servers:

        def start(runner: FakeRunner) -> str:
            return servers.enter_context(uvicorn_thread(create_app(runner, model_aliases=["m"]), start_timeout_s=30))

        yield start


def test_client_disconnect_cancels_stream(threaded_server: Any) -> None:
    runner = FakeRunner(block_until_cancel=True)
    base = threaded_server(runner)
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=_text_body(stream=True), timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        seen = 0
        for line in lines:
            if line.startswith("data:"):
                seen += 1
            if seen >= 3:
                break
    # The response is closed: the server must notice and stop the generation.
    assert runner.cancel_seen.wait(20), "generation was not cancelled after the client disconnected"


def test_client_disconnect_cancels_whole_answer(threaded_server: Any) -> None:
    runner = FakeRunner(block_until_cancel=True)
    base = threaded_server(runner)
    port = int(base.rsplit(":", 1)[1])
    body = json.dumps(_text_body()).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection((HOST, port), timeout=20) as client:
        client.sendall(head + body)
        assert runner.started.wait(20), "the request never reached the runner"
    # The client hung up while the answer was being generated: the server must cancel it.
    assert runner.cancel_seen.wait(20), "generation was not cancelled after the client disconnected"
