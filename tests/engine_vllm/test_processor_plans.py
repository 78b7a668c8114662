"""The vLLM processor takes plans, never an hd_num (issue 18 item 1): ``apply`` plans each image once with
the family's ``plan_images`` and the tiler builds tensors from those plans; ``"auto"`` reserves the
prompt's own text tokens and the engine's cap. No engine is started: the processor pieces are called
directly with a stand-in for vLLM's model context."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

pytest.importorskip("vllm.multimodal")

from hd4k_tools.errors import HDNumOverBudgetError, InvalidHDNumError
from hd4k_tools.models.xcomposer2_4khd import tiling
from hd4k_tools.models.xcomposer2_4khd.vllm.processor import XComposer2MultiModalProcessor, XComposer2ProcessingInfo


class _Info(XComposer2ProcessingInfo):
    """The processing info over a stand-in context: the engine's hd_num and max_model_len only."""

    def __init__(self, engine_hd_num: Any, max_model_len: int = 16384) -> None:
        mm_config = SimpleNamespace(mm_processor_kwargs={"hd_num": engine_hd_num})
        model_config = SimpleNamespace(max_model_len=max_model_len, get_multimodal_config=lambda: mm_config)
        self.ctx = SimpleNamespace(model_config=model_config)


def test_the_tiler_builds_tensors_from_the_plans() -> None:
    images = [Image.new("RGB", (500, 300), "white"), Image.new("RGB", (300, 700), "black")]
    plans = tiling.plan_images(images, [4, 9], default_hd_num=25, context_length=16384, max_new_tokens=0)
    out = XComposer2MultiModalProcessor._call_hf_processor(None, {"images": images}, {"hd_plans": plans})  # type: ignore[arg-type]
    assert out["image_grid"].tolist() == [[p.rows, p.cols] for p in plans]
    assert out["image_num_crops"].tolist() == [1 + p.rows * p.cols for p in plans]
    with pytest.raises(RuntimeError, match="HD plans"):
        XComposer2MultiModalProcessor._call_hf_processor(None, {"images": images}, {"hd_num": (4, 9)})  # type: ignore[arg-type]


def test_plan_images_plans_once_with_the_prompt_and_the_engine_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = tiling._resolve_one

    def counting(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tiling, "_resolve_one", counting)
    images = [Image.new("RGB", (2000, 2000), "white")] * 2
    info = _Info(engine_hd_num="auto")
    short = info.plan_images("auto", images, text_tokens=10)
    assert len(calls) == 2
    long = info.plan_images("auto", images, text_tokens=9000)
    assert sum(p.num_tokens for p in long) + 9000 <= 16384
    assert long[0].hd_num < short[0].hd_num <= tiling.MAX_AUTO_HD_NUM
    capped = _Info(engine_hd_num=9).plan_images("auto", images, text_tokens=10)
    assert [p.hd_num for p in capped] == [9, 9]
    with pytest.raises(HDNumOverBudgetError):
        _Info(engine_hd_num=9).plan_images(16, images, text_tokens=10)
    with pytest.raises(InvalidHDNumError):
        info.plan_images(True, images, text_tokens=10)
