"""``create_app`` and ``run_server`` take a settings object (``ServerOptions``) instead of a dozen keywords,
and the old keyword call forms keep working (issue 18 item 5)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from hd4k_tools.errors import InputError, InvalidHDNumError
from hd4k_tools.runtime.runner import RunnerResult
from hd4k_tools.serve.factory import ServerOptions, create_app
from hd4k_tools.serve.run import run_server


class _Runner:
    model_id = "opts"
    context_length = 4096

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, request: Any, *, cancel: Any = None) -> RunnerResult:
        return RunnerResult(text="ok", model=self.model_id)

    def stream(self, request: Any, *, cancel: Any = None) -> Any:  # pragma: no cover - not used
        raise NotImplementedError

    def close(self) -> None:
        pass


def _settings(app: Any) -> Any:
    return app.state.hd4k.settings


def test_options_object_and_keywords_give_the_same_app() -> None:
    runner = _Runner()
    by_object = create_app(runner, ServerOptions(default_hd_num=9, api_key="k", served_model_name="m"))
    by_keywords = create_app(runner, default_hd_num=9, api_key="k", served_model_name="m")
    for name in ("default_hd_num", "api_key", "model_name", "max_tokens_limit", "sse_keepalive_s"):
        assert getattr(_settings(by_object), name) == getattr(_settings(by_keywords), name)
    # Keywords change an options object.
    both = create_app(runner, ServerOptions(default_hd_num=9), default_hd_num="auto")
    assert _settings(both).default_hd_num == "auto"
    client = TestClient(by_object)
    assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).json()["data"][0]["id"] == "m"


def test_bad_options_are_refused_loudly() -> None:
    with pytest.raises(TypeError, match="unknown server options"):
        create_app(_Runner(), max_tokenz_limit=5)
    with pytest.raises(ValueError, match="max_tokens_limit"):
        ServerOptions(max_tokens_limit=0)
    with pytest.raises(ValueError, match="sse_keepalive_s"):
        create_app(_Runner(), sse_keepalive_s=float("nan"))
    with pytest.raises(InvalidHDNumError):
        ServerOptions(default_hd_num="many")


def test_run_server_refuses_an_unknown_engine_option_before_loading(tiny_checkpoint: Any) -> None:
    with pytest.raises(InputError, match="does not take"):
        run_server(str(tiny_checkpoint), port=0, not_an_option=1)
