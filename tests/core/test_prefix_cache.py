"""Prefix KV cache: generation from a cached prefix equals the uncached path; keys; runner wiring."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from PIL import Image

from hd4k_tools.models.xcomposer2_4khd import KVCache, KVPrefix
from hd4k_tools.models.xcomposer2_4khd.prompt import build_eval_prompt, build_prompt
from hd4k_tools.models.xcomposer2_4khd.prompt_embeds import PromptInputs, assemble_inputs
from hd4k_tools.models.xcomposer2_4khd.tiling import plan, plan_for_image, to_model_inputs
from hd4k_tools.runtime.generation import GenerationConfig, GenerationOutput, generate, iter_tokens
from hd4k_tools.runtime.kv_prefix_cache import (
    PrefixKey,
    PrefixKVCache,
    PromptSplit,
    split_at_last_image,
    suffix_inputs,
)
from hd4k_tools.runtime.local import LocalRunner
from hd4k_tools.runtime.runner import GenerationRequest, Message

NO_STOP: frozenset[int] = frozenset()
CHAT = "chat"
EVAL = "eval"


class Recorder:
    """Wraps the model and records each forward's last-position logits and input positions."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.config = model.config
        self.calls: list[dict[str, torch.Tensor]] = []

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def parameters(self):
        return self.model.parameters()

    def __call__(self, embeds, im_mask, input_pos, cache, **kwargs) -> torch.Tensor:
        logits = self.model(embeds, im_mask, input_pos, cache, **kwargs)
        self.calls.append({"input_pos": input_pos.clone(), "logits": logits[:, -1].clone()})
        return logits


def _image(seed: int, size: tuple[int, int] = (420, 300)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def _prompt(layout: str, question: str) -> tuple[str, bool]:
    """``(prompt, bos_each_part)`` with one image, as LocalRunner.prompt_text builds it."""
    if layout == EVAL:
        return build_eval_prompt(question), False
    return build_prompt("<ImageHere>" + question), True


@pytest.fixture(scope="module")
def image_embeds(tiny_model) -> torch.Tensor:
    """A real image through the tiny vision tower at HD-2."""
    with torch.inference_mode():
        return tiny_model.model.encode_image(to_model_inputs(_image(1), plan_for_image(_image(1), 2)))


def _full_and_split(tiny_model, embeds: torch.Tensor, layout: str, question: str) -> tuple[PromptInputs, PromptSplit]:
    model, tok = tiny_model.model, tiny_model.tokenizer
    prompt, bos = _prompt(layout, question)
    full = assemble_inputs(model, tok, prompt, [embeds], max_length=model.config.max_length, bos_each_part=bos)
    split = split_at_last_image(tok, prompt, [embeds.shape[0]], bos_each_part=bos)
    assert split is not None
    return full, split


def _prefix_of(tiny_model, full: PromptInputs, split: PromptSplit) -> KVPrefix:
    """The prefix K/V as the runner stores it: captured from a generation's prefill of the full prompt."""
    box: list[KVPrefix] = []
    generate(
        tiny_model.model,
        full,
        GenerationConfig(max_new_tokens=1),
        stop_ids=NO_STOP,
        on_prefill=lambda cache: box.append(cache.snapshot(split.prefix_length)),
    )
    return box[0]


# ----------------------------------------------------------------------------------------------------
# Splitting the prompt
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [CHAT, EVAL])
def test_split_matches_the_assembled_prompt(tiny_model, image_embeds, layout: str) -> None:
    full, split = _full_and_split(tiny_model, image_embeds, layout, "What is the total?")
    mask = full.im_mask[0]
    last_image = int(mask.nonzero().max())
    assert split.prefix_length == last_image + 1  # the prefix ends right after the last image
    assert split.total_length == full.length
    assert list(split.suffix_ids) == full.input_ids[0, split.prefix_length :].tolist()
    assert not mask[split.prefix_length :].any()  # the suffix is text only
    text_before = [t for t in full.input_ids[0, : split.prefix_length].tolist() if t != -1]
    assert [t for ids in split.prefix_text_ids for t in ids] == text_before
    # Eval layout: `<s>` + image; chat layout: the system turn and the user tag precede the image.
    tok = tiny_model.tokenizer
    if layout == EVAL:
        assert split.prefix_text_ids == ((tok.bos_id,),)
    else:
        assert len(split.prefix_text_ids[0]) > 10 and split.prefix_text_ids[0][0] == tok.bos_id


