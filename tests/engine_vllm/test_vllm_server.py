"""``hd4k serve --engine vllm``: vLLM's real OpenAI server, started on 127.0.0.1 by the README's own CPU
commands (section "Serve at scale (vLLM)", "Try it on a CPU"), run as written except for the port and the
paths: the tiny checkpoint it makes, the served name, dtype and context it promises, and answers equal to
the native engine's, character for character (no leading space), from raw HTTP, streamed, through
``HD4K.remote`` and through the README's client command; per-request hd_num works within the engine's
budget and is a 400 above it.

Run in the vLLM environment only (``pytest tests/engine_vllm``; see ``.ci/run``). One server for the module.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("vllm.entrypoints.llm")

import httpx
from PIL import Image, ImageDraw
from servers import free_port, server_process

from hd4k_tools import HD4K, LocalRunner

ROOT = Path(__file__).resolve().parents[2]
GREEDY = {"max_new_tokens": 24, "num_beams": 1}
START_TIMEOUT_S = 600


def _readme_cpu_commands() -> tuple[list[str], str]:
    """The README's CPU try-out: the two commands of its first block and the client command of the next."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("**Try it on a CPU**", 1)[1]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    # "# needs: ..." lines tell the reader (and the README test of the main suite) what a block needs.
    setup = [line for line in blocks[0].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    client = "\n".join(line for line in blocks[1].splitlines() if not line.lstrip().startswith("#")).strip()
    return setup, client


SETUP, CLIENT = _readme_cpu_commands()
ENGINE_HD_NUM = int(re.search(r"--hd-num (\d+)", SETUP[1]).group(1))
MODEL_NAME = shlex.split(SETUP[0])[2]  # the folder make-tiny-checkpoint writes; the README's served name


def _as_here(command: str, port: int) -> tuple[dict[str, str], list[str]]:
    """A README command for this environment: its ``VAR=value`` prefixes, and its argv with the README's
    ``.venv-vllm/bin/`` replaced by this interpreter's folder and port 8000 by ``port``."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and not words[0].startswith(("-", ".", "/")):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    bindir = str(Path(sys.executable).parent) + "/"
    argv = [w.replace(".venv-vllm/bin/", bindir) for w in words]
    argv = [str(port) if w == "8000" else w.replace(":8000", f":{port}") for w in argv]
    argv = [w.replace("examples/page.png", str(ROOT / "examples" / "page.png")) for w in argv]
    return env, argv


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
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme_cpu")


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    env, argv = _as_here(SETUP[0], 0)
    assert "make-tiny-checkpoint" in argv, SETUP[0]
    subprocess.run(argv, cwd=workdir, env={**os.environ, **env}, check=True, capture_output=True, timeout=300)
    return workdir / MODEL_NAME


@pytest.fixture(scope="module")
def server_log(workdir: Path) -> Path:
    return workdir / "server.log"


@pytest.fixture(scope="module")
def server(checkpoint: Path, workdir: Path, server_log: Path) -> Iterator[str]:
    port = free_port()
    env, argv = _as_here(SETUP[1], port)
    assert argv[1:4] == ["serve", "--engine", "vllm"] and "VLLM_CPU_KVCACHE_SPACE" in env, SETUP[1]
    full_env = {**os.environ, **env, "XDG_CACHE_HOME": str(workdir / "cache")}
    with server_process(
        argv, port, server_log, env=full_env, cwd=workdir, start_timeout_s=START_TIMEOUT_S, poll_s=1, stop_timeout_s=60
    ) as live:
        yield live.base


@pytest.fixture(scope="module")
def native(checkpoint: Path) -> HD4K:
    return HD4K(LocalRunner.from_pretrained(str(checkpoint), device="cpu", dtype="float32", progress=False))


def test_serves_what_the_readme_promises(server: str, server_log: Path, checkpoint: Path) -> None:
    data = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [m["id"] for m in data["data"]] == [MODEL_NAME] == ["tiny-vllm"]
    # The model's own context (config max_length), not vLLM's max_position_embeddings (32768).
    assert data["data"][0]["max_model_len"] == json.loads((checkpoint / "config.json").read_text())["max_length"]
    assert data["data"][0]["max_model_len"] == 16384
    # The checkpoint's dtype: float32 (vLLM's own "auto" would have served it in bfloat16).
    assert "dtype=torch.float32" in server_log.read_text(), server_log.read_text()[-3000:]


def _chat_body(picture: Image.Image | None, question: str, max_tokens: int, **extra) -> dict:
    content: list[dict] = [{"type": "text", "text": question}]
    if picture is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": _data_url(picture)}})
    return {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "mm_processor_kwargs": {"hd_num": 4},
        **extra,
    }


def _shapes() -> list[tuple[Image.Image | None, str]]:
    wide = Image.new("RGB", (900, 300), (240, 240, 230))
    ImageDraw.Draw(wide).rectangle((100, 50, 500, 250), fill=(20, 160, 90))
    tall = Image.new("RGB", (300, 800), (20, 20, 60))
    ImageDraw.Draw(tall).ellipse((30, 200, 270, 600), fill=(250, 200, 10))
    return [
        (_picture(), "Describe the picture."),
        (wide, "What is green?"),
        (tall, "Name the shape."),
        (None, "Write a line about a chart."),
        (None, "List three colours."),
    ]


def test_raw_http_answers_equal_the_native_text(server: str, native: HD4K) -> None:
    # What any OpenAI client sees, untouched: the same characters as the native engine's answer (which is
    # stripped), so no leading space from the first generated piece.
    for picture, question in _shapes():
        response = httpx.post(f"{server}/v1/chat/completions", json=_chat_body(picture, question, 24), timeout=120)
        assert response.status_code == 200, response.text
        images = [picture] if picture is not None else []
        expected = native.chat(question, images, hd_num=4, generation=GREEDY).text
        assert response.json()["choices"][0]["message"]["content"] == expected, question


def test_answers_cut_by_max_tokens_equal_the_native_text(server: str, native: HD4K) -> None:
    # Cut anywhere by max_tokens, the answer ends as the native engine's does: no trailing whitespace
    # (the plugin's tokenizer holds it back until a later piece follows; see test_answer_start.py).
    question = "List three colours."
    for cut in range(1, 25):
        response = httpx.post(f"{server}/v1/chat/completions", json=_chat_body(None, question, cut), timeout=120)
        assert response.status_code == 200, response.text
        expected = native.chat(question, [], generation={"max_new_tokens": cut, "num_beams": 1}).text
        assert response.json()["choices"][0]["message"]["content"] == expected, cut


def test_streamed_answer_equals_the_native_text(server: str, native: HD4K) -> None:
    picture, question = _shapes()[1]
    body = _chat_body(picture, question, 24, stream=True)
    pieces = []
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    assert "".join(pieces) == native.chat(question, [picture], hd_num=4, generation=GREEDY).text


def test_readme_client_command_prints_the_native_cli_text(server: str, checkpoint: Path, workdir: Path) -> None:
    port = server.rsplit(":", 1)[1]
    _, argv = _as_here(CLIENT, int(port))
    client = subprocess.run(argv, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert client.returncode == 0, client.stderr[-3000:]
    readme = (ROOT / "README.md").read_text(encoding="utf-8").split("**Try it on a CPU**", 1)[1]
    native_cmd = re.search(r"prints the same text as `(.*?)`", readme, re.S).group(1)
    _, native_argv = _as_here(" ".join(native_cmd.split()), 0)
    native_run = subprocess.run(native_argv, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert native_run.returncode == 0, native_run.stderr[-3000:]
    assert client.stdout == native_run.stdout and client.stdout.strip()


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
    assert small.json()["choices"][0]["message"]["content"] == expected.text  # as sent: no strip needed


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
