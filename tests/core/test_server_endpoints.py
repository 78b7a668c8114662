"""The endpoints and edges clients rely on (issue 21 items 4-6), in process with a scripted runner:
unknown ``model`` -> 404 ``model_not_found``, ``mm_processor_kwargs`` read like the vLLM engine reads it,
``GET /v1/models/{id}``, ``POST /v1/completions`` (whole and streamed), ``x-request-id`` on every response,
OpenAI's error shape for unknown routes and methods, and ``/metrics`` labels that stay bounded."""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from hd4k_tools.inputs.images import to_data_url
from hd4k_tools.results import PlanSummary, Timings, Usage
from hd4k_tools.runtime.runner import GenerationRequest, RunnerResult, TextStream, stream_in_thread
from hd4k_tools.serve.app import create_app

SERVED = "ixc-4khd"
ALIAS = "/models/internlm-xcomposer2-4khd-7b"


class Runner:
    """Answers "Hello there, reader" (words streamed one by one) and records the requests."""

    model_id = "/models/scripted"
    context_length = 16384

    def __init__(self, answer: str = "Hello there, reader") -> None:
        self.answer = answer
        self.requests: list[GenerationRequest] = []
        self.fail_context = False

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def _result(self, request: GenerationRequest) -> RunnerResult:
        self.requests.append(request)
        return RunnerResult(
            text=self.answer,
            model=self.model_id,
            plans=[PlanSummary.from_plan(p) for p in request.plans()],
            usage=Usage(prompt_tokens=5, completion_tokens=3),
            timings=Timings(decode_s=0.01, decode_tokens_per_s=300.0),
        )

    def generate(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> RunnerResult:
        return self._result(request)

    def stream(self, request: GenerationRequest, *, cancel: threading.Event | None = None) -> TextStream:
        def produce(emit: Any, ev: threading.Event) -> RunnerResult:
            result = self._result(request)
            words = result.text.split(" ")
            for i, word in enumerate(words):
                emit(word + (" " if i < len(words) - 1 else ""))
            return result

        return stream_in_thread(produce, cancel)

    def close(self) -> None:
        pass


def _client(runner: Runner | None = None, **kwargs: Any) -> TestClient:
    kwargs.setdefault("served_model_name", SERVED)
    kwargs.setdefault("model_aliases", [ALIAS])
    return TestClient(create_app(runner or Runner(), **kwargs), raise_server_exceptions=False)


def _error(response: Any, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _image_message(text: str = "What is it?") -> list[dict[str, Any]]:
    url = to_data_url(Image.new("RGB", (700, 340), "white"))
    parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


# ----------------------------------------------------------------------------------------------------
# model names (item 4)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_an_unknown_model_is_a_404_model_not_found(route: str) -> None:
    runner = Runner()
    client = _client(runner)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "prompt": "hi"}
    err = _error(client.post(route, json=body), 404, "model_not_found")
    assert err["type"] == "invalid_request_error" and "gpt-4o" in err["message"] and SERVED in err["message"]
    assert runner.requests == []  # nothing was generated


@pytest.mark.parametrize("model", [SERVED, ALIAS, None])
def test_the_served_name_its_aliases_and_no_name_are_answered(model: str | None) -> None:
    client = _client()
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    if model is not None:
        body["model"] = model
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model"] == SERVED


def test_models_lists_every_accepted_name_and_retrieves_each() -> None:
    client = _client()
    listed = client.get("/v1/models").json()
    assert [m["id"] for m in listed["data"]] == [SERVED, ALIAS]
    for name in (SERVED, ALIAS):  # the alias has slashes: a path parameter
        card = client.get(f"/v1/models/{name}")
        assert card.status_code == 200, card.text
        assert card.json()["id"] == name and card.json()["object"] == "model"
        assert {"created", "owned_by"} <= set(card.json())
    _error(client.get("/v1/models/gpt-4o"), 404, "model_not_found")
    _error(client.get("/v1/models/"), 404, "model_not_found")


def test_models_retrieve_needs_the_api_key() -> None:
    client = _client(api_key="sesame")
    _error(client.get(f"/v1/models/{SERVED}"), 401, "invalid_api_key")
    assert client.get(f"/v1/models/{SERVED}", headers={"Authorization": "Bearer sesame"}).status_code == 200


# ----------------------------------------------------------------------------------------------------
# mm_processor_kwargs (item 4)
# ----------------------------------------------------------------------------------------------------
def test_mm_processor_kwargs_hd_num_and_layout_are_read_like_the_vllm_engine_reads_them() -> None:
    runner = Runner()
    client = _client(runner)
    body = {"model": SERVED, "messages": _image_message(), "mm_processor_kwargs": {"hd_num": 2, "layout": "eval"}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert runner.requests[-1].hd_nums == (2,) and runner.requests[-1].layout == "eval"
    assert response.json()["hd4k"]["hd_nums"] == [2]
    # one value per image, like the plugin
    body["mm_processor_kwargs"] = {"hd_num": [3]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert runner.requests[-1].hd_nums == (3,) and runner.requests[-1].layout == "chat"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"mm_processor_kwargs": {"hd_num": 0}}, "hd_num"),
        ({"mm_processor_kwargs": {"hd_num": "lots"}}, "mm_processor_kwargs.hd_num"),
        ({"mm_processor_kwargs": {"num_crops": 4}}, "mm_processor_kwargs.num_crops"),
        ({"mm_processor_kwargs": {"hd_num": 2}, "hd_num": 3}, "mm_processor_kwargs.hd_num"),
    ],
)
def test_bad_mm_processor_kwargs_are_a_400(extra: dict[str, Any], param: str) -> None:
    runner = Runner()
    response = _client(runner).post("/v1/chat/completions", json={"messages": _image_message(), **extra})
    err = _error(response, 400)
    assert err["param"] == param and runner.requests == []


