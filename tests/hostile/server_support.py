"""Server helpers for the catalogue: OpenAI error-shape checks and chat bodies (servers themselves start
with ``tests/servers.py``)."""

from __future__ import annotations

import base64
from typing import Any

import httpx


def assert_openai_error(response: httpx.Response, status: int | None = None) -> dict[str, Any]:
    """A 4xx answer in OpenAI's error shape (``status`` exact when given)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:500])
    if status is not None:
        assert response.status_code == status, response.text[:500]
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in err["message"]
    return err


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(*images: str, text: str = "What is it?", **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content.append({"type": "text", "text": text})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 1, **extra}
