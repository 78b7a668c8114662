"""``hd4k serve`` tells the truth (issue 13.2): tools refused, response_format, tool messages, OpenAPI,
/metrics, /health?verbose, SSE keep-alive, access logs, served model name. In process with a scripted runner,
and one real ``hd4k serve`` process on the tiny checkpoint."""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from servers import hd4k_serve, server_env

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from hd4k_tools.inputs.images import to_data_url
from hd4k_tools.results import PlanSummary, Timings, Usage
from hd4k_tools.runtime.lru import BytesLRU
from hd4k_tools.runtime.runner import GenerationRequest, RunnerResult, TextStream, stream_in_thread
from hd4k_tools.serve.app import build_parser, create_app, served_name
from hd4k_tools.serve.chat import TOOLS_UNSUPPORTED

SCHEMA = {
    "type": "object",
    "properties": {"total": {"type": "number"}, "currency": {"type": "string"}},
    "required": ["total", "currency"],
}


class ScriptedRunner:
    """Answers with the next scripted text; records every request. ``first_token_delay`` holds the first
    streamed delta back (a long prefill)."""

    model_id = "/models/scripted"
    context_length = 16384

    def __init__(self, answers: list[str], *, first_token_delay: float = 0.0) -> None:
        self.answers = list(answers)
        self.requests: list[GenerationRequest] = []
        self.first_token_delay = first_token_delay
        self.embedding_cache: BytesLRU[int] = BytesLRU(1000, lambda v: v)
        self.embedding_cache.put("k", 10)
        self.embedding_cache.get("k")
        self.embedding_cache.get("missing")

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def _next(self, request: GenerationRequest) -> RunnerResult:
        self.requests.append(request)
        text = self.answers.pop(0) if self.answers else "(no more answers)"
        return RunnerResult(
            text=text,
            model=self.model_id,
            plans=[PlanSummary.from_plan(p) for p in request.plans()],
            usage=Usage(prompt_tokens=7, completion_tokens=3),
            timings=Timings(decode_s=0.01, decode_tokens_per_s=300.0),
        )

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        return self._next(request)

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        def produce(emit: Any, ev: threading.Event) -> RunnerResult:
            result = self._next(request)
            if self.first_token_delay:
                ev.wait(self.first_token_delay)
            for word in result.text.split(" "):
                emit(word + " ")
            return result

        return stream_in_thread(produce, cancel)

    def close(self) -> None:
        pass


def _client(runner: ScriptedRunner, **kwargs: Any) -> TestClient:
    kwargs.setdefault("model_aliases", ["m"])  # the name the bodies below send
    return TestClient(create_app(runner, **kwargs), raise_server_exceptions=False)


def _chat(client: TestClient, messages: list[dict[str, Any]] | None = None, **extra: Any) -> Any:
    body = {"model": "m", "messages": messages or [{"role": "user", "content": "What is the total?"}], **extra}
    return client.post("/v1/chat/completions", json=body)


def _last_text(runner: ScriptedRunner) -> str:
    return runner.requests[-1].messages[-1].text


# -- tools ---------------------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}}}


@pytest.mark.parametrize(
    "extra",
    [
        {"tools": [TOOL]},
        {"tools": [TOOL], "tool_choice": "auto"},
        {"tools": [TOOL], "tool_choice": "required"},
        {"tool_choice": {"type": "function", "function": {"name": "lookup"}}},
        {"functions": [{"name": "lookup", "parameters": {}}]},
    ],
)
def test_tools_are_refused_with_a_way_out(extra: dict[str, Any]) -> None:
    runner = ScriptedRunner(["prose"])
    response = _chat(_client(runner), **extra)
    assert response.status_code == 400
    err = response.json()["error"]
    assert err["code"] == "tools_not_supported" and err["message"] == TOOLS_UNSUPPORTED
    assert "no tool calling" in err["message"] and "read_document" in err["message"]
    assert runner.requests == []  # the model never ran


def test_tool_choice_none_lets_tools_through_unused() -> None:
    runner = ScriptedRunner(["fine"])
    response = _chat(_client(runner), tools=[TOOL], tool_choice="none")
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "fine"


# -- response_format -----------------------------------------------------------------------------------
def test_json_object_extracts_the_object() -> None:
    runner = ScriptedRunner(['Sure! ```json\n{"total": 12.5, "currency": "EUR"}\n``` Anything else?'])
    body = _chat(_client(runner), response_format={"type": "json_object"}).json()
    assert json.loads(body["choices"][0]["message"]["content"]) == {"total": 12.5, "currency": "EUR"}
    assert body["hd4k"]["structured_attempts"] == 1
    assert "single JSON object" in _last_text(runner)


