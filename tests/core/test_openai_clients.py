"""Real OpenAI clients against a real ``hd4k serve`` process (issue 21 items 4, 5 and 7): the official
``openai`` client, ``langchain_openai.ChatOpenAI`` and LlamaIndex ``OpenAILike`` on the tiny checkpoint.

The server runs as users start it (``hd4k serve --model DIR``, no ``--served-model-name``), so it answers to
the folder's name and to ``DIR`` as given (vLLM's default name). Covered: ``models.list`` /
``models.retrieve`` and the 404 ``model_not_found`` of an unknown name, ``/v1/completions`` (OpenAILike's
default call), ``extra_body={"mm_processor_kwargs": {"hd_num": n}}`` (the vLLM recipe), ``x-request-id``,
and the README's client snippets run as written (only the server address, ``DIR`` and the image files
replaced)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from servers import hd4k_serve

from hd4k_tools.inputs.images import to_data_url

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``hd4k serve --model DIR`` on a free loopback port: ``{"base": .../v1, "name": served, "dir": DIR}``."""
    model_dir = str(tiny_checkpoint)
    log_path = tmp_path_factory.mktemp("clients-log") / "server.log"
    with hd4k_serve("--model", model_dir, "--log-level", "warning", log_path=log_path, start_timeout_s=90) as live:
        yield {"base": f"{live.base}/v1", "name": Path(model_dir).name, "dir": model_dir}


@pytest.fixture(scope="module")
def client(server: dict[str, str]) -> Iterator[Any]:
    with openai.OpenAI(base_url=server["base"], api_key="EMPTY", max_retries=0, timeout=60) as c:
        yield c


def _image_parts(path: Path | None = None, text: str = "What is it?") -> list[dict[str, Any]]:
    source: Any = path if path is not None else Image.new("RGB", (700, 340), "white")
    return [{"type": "image_url", "image_url": {"url": to_data_url(source)}}, {"type": "text", "text": text}]


# ----------------------------------------------------------------------------------------------------
# openai
# ----------------------------------------------------------------------------------------------------
def test_openai_models_list_and_retrieve(client: Any, server: dict[str, str]) -> None:
    assert [m.id for m in client.models.list().data] == [server["name"], server["dir"]]
    for name in (server["name"], server["dir"]):  # the directory has slashes
        model = client.models.retrieve(name)
        assert model.id == name and model.object == "model" and model.owned_by == "hd4k-tools"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-4o")
    assert caught.value.code == "model_not_found"


def test_openai_unknown_model_is_not_found(client: Any) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert caught.value.code == "model_not_found" and "gpt-4o" in caught.value.message
    assert caught.value.request_id  # the x-request-id of the error response


def test_openai_mm_processor_kwargs_choose_the_tiling(client: Any, server: dict[str, str]) -> None:
    for hd_num in (1, 4):
        answer = client.chat.completions.create(
            model=server["dir"],
            messages=[{"role": "user", "content": _image_parts()}],
            max_tokens=2,
            extra_body={"mm_processor_kwargs": {"hd_num": hd_num}},
        )
        assert answer.model_extra["hd4k"]["hd_nums"] == [hd_num]
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=server["name"],
            messages=[{"role": "user", "content": _image_parts()}],
            max_tokens=2,
            extra_body={"mm_processor_kwargs": {"hd_num": 0}},
        )


def test_openai_completions_whole_and_streamed(client: Any, server: dict[str, str]) -> None:
    whole = client.completions.create(model=server["name"], prompt="Describe a chart.", max_tokens=4)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].finish_reason in ("stop", "length") and isinstance(whole.choices[0].text, str)
    assert whole.usage.completion_tokens >= 1
    stream = client.completions.create(model=server["name"], prompt="Describe a chart.", max_tokens=4, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text  # greedy
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_openai_sees_x_request_id(client: Any, server: dict[str, str]) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=server["name"],
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        extra_headers={"x-request-id": "agent-7.call-3"},
    )
    assert raw.headers["x-request-id"] == "agent-7.call-3" and raw.parse().choices
    generated = client.models.with_raw_response.list().headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)


