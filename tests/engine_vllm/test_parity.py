"""vLLM (through the plugin) against the native runner on the same tiny checkpoint, float32: identical
prompt ids, identical greedy tokens for 24 steps, first-step log-probs within 1e-4 over the whole
vocabulary; with chunked prefill (images split across steps) and prefix caching on."""

from __future__ import annotations

import functools

import numpy as np
import pytest

# A submodule, not "vllm": without vLLM, this folder itself would import as a namespace package "vllm".
pytest.importorskip("vllm.entrypoints.llm")

from PIL import Image
from vllm_parity import (
    ENGINE_HD_NUM,
    LOGPROB_TOL,
    MAX_BATCHED_TOKENS,
    STEPS,
    assert_parity,
    max_logprob_diff,
    native,
    request,
    run_vllm,
    vllm_prompt,
)

from hd4k_tools.errors import HDNumOverBudgetError, InputError, InvalidHDNumError
from hd4k_tools.models.xcomposer2_4khd.tiling import plan
from hd4k_tools.models.xcomposer2_4khd.vllm.model import XComposer2VLLMForCausalLM


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


LANDSCAPE = _image(520, 300, 1)
PORTRAIT = _image(280, 510, 2)
SQUARE = _image(200, 200, 3)

CASES = {
    "landscape": ([LANDSCAPE], "What does the picture show?", [ENGINE_HD_NUM]),
    "portrait": ([PORTRAIT], "Describe the image in detail.", [ENGINE_HD_NUM]),
    "two_images": ([LANDSCAPE, SQUARE], "Compare the two images.", [ENGINE_HD_NUM, ENGINE_HD_NUM]),
    "text_only": ([], "Write one line about charts.", []),
}


@pytest.fixture(scope="module")
def batch(engine, native_runner):
    """Every case submitted to vLLM at once (continuous batching), with its native reference."""
    reqs = {name: request(*case) for name, case in CASES.items()}
    got = run_vllm(engine, native_runner, [vllm_prompt(native_runner, r) for r in reqs.values()])
    return {name: (native(native_runner, r), g) for (name, r), g in zip(reqs.items(), got, strict=True)}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_native_runner(batch, case):
    ref, got = batch[case]
    assert_parity(ref, got)


def test_images_are_prefilled_in_several_chunks():
    # The parity above covers chunked prefill only if an image does not fit one scheduler step.
    for w, h in [(LANDSCAPE.width, LANDSCAPE.height), (PORTRAIT.width, PORTRAIT.height)]:
        assert plan(w, h, ENGINE_HD_NUM).num_tokens > 2 * MAX_BATCHED_TOKENS


def test_prefix_cache_hit_keeps_parity(engine, native_runner):
    first = request([PORTRAIT], "What colour dominates?", [ENGINE_HD_NUM])
    second = request([PORTRAIT], "Is there any text?", [ENGINE_HD_NUM])
    run_vllm(engine, native_runner, [vllm_prompt(native_runner, first)])
    (got,) = run_vllm(engine, native_runner, [vllm_prompt(native_runner, second)])
    image_tokens = plan(PORTRAIT.width, PORTRAIT.height, ENGINE_HD_NUM).num_tokens
    assert got.num_cached_tokens >= image_tokens // 2  # the system turn and (most of) the image came from the cache
    assert_parity(native(native_runner, second), got)


def test_per_request_hd_num(engine, native_runner):
    req = request([LANDSCAPE, SQUARE], "Which one is larger?", [2, 1])
    (got,) = run_vllm(engine, native_runner, [vllm_prompt(native_runner, req, hd_num=[2, 1])])
    assert_parity(native(native_runner, req), got)
    (auto,) = run_vllm(
        engine, native_runner, [vllm_prompt(native_runner, request([SQUARE], "Hi?", [1]), hd_num="auto")]
    )
    # "auto" may use up to the engine's budget: the square gets the grid hd_num=4 gives it.
    assert auto.prompt_ids.count(0) >= plan(SQUARE.width, SQUARE.height, ENGINE_HD_NUM).num_tokens


def test_hd_num_over_engine_budget_is_refused(engine, native_runner):
    req = request([LANDSCAPE], "What is it?", [ENGINE_HD_NUM])
    with pytest.raises(HDNumOverBudgetError, match=f"budget of {ENGINE_HD_NUM}"):
        run_vllm(engine, native_runner, [vllm_prompt(native_runner, req, hd_num=ENGINE_HD_NUM + 5)])
    with pytest.raises(InvalidHDNumError):
        run_vllm(engine, native_runner, [vllm_prompt(native_runner, req, hd_num=0)])
    with pytest.raises(InputError, match="Unknown mm_processor_kwargs"):
        run_vllm(engine, native_runner, [vllm_prompt(native_runner, req, max_tiles=3)])


def test_placeholder_count_must_match_images(engine, native_runner):
    req = request([LANDSCAPE], "What is it?", [ENGINE_HD_NUM])
    prompt = vllm_prompt(native_runner, req)
    prompt["multi_modal_data"] = {"image": [LANDSCAPE, SQUARE]}
    with pytest.raises(InputError, match="placeholder"):
        run_vllm(engine, native_runner, [prompt])


def test_literal_image_marker_in_chat_text_is_refused(engine):
    from vllm import SamplingParams

    messages = [{"role": "user", "content": [{"type": "text", "text": "Explain <ImageHere> please"}]}]
    with pytest.raises(Exception, match="ImageHere"):
        engine.chat(messages, SamplingParams(max_tokens=2), use_tqdm=False)


def test_chat_api_builds_the_native_prompt(engine, native_runner):
    from vllm import SamplingParams

    req = request([SQUARE], "What is this?", [ENGINE_HD_NUM])
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_pil", "image_pil": SQUARE}, {"type": "text", "text": "What is this?"}],
        }
    ]
    (out,) = engine.chat(messages, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    assert list(out.prompt_token_ids) == native(native_runner, req).prompt_ids


def _set_mode(engine, mode: str) -> None:
    engine.apply_model(functools.partial(XComposer2VLLMForCausalLM.set_plora_mode, mode=mode))
    engine.reset_prefix_cache()  # cached K/V were computed in the previous form


def test_static_shape_partial_lora_keeps_parity(engine, native_runner, batch):
    _set_mode(engine, "static")
    try:
        names = ["landscape", "two_images"]
        got = run_vllm(engine, native_runner, [vllm_prompt(native_runner, request(*CASES[n])) for n in names])
    finally:
        _set_mode(engine, "gather")
    for name, g in zip(names, got, strict=True):
        assert_parity(batch[name][0], g)


def test_negative_control_partial_lora_off_fails_parity(engine, native_runner, batch):
    _set_mode(engine, "off")
    try:
        (got,) = run_vllm(engine, native_runner, [vllm_prompt(native_runner, request(*CASES["landscape"]))])
    finally:
        _set_mode(engine, "gather")
    ref = batch["landscape"][0]
    assert got.prompt_ids == ref.prompt_ids  # same prompt, same vision path ...
    assert max_logprob_diff(ref, got) > 100 * LOGPROB_TOL  # ... but the decoder without Partial LoRA differs
    with pytest.raises(AssertionError):
        assert_parity(ref, got)
    assert sum(a == b for a, b in zip(got.tokens, ref.tokens, strict=False)) < STEPS
