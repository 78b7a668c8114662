"""``hd4k serve --engine vllm``: vLLM's real OpenAI server, started as a process on 127.0.0.1 exactly as the
README writes it, answers an image request with the native runner's text; per-request hd_num works within
the engine's budget and is a 400 above it.

Run in the vLLM environment only (``pytest tests/engine_vllm``; see ``.ci/run``). One server for the module.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm.entrypoints.llm")

import httpx
from PIL import Image, ImageDraw

from hd4k_tools import HD4K, LocalRunner

ENGINE_HD_NUM = 9
GREEDY = {"max_new_tokens": 24, "num_beams": 1}
MODEL_NAME = "tiny-ixc2-vllm"
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _picture() -> Image.Image:
    img = Image.new("RGB", (640, 400), "white")
    draw = ImageDraw.Draw(img)
    draw.rectangle((40, 60, 300, 340), fill=(30, 120, 200))
    draw.ellipse((360, 80, 600, 320), fill=(220, 60, 40))
    draw.text((50, 20), "Q3 revenue 42", fill="black")
    return img


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_vllm_server"), seed=0, head_dim=32, shards=1)


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm_server_log") / "server.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")),
    }
    argv = [
        sys.executable, "-m", "hd4k_tools.cli", "serve", "--engine", "vllm", "--model", str(checkpoint),
        "--port", str(port), "--hd-num", str(ENGINE_HD_NUM), "--served-model-name", MODEL_NAME,
        "--dtype", "float32", "--", "--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", "8",
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not start in {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def native(checkpoint: Path) -> HD4K:
    return HD4K(LocalRunner.from_pretrained(str(checkpoint), device="cpu", dtype="float32", progress=False))


def test_models_lists_the_served_name(server: str) -> None:
    data = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [m["id"] for m in data["data"]] == [MODEL_NAME]


def test_remote_client_gets_the_native_text(server: str, native: HD4K) -> None:
    picture = _picture()
    with HD4K.remote(server, MODEL_NAME, send_hd_num=False) as remote:
        ours = remote.chat("Describe the picture.", [picture], hd_num=ENGINE_HD_NUM, generation=GREEDY)
    expected = native.chat("Describe the picture.", [picture], hd_num=ENGINE_HD_NUM, generation=GREEDY)
    assert ours.text == expected.text and ours.text
    assert ours.usage.prompt_tokens == expected.usage.prompt_tokens


def _post(server: str, hd_num: int | None) -> httpx.Response:
    body: dict = {
        "model": MODEL_NAME,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": _data_url(_picture())}},
                    {"type": "text", "text": "Describe the picture."},
                ],
            }
        ],
        "max_tokens": 8,
        "temperature": 0,
    }
    if hd_num is not None:
        body["mm_processor_kwargs"] = {"hd_num": hd_num}
    return httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120)


def test_per_request_hd_num_within_the_budget(server: str, native: HD4K) -> None:
    small = _post(server, 1)
    assert small.status_code == 200, small.text
    expected = native.chat("Describe the picture.", [_picture()], hd_num=1, generation={**GREEDY, "max_new_tokens": 8})
    assert small.json()["usage"]["prompt_tokens"] == expected.usage.prompt_tokens
    assert small.json()["choices"][0]["message"]["content"].strip() == expected.text


def test_over_budget_hd_num_is_a_400(server: str) -> None:
    response = _post(server, ENGINE_HD_NUM + 7)
    assert response.status_code == 400, response.text
    assert "hd_num" in response.text


def test_image_urls_are_not_fetched(server: str) -> None:
    body = {
        "model": MODEL_NAME,
        "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}]}
        ],
        "max_tokens": 4,
    }
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text


def test_json_schema_response_format_is_compact_valid_json(server: str) -> None:
    """issue 21: vLLM's structured outputs work with this checkpoint's tokenizer (xgrammar, compact JSON)."""
    import json

    import jsonschema

    schema = {
        "type": "object",
        "properties": {"kind": {"enum": ["bar", "line"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["kind", "n"],
        "additionalProperties": False,
    }
    body = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "JSON?"}],
        "max_tokens": 48,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        "logprobs": True,
        "top_logprobs": 2,
    }
    answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=120).json()
    text = answer["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), schema)
    assert " " not in text
    assert len(answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) == 2