def test_split_none_without_images_or_suffix(tiny_model) -> None:
    tok = tiny_model.tokenizer
    assert split_at_last_image(tok, build_prompt("no image here"), []) is None
    assert split_at_last_image(tok, "Look: <ImageHere>", [10]) is None  # nothing after the image
    two = split_at_last_image(tok, "a<ImageHere>b<ImageHere>c", [10, 20])
    assert two is not None and len(two.prefix_text_ids) == 2
    assert two.prefix_length == len(two.prefix_text_ids[0]) + 10 + len(two.prefix_text_ids[1]) + 20


def test_keys_differ_by_question_prefix_image_hd_num_dtype(tiny_model) -> None:
    tok = tiny_model.tokenizer
    prompt, bos = _prompt(CHAT, "first?")
    other_question = split_at_last_image(tok, _prompt(CHAT, "second?")[0], [10], bos_each_part=bos)
    split = split_at_last_image(tok, prompt, [10], bos_each_part=bos)
    assert split is not None and other_question is not None
    key = split.key([("hash-a", 4)], torch.float32, "cpu")
    assert key == other_question.key([("hash-a", 4)], "torch.float32", torch.device("cpu"))  # same prefix
    assert key != split.key([("hash-b", 4)], torch.float32, "cpu")
    assert key != split.key([("hash-a", 2)], torch.float32, "cpu")
    assert key != split.key([("hash-a", 4)], torch.bfloat16, "cpu")
    eval_split = split_at_last_image(tok, _prompt(EVAL, "first?")[0], [10], bos_each_part=False)
    assert eval_split is not None and eval_split.key([("hash-a", 4)], torch.float32, "cpu") != key
    with pytest.raises(ValueError, match="image keys"):
        split.key([], torch.float32, "cpu")


# ----------------------------------------------------------------------------------------------------
# Generation from a prefix equals the uncached path
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [CHAT, EVAL])
def test_greedy_from_prefix_equals_full_prefill(tiny_model, image_embeds, layout: str) -> None:
    model = tiny_model.model
    first, split = _full_and_split(tiny_model, image_embeds, layout, "Describe the picture in detail.")
    prefix = _prefix_of(tiny_model, first, split)
    # A different question about the same image reuses the prefix.
    full, split2 = _full_and_split(tiny_model, image_embeds, layout, "What is in the top row?")
    assert split2.prefix_length == split.prefix_length == prefix.length
    cfg = GenerationConfig(max_new_tokens=10)
    plain, cached = Recorder(model), Recorder(model)
    a = generate(plain, full, cfg, stop_ids=NO_STOP)
    b = generate(cached, suffix_inputs(model, split2), cfg, stop_ids=NO_STOP, prefix=prefix)
    assert a.token_ids == b.token_ids and len(set(a.token_ids)) > 1
    assert b.num_prompt_tokens == a.num_prompt_tokens == full.length
    # Only the question is prefilled, at its absolute positions.
    assert cached.calls[0]["input_pos"].tolist() == list(range(prefix.length, full.length))
    assert [c["input_pos"].tolist() for c in cached.calls[1:]] == [c["input_pos"].tolist() for c in plain.calls[1:]]
    for x, y in zip(plain.calls, cached.calls, strict=True):
        torch.testing.assert_close(y["logits"], x["logits"], atol=1e-5, rtol=0)


def test_prefix_equals_a_prefill_of_the_prefix_alone(tiny_model, image_embeds) -> None:
    """The captured K/V equal those of prefilling only the prefix (causal attention)."""
    model = tiny_model.model
    full, split = _full_and_split(tiny_model, image_embeds, CHAT, "Question?")
    prefix = _prefix_of(tiny_model, full, split)
    p = split.prefix_length
    with torch.inference_mode():
        alone = KVCache(model.config, 1, p, model.dtype, model.device)
        model(full.inputs_embeds[:, :p], full.im_mask[:, :p], torch.arange(p), alone)
    torch.testing.assert_close(prefix.k, alone.k, atol=1e-5, rtol=0)
    torch.testing.assert_close(prefix.v, alone.v, atol=1e-5, rtol=0)
    cfg = model.config
    assert prefix.k.shape == (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, p, cfg.head_dim)
    assert prefix.nbytes() == 2 * prefix.k.numel() * 4


def test_three_beams_from_prefix_equal_full_prefill(tiny_model, image_embeds) -> None:
    model = tiny_model.model
    first, split = _full_and_split(tiny_model, image_embeds, EVAL, "first question")
    prefix = _prefix_of(tiny_model, first, split)
    full, split2 = _full_and_split(tiny_model, image_embeds, EVAL, "Describe the picture in detail.")
    cfg = GenerationConfig(max_new_tokens=8, num_beams=3)
    a = generate(model, full, cfg, stop_ids=NO_STOP)
    b = generate(model, suffix_inputs(model, split2), cfg, stop_ids=NO_STOP, prefix=prefix)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8
    assert a.score == pytest.approx(b.score, abs=1e-5)


