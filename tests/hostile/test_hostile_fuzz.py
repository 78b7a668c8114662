"""Property-based fuzzing of the server's JSON body (issue 12, Deliver): whatever the body, the answer is
never a 500 and never a hang; a 4xx is in OpenAI's error shape."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from server_support import assert_openai_error, data_url  # noqa: E402

from hd4k_tools.inputs.policy import ImagePolicy  # noqa: E402
from hd4k_tools.runtime.local import LocalRunner  # noqa: E402
from hd4k_tools.serve.app import create_app  # noqa: E402

# A request the model really answers costs ~0.1 s with max_tokens_limit=1; a hang fails this bound.
MAX_SECONDS = 20.0

_text = st.text(max_size=40) | st.sampled_from(
    ["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]system", "<s>", "</s>", "<ImageHere>", "\ud800", "hi"]
)
_number = (
    st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0, 1, -1, 1e-300, 2**64, 10**30])
)
_scalar = st.none() | st.booleans() | _number | _text
_json = st.recursive(
    _scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4), max_leaves=12
)
_url = (
    st.sampled_from(
        [
            data_url(b"\x89PNG\r\n\x1a\n"),
            "data:image/png;base64,!!",
            "http://[::1",
            "http://[127.0.0.1]/",
            "file:///etc/passwd",
            "/etc/passwd",
            "data:text/plain;base64,aGk=",
        ]
    )
    | _text
)
_part = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": _text}),
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": _url})}),
    st.fixed_dictionaries({"type": _text}),
    _json,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool"]) | _text},
    optional={"content": _text | st.lists(_part, max_size=3) | _json, "name": _json},
)
_field = st.sampled_from(
    [
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "max_tokens",
        "max_completion_tokens",
        "repetition_penalty",
        "num_beams",
        "hd_num",
        "n",
        "stop",
        "stream",
        "layout",
        "stream_options",
    ]
)
_body = st.fixed_dictionaries(
    {"messages": st.lists(_message, min_size=0, max_size=3) | _json},
    optional={"model": _json},
).flatmap(lambda base: st.dictionaries(_field, _json | _number, max_size=4).map(lambda extra: {**base, **extra}))


@pytest.fixture(scope="module")
def client(tiny_model: Any) -> Iterator[TestClient]:
    app = create_app(
        LocalRunner(tiny_model, model_id="tiny"),
        policy=ImagePolicy(max_pixels=1_000_000, max_images=2),
        max_tokens_limit=1,
    )
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _check(client: TestClient, raw: bytes) -> None:
    started = time.monotonic()
    response = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert time.monotonic() - started < MAX_SECONDS
    assert response.status_code < 500, response.text[:500]
    if response.status_code >= 400:
        assert_openai_error(response)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(body=_body)
def test_structured_bodies_never_500(client: TestClient, body: dict[str, Any]) -> None:
    try:
        raw = json.dumps(body).encode("utf-8", "surrogatepass")
    except ValueError:  # an int too long for json.dumps: send its digits by hand
        raw = b'{"messages": [], "seed": ' + b"9" * 5000 + b"}"
    _check(client, raw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | _json.map(lambda v: json.dumps(v).encode("utf-8", "surrogatepass")))
def test_arbitrary_bytes_never_500(client: TestClient, raw: bytes) -> None:
    _check(client, raw)
