"""Prompt format and assembly (docs/model.md §4) on the tiny checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from hd4k_tools.errors import ContextOverflowError, InputError
from hd4k_tools.models.xcomposer2_4khd.prompt import (
    DEFAULT_META_INSTRUCTION,
    IM_END,
    IM_START,
    IMAGE_PLACEHOLDER,
    build_eval_prompt,
    build_prompt,
    check_context,
    count_prompt_tokens,
    largest_fitting_hd_num,
)
from hd4k_tools.models.xcomposer2_4khd.prompt_embeds import PromptInputs, assemble_inputs
from hd4k_tools.models.xcomposer2_4khd.tiling import plan, plan_for_image, to_model_inputs


def _fake_image(length: int, dim: int, seed: int) -> torch.Tensor:
    return torch.randn(length, dim, generator=torch.Generator().manual_seed(seed))


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of the True runs of a 1-D bool tensor."""
    runs: list[tuple[int, int]] = []
    start = None
    for i, v in enumerate([*mask.tolist(), False]):
        if v and start is None:
            start = i
        elif not v and start is not None:
            runs.append((start, i))
            start = None
    return runs


# ----------------------------------------------------------------------------------------------------
# Strings
# ----------------------------------------------------------------------------------------------------
def test_default_meta_instruction_is_the_official_text() -> None:
    lines = DEFAULT_META_INSTRUCTION.split("\n")
    assert len(lines) == 4
    assert lines[0] == "You are an AI assistant whose name is InternLM-XComposer (浦语·灵笔)."
    assert lines[1].startswith("- InternLM-XComposer (浦语·灵笔) is a multi-modality conversational")
    assert lines[1].endswith("It is designed to be helpful, honest, and harmless.")
    assert "上海人工智能实验室" in lines[1]
    assert lines[2].endswith("such as English and 中文.")
    assert lines[3].endswith("based on the provided image.")
    assert not DEFAULT_META_INSTRUCTION.endswith("\n")


