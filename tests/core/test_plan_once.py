"""hd_num becomes an HDPlan once (``hd4k_tools.hd4k.plan_images``), and every path gives the same plan.

Before, ``hd_num="auto"`` on a 1000x1000 image was HD-100 through ``hd4k serve`` but HD-65 in process:
the server resolved "auto" with its own copy of the rules, without the HD-65 cap.
"""

from __future__ import annotations

from typing import Any

import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from hd4k_tools import HD4K, Message
from hd4k_tools.hd4k import MAX_AUTO_HD_NUM, plan_images
from hd4k_tools.inputs.images import to_data_url
from hd4k_tools.runtime.generation_config import GenerationConfig
from hd4k_tools.serve.app import create_app


class RecordingRunner:
    """Answers at once and keeps every request (a 16k-context model, as the real checkpoint)."""

    model_id = "recording"
    context_length = 16384

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def count_text_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, request: Any, *, cancel: Any = None) -> Any:
        from hd4k_tools.runtime.runner import RunnerResult

        self.requests.append(request)
        return RunnerResult(text="ok", model=self.model_id)

    def stream(self, request: Any, *, cancel: Any = None) -> Any:  # pragma: no cover - not used here
        raise NotImplementedError

    def close(self) -> None:
        pass


@pytest.mark.parametrize("size", [(1000, 1000), (3840, 1600), (600, 2000)])
@pytest.mark.parametrize("hd_num", ["auto", 9, None])
def test_server_and_in_process_give_the_same_plan(size: tuple[int, int], hd_num: Any) -> None:
    image = Image.new("RGB", size, "white")
    in_process = RecordingRunner()
    hd = HD4K(in_process)
    hd.chat("What is this?", [image], hd_num=hd_num, generation={"max_new_tokens": 64})

    served = RecordingRunner()
    client = TestClient(create_app(served, default_hd_num=25), raise_server_exceptions=False)
    content = [{"type": "image_url", "image_url": {"url": to_data_url(image)}}, {"type": "text", "text": "?"}]
    body: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "max_tokens": 64}
    if hd_num is not None:
        body["hd_num"] = hd_num
    assert client.post("/v1/chat/completions", json=body).status_code == 200

    (local_request,) = in_process.requests
    (server_request,) = served.requests
    assert local_request.plans() == server_request.plans()
    assert local_request.hd_plans and server_request.hd_plans  # planned once, carried with the request


def test_auto_on_a_square_page_is_capped_at_hd_65_everywhere() -> None:
    image = Image.new("RGB", (1000, 1000), "white")
    (plan,) = plan_images([image], "auto", default_hd_num=25, context_length=16384, max_new_tokens=64)
    assert plan.hd_num == MAX_AUTO_HD_NUM == 65
    served = RecordingRunner()
    client = TestClient(create_app(served), raise_server_exceptions=False)
    content = [{"type": "image_url", "image_url": {"url": to_data_url(image)}}, {"type": "text", "text": "?"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 64, "hd_num": "auto"}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    assert served.requests[0].hd_nums == (65,)


def test_a_plan_that_does_not_match_its_image_is_refused() -> None:
    from hd4k_tools.errors import InputError
    from hd4k_tools.runtime.runner import GenerationRequest

    image = Image.new("RGB", (500, 400), "white")
    other = Image.new("RGB", (400, 500), "white")
    plans = plan_images([other], 9, default_hd_num=25, context_length=16384, max_new_tokens=64)
    request = GenerationRequest.planned((Message.user(image, "?"),), plans, generation=GenerationConfig())
    with pytest.raises(InputError, match="plans do not match"):
        request.plans()