def test_json_schema_retries_once_with_the_error() -> None:
    runner = ScriptedRunner(['{"total": "lots"}', '{"total": 3, "currency": "USD"}'])
    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA, "strict": True}}
    body = _chat(_client(runner), response_format=fmt).json()
    assert json.loads(body["choices"][0]["message"]["content"]) == {"total": 3, "currency": "USD"}
    assert body["hd4k"]["structured_attempts"] == 2
    assert body["usage"]["prompt_tokens"] == 14 and body["usage"]["completion_tokens"] == 6  # both calls
    first, retry = runner.requests
    assert '"currency"' in first.messages[-1].text
    assert retry.messages[-2].role == "assistant" and retry.messages[-2].text == '{"total": "lots"}'
    error = retry.messages[-1].text  # the jsonschema library's messages
    assert "total: 'lots' is not of type 'number'" in error and "'currency' is a required property" in error
    # Both calls ask the engine for constrained decoding to the schema.
    assert first.constraint is not None and first.constraint.schema == SCHEMA and retry.constraint == first.constraint


def test_json_schema_failing_twice_is_422() -> None:
    runner = ScriptedRunner(["no json", "still none"])
    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA}}
    response = _chat(_client(runner), response_format=fmt)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "structured_output_invalid"
    assert len(runner.requests) == 2


def test_json_schema_streamed_is_one_validated_delta() -> None:
    runner = ScriptedRunner(['{"total": 1, "currency": "X"}'])
    fmt = {"type": "json_schema", "json_schema": {"name": "invoice", "schema": SCHEMA}}
    with _client(runner).stream(
        "POST",
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "?"}], "stream": True, "response_format": fmt},
    ) as response:
        assert response.status_code == 200
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices"))
    assert json.loads(text) == {"total": 1, "currency": "X"}


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_object"}, "stop": ["}"]},
    ],
)
def test_bad_response_formats_are_400(extra: dict[str, Any]) -> None:
    runner = ScriptedRunner([])
    response = _chat(_client(runner), **extra)
    assert response.status_code == 400, response.text
    assert runner.requests == []


def test_text_response_format_is_plain() -> None:
    runner = ScriptedRunner(["plain answer"])
    body = _chat(_client(runner), response_format={"type": "text"}).json()
    assert body["choices"][0]["message"]["content"] == "plain answer"
    assert "structured_attempts" not in body["hd4k"]


# -- tool messages -------------------------------------------------------------------------------------
def test_tool_messages_become_user_turns_like_chat_hd4k() -> None:
    runner = ScriptedRunner(["It is 12 EUR."])
    messages = [
        {"role": "user", "content": "What does the invoice say?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "read_document", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Total: 12 EUR"},
        {"role": "tool", "tool_call_id": "unknown", "content": [{"type": "text", "text": "extra"}]},
    ]
    response = _chat(_client(runner), messages)
    assert response.status_code == 200, response.text
    sent = runner.requests[-1].messages
    assert [m.role for m in sent] == ["user", "assistant", "user", "user"]
    assert sent[2].text == "Result of the tool read_document:\nTotal: 12 EUR"
    assert sent[3].text == "Tool result:\nextra"


# -- OpenAPI, health, metrics --------------------------------------------------------------------------
def test_openapi_describes_the_api() -> None:
    client = _client(ScriptedRunner([]))
    spec = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    post = spec["paths"]["/v1/chat/completions"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[-1]
    schemas = spec["components"]["schemas"]
    assert name == "ChatCompletionRequest" and "messages" in schemas[name]["properties"]
    assert "response_format" in schemas[name]["properties"] and "hd_num" in schemas[name]["properties"]
    # Every reference in the document resolves.
    for target in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(spec)):
        assert target in schemas, target
    assert client.get("/docs").status_code == 200


def test_health_verbose_has_state_and_caches() -> None:
    client = _client(ScriptedRunner([]), served_model_name="served")
    assert client.get("/health").json() == {"status": "ok", "model": "served"}
    body = client.get("/health", params={"verbose": "true"}).json()
    assert body["state"] == "idle" and body["queue_depth"] == 0 and body["context_length"] == 16384
    assert body["caches"]["vision_embeddings"]["hits"] == 1 and body["caches"]["vision_embeddings"]["misses"] == 1