def test_build_prompt_layout() -> None:
    assert IM_START == "[UNUSED_TOKEN_146]" and IM_END == "[UNUSED_TOKEN_145]"
    assert IMAGE_PLACEHOLDER == "<ImageHere>"
    p = build_prompt("<ImageHere>What is this?", history=[("Hi", "Hello!")], meta_instruction="Be brief.")
    assert p == (
        "[UNUSED_TOKEN_146]system\nBe brief.[UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\nHi[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\nHello![UNUSED_TOKEN_145]\n"
        "[UNUSED_TOKEN_146]user\n<ImageHere>What is this?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    )
    # An empty meta instruction drops the system turn.
    assert build_prompt("q", meta_instruction="") == (
        "[UNUSED_TOKEN_146]user\nq[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    )
    assert build_prompt("q").startswith(f"[UNUSED_TOKEN_146]system\n{DEFAULT_META_INSTRUCTION}[UNUSED_TOKEN_145]\n")
    assert build_eval_prompt("Q?") == (
        "<ImageHere>[UNUSED_TOKEN_146]user\nQ?[UNUSED_TOKEN_145]\n[UNUSED_TOKEN_146]assistant\n"
    )


# ----------------------------------------------------------------------------------------------------
# Token layout on the tiny tokenizer/model
# ----------------------------------------------------------------------------------------------------
def test_turn_markers_are_single_tokens(tiny_model) -> None:
    tok = tiny_model.tokenizer
    assert tok.encode(IM_START, add_bos=False) == [tok.im_start_id]
    assert tok.encode(IM_END, add_bos=False) == [tok.im_end_id]
    ids = tok.encode(build_prompt("hello", meta_instruction=""), add_bos=False)
    assert ids.count(tok.im_start_id) == 2 and ids.count(tok.im_end_id) == 1


def test_assemble_single_image_layout(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    dim = model.config.hidden_size
    image = _fake_image(7, dim, seed=1)
    prompt = build_prompt("<ImageHere>Describe the chart.", meta_instruction="Be brief.")
    out = assemble_inputs(model, tok, prompt, [image], max_length=10_000)
    assert isinstance(out, PromptInputs)

    before, after = prompt.split(IMAGE_PLACEHOLDER)
    ids_before = tok.encode(before, add_bos=True)
    ids_after = tok.encode(after, add_bos=True)  # the quirk: BOS after the image too (docs/model.md §4)
    expected_ids = [*ids_before, *([-1] * 7), *ids_after]
    assert out.input_ids.shape == (1, len(expected_ids))
    assert out.input_ids[0].tolist() == expected_ids
    assert ids_before[0] == tok.bos_id and ids_after[0] == tok.bos_id
    assert out.input_ids[0].tolist().count(tok.bos_id) == 2
    assert out.length == len(expected_ids) == out.num_text_tokens + out.num_image_tokens
    assert out.num_image_tokens == 7 and out.num_images == 1

    # im_mask is True exactly on the image positions.
    assert out.im_mask.dtype == torch.bool and out.im_mask.shape == (1, out.length)
    assert _runs(out.im_mask[0]) == [(len(ids_before), len(ids_before) + 7)]
    assert torch.equal(out.im_mask[0], out.input_ids[0] == -1)

    # Embeddings: the image rows are the image, the text rows the token embeddings.
    assert out.inputs_embeds.shape == (1, out.length, dim)
    s = len(ids_before)
    assert torch.equal(out.inputs_embeds[0, s : s + 7], image)
    text_pos = ~out.im_mask[0]
    expected_text = model.embed_tokens(torch.tensor(ids_before + ids_after))
    assert torch.equal(out.inputs_embeds[0, text_pos], expected_text)


def test_assemble_multiple_images(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    dim = model.config.hidden_size
    images = [_fake_image(5, dim, 1), _fake_image(3, dim, 2)]
    prompt = build_prompt("Compare <ImageHere> with <ImageHere>please.", meta_instruction="")
    out = assemble_inputs(model, tok, prompt, images, max_length=10_000)
    parts = prompt.split(IMAGE_PLACEHOLDER)
    part_ids = [tok.encode(p, add_bos=True) for p in parts]
    runs = _runs(out.im_mask[0])
    assert runs == [
        (len(part_ids[0]), len(part_ids[0]) + 5),
        (len(part_ids[0]) + 5 + len(part_ids[1]), len(part_ids[0]) + 5 + len(part_ids[1]) + 3),
    ]
    ids = out.input_ids[0].tolist()
    for _start, end in runs:  # every text part after an image starts with BOS
        assert ids[end] == tok.bos_id
    assert out.num_images == 2 and out.num_image_tokens == 8
    assert torch.equal(out.inputs_embeds[0, runs[1][0] : runs[1][1]], images[1])


def test_adjacent_images_and_empty_parts_get_no_bos(tiny_model) -> None:
    """Empty text parts (image at the start, two images in a row) are skipped, as officially."""
    model, tok = tiny_model.model, tiny_model.tokenizer
    dim = model.config.hidden_size
    prompt = "<ImageHere><ImageHere>"
    out = assemble_inputs(model, tok, prompt, [_fake_image(2, dim, 1), _fake_image(2, dim, 2)], max_length=100)
    assert out.input_ids[0].tolist() == [-1, -1, -1, -1]
    assert out.num_text_tokens == 0


def test_eval_layout_bos_only_at_start(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    prompt = build_eval_prompt("What is the total?")
    image = _fake_image(4, model.config.hidden_size, 3)
    out = assemble_inputs(model, tok, prompt, [image], max_length=1000, bos_each_part=False)
    text = prompt.split(IMAGE_PLACEHOLDER)[1]
    # <s> + IMAGE + [UNUSED_TOKEN_146]user\n... without a second BOS (docs/model.md §4, VLMEvalKit model_gen).
    assert out.input_ids[0].tolist() == [tok.bos_id, -1, -1, -1, -1, *tok.encode(text, add_bos=False)]
    assert out.input_ids[0, 5].item() == tok.im_start_id
    assert count_prompt_tokens(tok, prompt, [4], bos_each_part=False) == out.length


def test_count_prompt_tokens_matches_assembly(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    dim = model.config.hidden_size
    prompt = build_prompt("<ImageHere>Read it. <ImageHere>And this.", history=[("a", "b")])
    images = [_fake_image(11, dim, 1), _fake_image(6, dim, 2)]
    out = assemble_inputs(model, tok, prompt, images, max_length=100_000)
    assert count_prompt_tokens(tok, prompt, [11, 6]) == out.length
    assert check_context(tok, prompt, [11, 6], max_length=out.length) == out.length


@pytest.mark.parametrize(("prompt", "num_images"), [("no placeholder", 1), ("<ImageHere><ImageHere>", 1), ("x", 2)])
def test_placeholder_count_mismatch(tiny_model, prompt: str, num_images: int) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    images = [_fake_image(2, model.config.hidden_size, i) for i in range(num_images)]
    with pytest.raises(InputError, match="placeholder") as info:
        assemble_inputs(model, tok, prompt, images, max_length=100)
    assert isinstance(info.value, ValueError)
    with pytest.raises(InputError, match="placeholder"):
        count_prompt_tokens(tok, prompt, [2] * num_images)


def test_text_only_prompt(tiny_model) -> None:
    model, tok = tiny_model.model, tiny_model.tokenizer
    prompt = build_prompt("Hello there")
    out = assemble_inputs(model, tok, prompt, [], max_length=10_000)
    assert out.input_ids[0].tolist() == tok.encode(prompt, add_bos=True)
    assert not out.im_mask.any() and out.num_image_tokens == 0
    with pytest.raises(InputError, match="empty"):
        assemble_inputs(model, tok, "", [], max_length=10)


# ----------------------------------------------------------------------------------------------------
# Context overflow
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_context_model(tmp_path_factory: pytest.TempPathFactory):
    """The tiny checkpoint with ``max_length`` 2000, so a real HD-16 image overflows."""
    from hd4k_tools.models.xcomposer2_4khd import load_pretrained
    from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

    path: Path = make_tiny_checkpoint(tmp_path_factory.mktemp("short_ctx"), config_overrides={"max_length": 2000})
    return load_pretrained(path, dtype="float32", device="cpu", progress=False)


def test_context_overflow_suggests_largest_fitting_hd_num(short_context_model) -> None:
    model, tok, config = short_context_model.model, short_context_model.tokenizer, short_context_model.config
    assert config.max_length == 2000
    width, height, hd_num = 1000, 800, 16
    image = Image.new("RGB", (width, height), (200, 120, 40))
    prompt = build_prompt("<ImageHere>What does the chart show?")
    image_tokens = plan(width, height, hd_num).num_tokens
    num_text = count_prompt_tokens(tok, prompt, [0])
    assert num_text + image_tokens > config.max_length

    # Brute force: the largest n whose plan fits next to the text.
    fitting = [n for n in range(1, hd_num) if num_text + plan(width, height, n).num_tokens <= config.max_length]
    expected = max(fitting)
    assert largest_fitting_hd_num(num_text, [(width, height)], config.max_length) == expected

    # Before the vision tower (cheap check) ...
    with pytest.raises(ContextOverflowError) as early:
        check_context(
            tok, prompt, [image_tokens], max_length=config.max_length, image_sizes=[(width, height)], hd_num=hd_num
        )
    # ... and at assembly, with real image embeddings.
    embeds = model.encode_image(to_model_inputs(image, plan_for_image(image, hd_num)))
    assert embeds.shape[0] == image_tokens
    with pytest.raises(ContextOverflowError) as late:
        assemble_inputs(
            model,
            tok,
            prompt,
            [embeds],
            max_length=config.max_length,
            image_sizes=[(width, height)],
            hd_num=hd_num,
        )
    for info in (early, late):
        err = info.value
        msg = str(err)
        assert isinstance(err, ValueError)
        assert str(num_text + image_tokens) in msg  # total
        assert str(config.max_length) in msg  # limit
        assert f"{image_tokens} image tokens" in msg
        assert f"hd_num={expected}" in msg
        assert err.suggested_hd_num == expected  # type: ignore[attr-defined]
        assert err.total_tokens == num_text + image_tokens  # type: ignore[attr-defined]

    # The suggestion really fits.
    small = model.encode_image(to_model_inputs(image, plan_for_image(image, expected)))
    ok = assemble_inputs(model, tok, prompt, [small], max_length=config.max_length)
    assert ok.length <= config.max_length


def test_overflow_with_several_images_and_nothing_fits() -> None:
    sizes = [(3000, 1000), (1000, 3000)]
    best = largest_fitting_hd_num(100, sizes, 4000)
    assert best is not None
    assert 100 + sum(plan(w, h, best).num_tokens for w, h in sizes) <= 4000
    assert 100 + sum(plan(w, h, best + 1).num_tokens for w, h in sizes) > 4000
    # hd_num=1 costs (1+1)*144 + 1 + 2*12 = 313 tokens per image.
    assert largest_fitting_hd_num(100, sizes, 700) is None
    assert largest_fitting_hd_num(100, [], 700) is None