# ----------------------------------------------------------------------------------------------------
# /v1/completions (item 5)
# ----------------------------------------------------------------------------------------------------
def test_completions_answer_the_prompt_in_openais_shape() -> None:
    runner = Runner()
    client = _client(runner)
    response = client.post("/v1/completions", json={"model": SERVED, "prompt": "Say hello", "max_tokens": 7})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == SERVED
    assert body["choices"] == [{"index": 0, "text": "Hello there, reader", "finish_reason": "stop", "logprobs": None}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    request = runner.requests[-1]
    assert [m.role for m in request.messages] == ["user"] and request.messages[0].text == "Say hello"
    assert request.generation.max_new_tokens == 7
    # a one-element list is one prompt
    assert client.post("/v1/completions", json={"prompt": ["Say hi"]}).status_code == 200


def test_completions_stream_text_completion_chunks() -> None:
    client = _client()
    body = {"prompt": "Say hello", "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and c["id"].startswith("cmpl-") for c in chunks)
    texts = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert texts == "Hello there, reader"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 8


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}, "prompt"),
        ({}, "prompt"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "suffix": "end"}, "suffix"),
        ({"prompt": "hi", "best_of": 2}, "best_of"),
        ({"prompt": "hi", "logprobs": 2}, "logprobs"),
        ({"prompt": "hi", "n": 2}, "n"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ],
)
def test_completions_refuse_what_they_cannot_honour(extra: dict[str, Any], param: str) -> None:
    runner = Runner()
    err = _error(_client(runner).post("/v1/completions", json={"model": SERVED, **extra}), 400)
    assert err["param"] == param and runner.requests == []
    if param == "prompt":
        assert "/v1/chat/completions" in err["message"]


# ----------------------------------------------------------------------------------------------------
# x-request-id and the error shape everywhere (item 5)
# ----------------------------------------------------------------------------------------------------
def test_x_request_id_is_echoed_when_sane_and_generated_otherwise() -> None:
    client = _client()
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    echoed = client.post("/v1/chat/completions", json=chat, headers={"x-request-id": "trace-42.a:b/c"})
    assert echoed.headers["x-request-id"] == "trace-42.a:b/c"
    generated = client.get("/health").headers["x-request-id"]
    assert len(generated) == 32 and generated != client.get("/health").headers["x-request-id"]
    for bad in ("x" * 129, "has space", "new\u00e9line", ""):
        got = client.get("/health", headers={"x-request-id": bad.encode("utf-8")}).headers["x-request-id"]
        assert got != bad and len(got) == 32


