"""Out of device memory mid-request (issue 12, item 10), injected: the native runner frees memory, retries
once at the next smaller hd_num, says so in the result, and stays usable; a second failure is a typed
DeviceError."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from hd4k_tools import HD4K, LocalRunner, errors
from hd4k_tools.models.xcomposer2_4khd.tiling import plan
from hd4k_tools.runtime.local import OOM_ERRORS, smaller_plan

GEN = {"max_new_tokens": 2, "num_beams": 1}
IMAGE = Image.new("RGB", (500, 400), (30, 120, 200))


@pytest.fixture()
def runner(tiny_model: Any) -> Iterator[LocalRunner]:
    local = LocalRunner(tiny_model, model_id="tiny", prefix_cache_bytes=0)
    yield local
    local.close()


def _fail(times: int, real: Callable[..., Any]) -> Callable[..., Any]:
    calls = {"n": 0}

    def patched(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= times:
            raise OOM_ERRORS[0]("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real(*args, **kwargs)

    return patched


def test_oom_error_types_are_torch_out_of_memory() -> None:
    assert torch.OutOfMemoryError in OOM_ERRORS or torch.cuda.OutOfMemoryError in OOM_ERRORS


def test_smaller_plan_changes_the_grid() -> None:
    p = plan(500, 400, 4)
    smaller = smaller_plan(p)
    assert smaller is not None and smaller.hd_num < 4 and smaller.num_tokens < p.num_tokens
    assert smaller_plan(plan(500, 400, 1)) is None


@pytest.mark.parametrize("where", ["encode_image", "forward"])
def test_oom_once_retries_at_a_smaller_hd_num(runner: LocalRunner, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    model = runner.model
    monkeypatch.setattr(model, where, _fail(1, getattr(model, where)))
    result = HD4K(runner).describe_image(IMAGE, hd_num=4, generation=GEN)
    used = result.plans[0].hd_num
    assert used == smaller_plan(plan(500, 400, 4)).hd_num  # type: ignore[union-attr]
    assert result.hd_num == used
    assert result.warnings and "out of device memory" in result.warnings[0] and "4" in result.warnings[0]
    monkeypatch.undo()
    again = HD4K(runner).describe_image(IMAGE, hd_num=4, generation=GEN)  # usable, full size again
    assert again.plans[0].hd_num == 4 and again.warnings == []


def test_oom_twice_is_a_device_error_and_the_runner_survives(
    runner: LocalRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = runner.model
    monkeypatch.setattr(model, "encode_image", _fail(2, model.encode_image))
    with pytest.raises(errors.DeviceError, match="again"):
        HD4K(runner).describe_image(IMAGE, hd_num=4, generation=GEN)
    monkeypatch.undo()
    assert HD4K(runner).describe_image(IMAGE, hd_num=2, generation=GEN).plans[0].hd_num == 2


def test_oom_at_the_smallest_hd_num_is_a_device_error(runner: LocalRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    model = runner.model
    monkeypatch.setattr(model, "encode_image", _fail(1, model.encode_image))
    with pytest.raises(errors.DeviceError, match="ran out of memory"):
        HD4K(runner).describe_image(IMAGE, hd_num=1, generation=GEN)


def test_oom_before_streaming_retries_and_the_stream_says_so(
    runner: LocalRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = runner.model
    monkeypatch.setattr(model, "encode_image", _fail(1, model.encode_image))
    stream = HD4K(runner).stream_describe_image(IMAGE, hd_num=4, generation=GEN)
    text = "".join(stream)
    assert isinstance(text, str)
    assert stream.result is not None and stream.result.plans[0].hd_num < 4 and stream.result.warnings