_SAMPLE = re.compile(r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{([a-zA-Z_]+="[^"]*",?)*\})? -?[0-9.e+Inf]+$')


def test_metrics_in_prometheus_format() -> None:
    client = _client(ScriptedRunner(["one two", "three four"]))
    assert _chat(client).status_code == 200
    with client.stream(
        "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "?"}], "stream": True}
    ) as r:
        list(r.iter_lines())
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    for line in text.splitlines():
        assert line.startswith("# HELP ") or line.startswith("# TYPE ") or _SAMPLE.match(line), line
    assert 'hd4k_requests_total{method="POST",path="/v1/chat/completions",status="200"} 2' in text
    assert "hd4k_time_to_first_token_seconds_count 2" in text
    assert "hd4k_queue_depth 0" in text and "hd4k_requests_in_flight 0" in text
    assert 'hd4k_tokens_total{kind="completion"} 6' in text
    assert "hd4k_decode_tokens_per_second_count 2" in text
    assert 'hd4k_cache_hit_ratio{cache="vision_embeddings"} 0.5' in text


# -- SSE keep-alive ------------------------------------------------------------------------------------
def test_sse_keepalive_during_a_long_prefill() -> None:
    runner = ScriptedRunner(["late answer"], first_token_delay=0.6)
    client = _client(runner, sse_keepalive_s=0.1)
    body = {"messages": [{"role": "user", "content": "?"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert sum(1 for line in lines if line == ": keep-alive") >= 2
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e.get("choices")) == "late answer"
    assert lines[-1] == "data: [DONE]"
    # A quick first token: no comment at all.
    quick = _client(ScriptedRunner(["fast"]), sse_keepalive_s=5)
    with quick.stream("POST", "/v1/chat/completions", json=body) as response:
        assert not any(line.startswith(":") for line in response.iter_lines())


def test_keepalive_setting_is_checked() -> None:
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="sse_keepalive_s"):
            create_app(ScriptedRunner([]), sse_keepalive_s=bad)


# -- access log ----------------------------------------------------------------------------------------
def test_one_json_access_line_per_request(caplog: pytest.LogCaptureFixture) -> None:
    client = _client(ScriptedRunner(["answer"]))
    with caplog.at_level(logging.INFO, logger="hd4k_tools.serve.access"):
        _chat(client)
        client.get("/health")
        client.get("/nope")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "hd4k_tools.serve.access"]
    assert [(line["method"], line["path"], line["status"]) for line in lines] == [
        ("POST", "/v1/chat/completions", 200),
        ("GET", "/health", 200),
        ("GET", "/nope", 404),
    ]
    chat = lines[0]
    assert chat["prompt_tokens"] == 7 and chat["completion_tokens"] == 3 and chat["duration_ms"] >= 0
    assert len({line["request_id"] for line in lines}) == 3


# -- served model name, $HD4K_MODEL --------------------------------------------------------------------
def test_served_name_is_the_checkpoint_name(tmp_path: Path) -> None:
    folder = tmp_path / "internlm-xcomposer2-4khd-7b"
    folder.mkdir()
    assert served_name(str(folder)) == "internlm-xcomposer2-4khd-7b"
    assert served_name(str(folder) + "/") == "internlm-xcomposer2-4khd-7b"
    assert served_name("internlm/internlm-xcomposer2-4khd-7b") == "internlm/internlm-xcomposer2-4khd-7b"


def test_serve_model_defaults_to_hd4k_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HD4K_MODEL", "/models/mine")
    args = build_parser().parse_args([])
    assert args.model == "/models/mine" and args.served_model_name is None
    assert args.local_files_only is False and args.revision is None
    monkeypatch.delenv("HD4K_MODEL")
    assert build_parser().parse_args([]).model == "internlm/internlm-xcomposer2-4khd-7b"


# -- the real process: `hd4k serve` with $HD4K_MODEL, default served name, metrics and access lines ---------
def test_real_server_defaults_metrics_and_access_log(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """``hd4k serve`` with only ``$HD4K_MODEL`` set: the model id is the checkpoint folder's name, tools are
    refused, /metrics and /health?verbose show the LocalRunner's caches, stderr has JSON access lines."""
    log_path = tmp_path / "serve.log"
    with hd4k_serve(log_path=log_path, env=server_env(HD4K_MODEL=str(tiny_checkpoint))) as live:
        base = live.base
        assert httpx.get(f"{base}/v1/models").json()["data"][0]["id"] == Path(tiny_checkpoint).name
        image = Image.new("RGB", (336, 336), "white")
        question = [{"type": "image_url", "image_url": {"url": to_data_url(image)}}, {"type": "text", "text": "?"}]
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 3, "hd_num": 1}
        answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200 and answer.json()["model"] == Path(tiny_checkpoint).name
        refused = httpx.post(f"{base}/v1/chat/completions", json={**body, "tools": [TOOL]}, timeout=60)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "tools_not_supported"
        metrics = httpx.get(f"{base}/metrics").text
        assert 'hd4k_requests_total{method="POST",path="/v1/chat/completions",status="200"} 1' in metrics
        assert 'hd4k_cache_misses_total{cache="vision_embeddings"} 1' in metrics
        assert 'hd4k_cache_entries{cache="prefix_kv"}' in metrics
        verbose = httpx.get(f"{base}/health", params={"verbose": "true"}).json()
        assert set(verbose["caches"]) == {"vision_embeddings", "prefix_kv"} and verbose["state"] == "idle"
        assert httpx.get(f"{base}/openapi.json").json()["info"]["title"] == "hd4k-tools"
    access = []
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith('{"event": "request"'):
            access.append(json.loads(line))
    chat = [a for a in access if a["path"] == "/v1/chat/completions"]
    assert [a["status"] for a in chat] == [200, 400]
    assert chat[0]["completion_tokens"] >= 1 and chat[0]["image_tokens"] > 0