def test_x_request_id_and_error_shape_on_every_kind_of_response() -> None:
    runner = Runner()
    client = _client(runner, api_key="sesame")
    auth = {"Authorization": "Bearer sesame", "x-request-id": "r1"}
    cases = [
        (client.get("/nope", headers=auth), 404, "not_found"),
        (client.post("/v1/embeddings", headers=auth, json={}), 404, "not_found"),
        (client.get("/v1/chat/completions", headers=auth), 405, "method_not_allowed"),
        (client.request("PURGE", "/v1/models", headers=auth), 405, "method_not_allowed"),
        (client.post("/v1/chat/completions", json={}, headers={"x-request-id": "r1"}), 401, "invalid_api_key"),
        (client.post("/v1/completions", content=b"{", headers=auth), 400, "invalid_json"),
        (client.post("/v1/chat/completions", json={"model": "x", "messages": []}, headers=auth), 400, None),
    ]
    for response, status, code in cases:
        _error(response, status, code)
        assert response.headers["x-request-id"] == "r1"
    assert "POST /v1/chat/completions" in cases[0][0].json()["error"]["message"]
    assert "use POST" in cases[2][0].json()["error"]["message"]


def test_an_unexpected_failure_is_a_500_in_openais_shape_with_its_request_id() -> None:
    class Broken(Runner):
        @property
        def context_length(self) -> int:  # type: ignore[override]
            raise RuntimeError("boom")

    client = TestClient(create_app(Broken(), served_model_name=SERVED), raise_server_exceptions=False)
    response = client.get("/health?verbose=true", headers={"x-request-id": "r-500"})
    err = _error(response, 500, "internal_error")
    assert "boom" not in err["message"] and response.headers["x-request-id"] == "r-500"


# ----------------------------------------------------------------------------------------------------
# /metrics labels stay bounded (item 6)
# ----------------------------------------------------------------------------------------------------
def _series(client: TestClient) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines() if line.startswith("hd4k_requests_total{")]


def test_300_odd_methods_and_paths_add_a_bounded_number_of_series() -> None:
    client = _client()
    before = len(_series(client))
    for i in range(300):
        client.request(f"M{i:03d}X", "/v1/models")
        client.request(f"Z{i:03d}", f"/random/{i}")
        client.get(f"/v1/models/unknown-{i}")
    series = _series(client)
    assert len(series) - before <= 4, series
    assert any('method="other",path="/v1/models",status="405"' in s for s in series)
    assert any('method="other",path="(unmatched)",status="404"' in s for s in series)
    assert any('method="GET",path="/v1/models/{model_id:path}",status="404"' in s for s in series)


def test_mm_processor_kwargs_keys_are_the_vllm_plugins() -> None:
    """One recipe for both engines: the native server takes exactly the keys the plugin takes per request
    (read from the plugin's source, which imports vLLM)."""
    import ast
    from pathlib import Path

    import hd4k_tools
    from hd4k_tools.serve.schemas import MMProcessorKwargs

    source = Path(hd4k_tools.__file__).parent / "models" / "xcomposer2_4khd" / "vllm" / "processor.py"
    tree = ast.parse(source.read_text(encoding="utf-8"))
    (value,) = [
        node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "REQUEST_KWARGS" for t in node.targets)
    ]
    # hd_plans is how the in-process engine hands the facade's plans over (planned once); not a client key.
    assert set(ast.literal_eval(value)) - {"hd_plans"} == set(MMProcessorKwargs.model_fields)


def test_hd4k_serve_engine_vllm_answers_to_the_same_names(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``hd4k serve --engine vllm --model DIR`` accepts what the native server accepts: the folder's name and
    DIR as given, so one client recipe (``model="DIR"``) fits both engines."""
    from hd4k_tools.serve import run
    from hd4k_tools.serve.vllm import vllm_server_argv

    seen: dict[str, Any] = {}
    monkeypatch.setattr(run, "run_vllm_server", lambda model, **kw: seen.update(kw))
    model_dir = tmp_path / "ixc-4khd"
    model_dir.mkdir()
    # vllm_server_argv reads the checkpoint's dtype and context from its config.json.
    (model_dir / "config.json").write_text('{"model_type": "internlmxcomposer2", "torch_dtype": "float32"}')
    run.serve_from_args(run.build_parser().parse_args(["--engine", "vllm", "--model", str(model_dir)]))
    assert seen["served_model_name"] == ["ixc-4khd", str(model_dir)]
    argv = vllm_server_argv(model_dir, served_model_name=seen["served_model_name"], generation_config_dir=tmp_path)
    at = argv.index("--served-model-name")
    assert argv[at + 1 : at + 3] == ["ixc-4khd", str(model_dir)] and argv[at + 3].startswith("--")
    run.serve_from_args(run.build_parser().parse_args(["--engine", "vllm", "--model", "x", "--served-model-name", "n"]))
    assert seen["served_model_name"] == "n"
