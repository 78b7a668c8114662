"""Each image is planned once per request, on every entry path (issue 18 item 1), and ``hd_num="auto"``
reserves the prompt's own text tokens, so it never plans a request that overflows (issue 19 item 3).

Planning is counted where it happens: ``tiling._resolve_one`` turns one image's hd_num into its budget and
is called only by the one planner, ``plan_images`` (and by the public ``resolve_hd_num``). The engines
take the plans the request carries (``to_model_inputs`` accepts an ``HDPlan`` only), so a second call
would show up here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hd4k_tools import HD4K, Message, ToolSettings
from hd4k_tools.agent_tools import AgentTools
from hd4k_tools.inputs.images import to_data_url
from hd4k_tools.models.xcomposer2_4khd import tiling
from hd4k_tools.runtime.generation_config import GenerationConfig

GEN = {"max_new_tokens": 2}


class PlanCounter:
    def __init__(self) -> None:
        self.calls = 0

    def reset(self) -> None:
        self.calls = 0


@pytest.fixture
def planned(monkeypatch: pytest.MonkeyPatch) -> Iterator[PlanCounter]:
    counter = PlanCounter()
    original = tiling._resolve_one

    def counting(*args: Any, **kwargs: Any) -> int:
        counter.calls += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(tiling, "_resolve_one", counting)
    yield counter


def _image(color: tuple[int, int, int], size: tuple[int, int] = (120, 90)) -> Image.Image:
    return Image.new("RGB", size, color)


def test_facade_plans_each_image_once(hd4k_tiny: HD4K, planned: PlanCounter) -> None:
    hd4k_tiny.describe_image(_image((200, 30, 30)), hd_num=1, generation=GEN)
    assert planned.calls == 1
    planned.reset()
    hd4k_tiny.chat("Compare.", [_image((1, 2, 3)), _image((9, 8, 7))], hd_num="auto", generation=GEN)
    assert planned.calls == 2
    planned.reset()
    stream = hd4k_tiny.stream_describe_image(_image((5, 5, 5)), hd_num=2, generation=GEN)
    "".join(stream)
    assert planned.calls == 1


def test_server_plans_each_image_once_from_its_header(hd4k_tiny: HD4K, planned: PlanCounter) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hd4k_tools.serve.app import create_app

    client = TestClient(create_app(hd4k_tiny.runner), raise_server_exceptions=False)
    images = [{"type": "image_url", "image_url": {"url": to_data_url(_image(c))}} for c in ((1, 1, 1), (200, 9, 9))]
    body = {"messages": [{"role": "user", "content": [*images, {"type": "text", "text": "?"}]}], "max_tokens": 2}
    for stream in (False, True):
        planned.reset()
        response = client.post("/v1/chat/completions", json={**body, "stream": stream, "hd_num": "auto"})
        assert response.status_code == 200, response.text
        assert planned.calls == 2  # header planning is the only planning: no second pass after decoding


def test_mcp_tool_call_plans_once(hd4k_tiny: HD4K, planned: PlanCounter, tmp_path: Path) -> None:
    pytest.importorskip("mcp")
    from mcp import Client

    from hd4k_tools.mcp.server import build_server

    _image((10, 200, 10)).save(tmp_path / "photo.png")
    server = build_server(AgentTools(hd4k_tiny, ToolSettings(allowed_root=tmp_path, max_new_tokens=2)))

    async def call() -> Any:
        async with Client(server) as client:
            return await client.call_tool("describe_image", {"image": "photo.png", "hd_num": 1, "detail": "brief"})

    result = asyncio.run(call())
    assert not result.is_error, result
    assert planned.calls == 1


def test_ingest_plans_each_page_once(hd4k_tiny: HD4K, planned: PlanCounter, tmp_path: Path) -> None:
    from hd4k_tools import ingest

    corpus = tmp_path / "in"
    corpus.mkdir()
    _image((30, 30, 200)).save(corpus / "a.png")
    _image((200, 200, 30), (90, 120)).save(corpus / "b.png")
    ingest(corpus, tmp_path / "out", hd=hd4k_tiny, hd_num=1, generation=GEN, progress=False)
    assert planned.calls == 2


def test_a_request_built_from_hd_nums_is_planned_at_construction_only(planned: PlanCounter) -> None:
    from hd4k_tools.runtime.runner import GenerationRequest

    request = GenerationRequest((Message.user(_image((1, 1, 1)), "?"),), hd_nums=(4,))
    assert planned.calls == 1
    for _ in range(3):
        assert request.plans()[0].hd_num == 4
    assert planned.calls == 1  # plans() returns the plans; it never re-plans


# ----------------------------------------------------------------------------------------------------
# "auto" counts the prompt (issue 19 item 3)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_images", [2, 4])
@pytest.mark.parametrize("words", [0, 400, 2000])
def test_auto_never_plans_an_overflow(hd4k_tiny: HD4K, num_images: int, words: int) -> None:
    """Large square pages at "auto" fill the context: with the fixed 256-token margin a long question
    overflowed (``The prompt needs 16418 tokens ... context holds 16384``). The native engine's own context
    check (``prepare``) accepts every request the facade plans."""
    question = "Compare these pages and list every difference " + " ".join(["carefully"] * words)
    images = [_image((i * 40, 90, 200), (2000, 2000)) for i in range(num_images)]
    for max_new_tokens in (16, 1024):
        gen = GenerationConfig(max_new_tokens=max_new_tokens)
        request = hd4k_tiny.build_request([Message.user(*images, question)], hd_num="auto", generation=gen)
        prepared = hd4k_tiny.runner.prepare(request)  # raises ContextOverflowError on an overflow
        assert prepared.budget <= hd4k_tiny.runner.context_length
        # The context is used: the images got more than hd_num=1 unless the prompt left no room.
        assert any(p.hd_num > 1 for p in request.plans()) or words == 2000


def test_auto_on_the_server_counts_the_prompt(hd4k_tiny: HD4K) -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hd4k_tools.serve.app import create_app

    client = TestClient(create_app(hd4k_tiny.runner), raise_server_exceptions=False)
    question = "Describe both pages in full detail " + " ".join(["please"] * 1500)
    images = [
        {"type": "image_url", "image_url": {"url": to_data_url(_image(c, (2000, 2000)))}}
        for c in ((1, 1, 1), (9, 9, 9))
    ]
    body = {
        "messages": [{"role": "user", "content": [*images, {"type": "text", "text": question}]}],
        "max_tokens": 1,
        "hd_num": "auto",
    }
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["prompt_tokens"] + 1 <= hd4k_tiny.runner.context_length


def test_the_public_tiling_functions_share_the_auto_cap() -> None:
    for fn in (
        lambda: tiling.auto_hd_num(336, 336, 10**6),
        lambda: tiling.resolve_hd_num("auto", 336, 336, default=25, max_tokens=10**6),
        lambda: (
            tiling.plan_images(
                [_image((0, 0, 0), (336, 336))], "auto", default_hd_num=25, context_length=10**6, max_new_tokens=0
            )[0].hd_num
        ),
    ):
        assert fn() == tiling.MAX_AUTO_HD_NUM