def test_sampling_and_streaming_from_prefix(tiny_model, image_embeds) -> None:
    model = tiny_model.model
    full, split = _full_and_split(tiny_model, image_embeds, CHAT, "Describe it.")
    prefix = _prefix_of(tiny_model, full, split)
    cfg = GenerationConfig(max_new_tokens=8, do_sample=True, seed=3, temperature=1.3)
    a = generate(model, full, cfg, stop_ids=NO_STOP)
    box: list[GenerationOutput] = []
    streamed = list(iter_tokens(model, suffix_inputs(model, split), cfg, stop_ids=NO_STOP, prefix=prefix, output=box))
    assert streamed == a.token_ids == box[0].token_ids


def test_on_prefill_sees_the_whole_prompt_and_prefix_is_not_modified(tiny_model, image_embeds) -> None:
    model = tiny_model.model
    full, split = _full_and_split(tiny_model, image_embeds, CHAT, "Describe it.")
    prefix = _prefix_of(tiny_model, full, split)
    k_before, v_before = prefix.k.clone(), prefix.v.clone()
    seen: list[tuple[int, int]] = []

    def hook(cache: KVCache) -> None:
        seen.append((cache.batch_size, cache.length))

    generate(
        model,
        suffix_inputs(model, split),
        GenerationConfig(max_new_tokens=4, num_beams=3),
        stop_ids=NO_STOP,
        prefix=prefix,
        on_prefill=hook,
    )
    assert seen == [(1, full.length)]  # once, one row, prefix included
    assert torch.equal(prefix.k, k_before) and torch.equal(prefix.v, v_before)


def test_prefix_must_match_dtype_and_shape(tiny_model, image_embeds) -> None:
    model = tiny_model.model
    full, split = _full_and_split(tiny_model, image_embeds, CHAT, "q")
    prefix = _prefix_of(tiny_model, full, split)
    suffix = suffix_inputs(model, split)
    half = KVPrefix(prefix.k.half(), prefix.v.half())
    with pytest.raises(ValueError, match="dtype/device"):
        generate(model, suffix, GenerationConfig(max_new_tokens=2), stop_ids=NO_STOP, prefix=half)
    short = KVPrefix(prefix.k[1:], prefix.v[1:])  # one layer missing
    with pytest.raises(ValueError, match="do not fit"):
        generate(model, suffix, GenerationConfig(max_new_tokens=2), stop_ids=NO_STOP, prefix=short)
    with pytest.raises(ValueError, match="n_layers, 1"):
        KVPrefix(prefix.k, prefix.v[:, :, :1])


# ----------------------------------------------------------------------------------------------------
# The cache itself
# ----------------------------------------------------------------------------------------------------
def _fake_prefix(positions: int) -> KVPrefix:
    k = torch.zeros(2, 1, 2, positions, 4)  # 64 * positions bytes per tensor
    return KVPrefix(k, k.clone())


def _key(name: str) -> PrefixKey:
    return PrefixKey(((1, 2),), ((name, 4),), "torch.float32", "cpu")


def test_cache_lru_byte_bound_and_counters() -> None:
    cache = PrefixKVCache(max_bytes=3 * 2 * 64 * 10)  # three 10-position prefixes
    for name in "abc":
        assert cache.put(_key(name), _fake_prefix(10))
    assert cache.get(_key("a")) is not None  # a is now the most recent
    cache.put(_key("d"), _fake_prefix(10))
    assert cache.keys() == [_key("c"), _key("a"), _key("d")]
    assert cache.get(_key("b")) is None
    assert cache.stats() == {
        "entries": 3,
        "current_bytes": 3 * 1280,
        "max_bytes": 3 * 1280,
        "hits": 1,
        "misses": 1,
        "evictions": 1,
    }
    assert cache.put(_key("big"), _fake_prefix(40)) is False  # larger than the whole budget
    with pytest.raises(TypeError):
        cache.put(_key("x"), torch.zeros(3))  # type: ignore[arg-type]