# ----------------------------------------------------------------------------------------------------
# LangChain and LlamaIndex
# ----------------------------------------------------------------------------------------------------
def test_langchain_chat_openai_with_image_path_and_mm_processor_kwargs(server: dict[str, str], tmp_path: Path) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    chart = tmp_path / "chart.png"
    Image.new("RGB", (640, 480), (240, 240, 240)).save(chart)
    llm = langchain_openai.ChatOpenAI(
        base_url=server["base"],
        api_key="EMPTY",
        model=server["dir"],
        max_tokens=3,
        max_retries=0,
        extra_body={"mm_processor_kwargs": {"hd_num": 4}},
    )
    message = llm.invoke([{"role": "user", "content": _image_parts(chart, "Which quarter grew most?")}])
    assert isinstance(message.content, str) and message.response_metadata["model_name"] == server["name"]
    chunks = list(llm.stream("Say hello"))
    assert chunks and all(isinstance(c.content, str) for c in chunks)
    with pytest.raises(openai.NotFoundError):
        langchain_openai.ChatOpenAI(base_url=server["base"], api_key="EMPTY", model="gpt-4o", max_retries=0).invoke(
            "hi"
        )
    bad = langchain_openai.ChatOpenAI(
        base_url=server["base"], api_key="EMPTY", model=server["name"], max_retries=0,
        extra_body={"mm_processor_kwargs": {"hd_num": 0}},
    )  # fmt: skip
    with pytest.raises(openai.BadRequestError):
        bad.invoke([{"role": "user", "content": _image_parts(chart)}])


def test_llamaindex_openai_like_default_completion_calls(server: dict[str, str]) -> None:
    openai_like = pytest.importorskip("llama_index.llms.openai_like")
    llm = openai_like.OpenAILike(
        api_base=server["base"], api_key="EMPTY", model=server["name"], max_tokens=4, max_retries=0, temperature=0
    )
    assert not llm.metadata.is_chat_model  # the default: complete() calls /v1/completions
    whole = llm.complete("Describe a chart.")
    assert isinstance(whole.text, str) and whole.raw is not None
    streamed = list(llm.stream_complete("Describe a chart."))
    assert streamed and streamed[-1].text == whole.text
    # chat() on a completion model goes through complete() as well
    assert isinstance(llm.chat([_chat_message("hi")]).message.content, str)
    wrong = openai_like.OpenAILike(api_base=server["base"], api_key="EMPTY", model="gpt-4o", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        wrong.complete("hi")


def _chat_message(text: str) -> Any:
    from llama_index.core.llms import ChatMessage

    return ChatMessage(role="user", content=text)


# ----------------------------------------------------------------------------------------------------
# The README's client snippets, as written
# ----------------------------------------------------------------------------------------------------
def _readme_block(after: str) -> str:
    """The first ```python block after the line containing ``after``."""
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    match = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert match, f"no python block after {after!r}"
    return match.group(1)


def _run_snippet(code: str, server: dict[str, str], folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # The README names the served model as a user would see it (the folder's name, or DIR as given).
    code = code.replace("http://gpu-box:8000/v1", server["base"])
    code = code.replace('"DIR"', repr(server["dir"])).replace('"internlm-xcomposer2-4khd-7b"', repr(server["dir"]))
    monkeypatch.chdir(folder)
    Image.new("RGB", (640, 480), (240, 240, 240)).save(folder / "chart.png")
    Image.new("RGB", (600, 800), "white").save(folder / "scan.png")
    namespace: dict[str, Any] = {"__name__": "readme_snippet"}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


@pytest.mark.slow  # the snippet reads a page (1024 new tokens) and asks ChatOpenAI (512): about a minute
def test_readme_client_snippet_runs_against_hd4k_serve(
    server: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("langchain_openai")
    pytest.importorskip("llama_index.llms.openai_like")
    code = _readme_block("**Clients.**")
    assert 'to_data_url("chart.png")' in code and "mm_processor_kwargs" in code
    namespace = _run_snippet(code, server, tmp_path, monkeypatch)
    assert namespace["llm"].model == server["dir"]