def test_capture_skips_a_prefix_that_cannot_fit(tiny_model) -> None:
    model = tiny_model.model
    with torch.inference_mode():
        cache = model.make_cache(1, 16)
        model(model.embed_tokens(list(range(5, 15)))[None], None, torch.arange(10), cache)
        small = PrefixKVCache(max_bytes=100)
        small.capture(_key("a"), 10)(cache)
        assert len(small) == 0
        roomy = PrefixKVCache()
        roomy.capture(_key("a"), 6)(cache)
    stored = roomy.get(_key("a"))
    assert stored is not None and stored.length == 6
    assert torch.equal(stored.k, cache.k[:, :1, :, :6])


# ----------------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------------
FAST = GenerationConfig(max_new_tokens=6)


def _request(image: Image.Image, question: str, hd_num: int = 2, layout: str = CHAT, **gen: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message.user(image, question),),
        hd_nums=(hd_num,),
        generation=FAST.replace(**gen) if gen else FAST,
        layout=layout,  # type: ignore[arg-type]
    )


def _count_vision(monkeypatch: pytest.MonkeyPatch, model: Any) -> list[int]:
    calls: list[int] = []
    original: Callable[..., torch.Tensor] = model.encode_image

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "encode_image", counting)
    return calls


@pytest.mark.parametrize("layout", [CHAT, EVAL])
def test_runner_follow_up_hits_and_answers_like_uncached(tiny_model, monkeypatch, layout: str) -> None:
    vision = _count_vision(monkeypatch, tiny_model.model)
    runner = LocalRunner(tiny_model)
    reference = LocalRunner(tiny_model, prefix_cache_bytes=0, cache_bytes=0)  # no cache at all
    img = _image(7)
    first = runner.generate(_request(img, "What is in the picture?", layout=layout))
    assert not first.timings.prefix_cache_hit and first.timings.vision_cache_hits == 0
    assert len(vision) == 1
    second = runner.generate(_request(img.copy(), "Describe the table in detail.", layout=layout))
    assert second.timings.prefix_cache_hit
    assert len(vision) == 1  # the vision tower did not run again
    assert second.timings.vision_cache_hits == 1  # the embedding entry is kept warm (touched)
    assert runner.prefix_cache.stats()["hits"] == 1 and runner.prefix_cache.stats()["misses"] == 1
    uncached = reference.generate(_request(img, "Describe the table in detail.", layout=layout))
    assert not uncached.timings.prefix_cache_hit and len(reference.prefix_cache) == 0
    assert second.text == uncached.text and second.usage == uncached.usage
    assert second.usage.prompt_tokens == uncached.usage.prompt_tokens > second.usage.image_tokens


def test_runner_other_image_or_hd_num_misses(tiny_model) -> None:
    runner = LocalRunner(tiny_model)
    img = _image(8)
    runner.generate(_request(img, "one?"))
    assert not runner.generate(_request(_image(9), "one?")).timings.prefix_cache_hit  # other image
    assert not runner.generate(_request(img, "one?", hd_num=1)).timings.prefix_cache_hit  # other hd_num
    assert not runner.generate(_request(img, "one?", layout=EVAL)).timings.prefix_cache_hit  # other layout
    assert runner.generate(_request(img, "two?")).timings.prefix_cache_hit
    stats = runner.prefix_cache.stats()
    assert (stats["hits"], stats["misses"], stats["entries"]) == (1, 4, 4)
    runner.close()
    assert len(runner.prefix_cache) == 0


def test_runner_beams_and_streaming_with_prefix_hit(tiny_model) -> None:
    runner = LocalRunner(tiny_model)
    reference = LocalRunner(tiny_model, prefix_cache_bytes=0)
    img = _image(10)
    runner.generate(_request(img, "first?"))
    beams = runner.generate(_request(img, "Describe it.", num_beams=3))
    assert beams.timings.prefix_cache_hit
    assert beams.text == reference.generate(_request(img, "Describe it.", num_beams=3)).text
    stream = runner.stream(_request(img, "And the colours?"))
    text = "".join(stream)
    assert stream.result is not None and stream.result.timings.prefix_cache_hit
    assert text.strip() == reference.generate(_request(img, "And the colours?")).text


def test_runner_multi_turn_follow_up_reuses_the_first_turns_prefix(tiny_model) -> None:
    """Chat history after the image does not change the prefix (system turn + user tag + image)."""
    runner = LocalRunner(tiny_model)
    img = _image(11)
    runner.generate(_request(img, "What is this?"))
    follow_up = GenerationRequest(
        messages=(Message.user(img, "What is this?"), Message("assistant", ("A chart.",)), Message.user("Why?")),
        hd_nums=(2,),
        generation=FAST,
    )
    out = runner.generate(follow_up)
    assert out.timings.prefix_cache_hit
    assert out.usage.image_tokens == plan(*img.size, 2).num_tokens
