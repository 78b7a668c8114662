"""The decode loop (greedy, sampling, beam search, streaming, stop ids, cancellation) on the tiny model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hd4k_tools.errors import InputError
from hd4k_tools.models.xcomposer2_4khd.prompt import IM_END, build_prompt
from hd4k_tools.models.xcomposer2_4khd.prompt_embeds import PromptInputs, assemble_inputs
from hd4k_tools.models.xcomposer2_4khd.tiling import plan_for_image, to_model_inputs
from hd4k_tools.runtime.generation import (
    GenerationConfig,
    GenerationOutput,
    _apply_repetition_penalty,
    _beam_search,
    _filter_logits,
    _RunStats,
    decode_output,
    generate,
    iter_tokens,
    stop_ids_for,
    stream,
    stream_text,
)
from hd4k_tools.runtime.generation_config import MAX_NUM_BEAMS

NO_STOP: frozenset[int] = frozenset()


class Hooked:
    """Wraps the model: records every forward call and lets a test edit the logits or set events."""

    def __init__(self, model: Any, hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model = model
        self.config = model.config
        self.hook = hook
        self.calls: list[dict[str, Any]] = []

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def __call__(self, embeds, im_mask, input_pos, cache, **kwargs) -> torch.Tensor:
        logits = self.model(embeds, im_mask, input_pos, cache, **kwargs)
        if self.hook is not None:
            logits = self.hook(len(self.calls) + 1, logits)
        self.calls.append({"im_mask": im_mask.clone(), "input_pos": input_pos.clone(), "logits": logits[:, -1].clone()})
        return logits


@pytest.fixture(scope="module")
def prompt_inputs(tiny_model) -> PromptInputs:
    """A chat prompt with one 40-token stand-in image (random rows at the scale of the token embeddings).

    With the tiny checkpoint's *real* vision output in the prompt, its random weights make greedy
    decoding repeat a single token, which would leave most tests below without signal; the decode loop
    does not care where the image rows come from (``real_image_inputs`` covers the real path).
    """
    model, tok = tiny_model.model, tiny_model.tokenizer
    scale = float(model.model.tok_embeddings.weight.std())
    image = torch.randn(40, model.config.hidden_size, generator=torch.Generator().manual_seed(5)) * scale
    prompt = build_prompt("<ImageHere>Describe the picture in detail.")
    return assemble_inputs(model, tok, prompt, [image], max_length=model.config.max_length)


@pytest.fixture(scope="module")
def real_image_inputs(tiny_model) -> PromptInputs:
    """A chat prompt with a real image through the tiny vision tower (HD-1, 313 image tokens)."""
    model, tok = tiny_model.model, tiny_model.tokenizer
    image = Image.new("RGB", (420, 300), (30, 140, 220))
    image.paste((250, 250, 10), (40, 40, 200, 120))
    with torch.no_grad():
        embeds = model.encode_image(to_model_inputs(image, plan_for_image(image, 1)))
    prompt = build_prompt("<ImageHere>Describe the picture in detail.")
    return assemble_inputs(model, tok, prompt, [embeds], max_length=model.config.max_length)


def _full_logits(model: Any, inputs: PromptInputs, tokens: list[int]) -> torch.Tensor:
    """Logits ``[len(tokens), V]`` predicting each generated token, by one full forward without a cache."""
    with torch.no_grad():
        gen = model.embed_tokens(torch.tensor(tokens[:-1], dtype=torch.long)).unsqueeze(0)  # [1, n-1, D]
        embeds = torch.cat([inputs.inputs_embeds, gen], dim=1)  # [1, T+n-1, D]
        mask = torch.cat([inputs.im_mask, torch.zeros(1, len(tokens) - 1, dtype=torch.bool)], dim=1)
        pos = torch.arange(embeds.shape[1])
        logits = model(embeds, mask, pos, None)  # [1, T+n-1, V]
    return logits[0, inputs.length - 1 :]  # [n, V]


def _sequence_logprob(model: Any, inputs: PromptInputs, tokens: list[int]) -> float:
    logprobs = F.log_softmax(_full_logits(model, inputs, tokens).double(), dim=-1)  # [n, V]
    return float(logprobs.gather(1, torch.tensor(tokens)[:, None]).sum())


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": 0},
        {"max_new_tokens": 2.5},
        {"temperature": 0.0},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"repetition_penalty": 0.0},
        {"num_beams": 0},
        {"seed": -3},
        {"length_penalty": float("inf")},
        {"do_sample": 1},
        {"do_sample": True, "num_beams": 3},
    ],
)
def test_invalid_config(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        GenerationConfig(**kwargs)


def test_num_beams_is_bounded() -> None:
    # One request asking for 100000 beams used to allocate 100000 KV caches and OOM the server.
    assert GenerationConfig(num_beams=MAX_NUM_BEAMS).num_beams == MAX_NUM_BEAMS
    for beams in (MAX_NUM_BEAMS + 1, 100_000):
        with pytest.raises(InputError, match=f"at most {MAX_NUM_BEAMS}"):
            GenerationConfig(num_beams=beams)
    with pytest.raises(InputError, match="num_beams"):
        GenerationConfig().replace(num_beams=MAX_NUM_BEAMS + 1)


def test_config_defaults_and_replace() -> None:
    c = GenerationConfig()
    assert (c.max_new_tokens, c.do_sample, c.temperature, c.top_p, c.top_k) == (512, False, 1.0, 1.0, 0)
    assert (c.repetition_penalty, c.num_beams, c.seed, c.length_penalty) == (1.0, 1, None, 1.0)
    assert c.replace(max_new_tokens=3).max_new_tokens == 3
    with pytest.raises(ValueError, match="beam"):
        c.replace(do_sample=True, num_beams=2)


def test_stop_ids_and_decode_output(tiny_model) -> None:
    tok = tiny_model.tokenizer
    assert stop_ids_for(tok) == {tok.eos_id, tok.im_end_id}
    ids = tok.encode("The chart shows sales.", add_bos=False)
    assert decode_output(tok, ids) == tok.decode(ids, skip_special_tokens=True)
    assert decode_output(tok, [*ids, tok.im_end_id, *ids]) == tok.decode(ids) * 2  # special dropped


# ----------------------------------------------------------------------------------------------------
# Greedy and the KV cache
# ----------------------------------------------------------------------------------------------------
def test_greedy_is_deterministic(tiny_model, prompt_inputs) -> None:
    cfg = GenerationConfig(max_new_tokens=12)
    a = generate(tiny_model.model, prompt_inputs, cfg, stop_ids=NO_STOP)
    b = generate(tiny_model.model, prompt_inputs, cfg, stop_ids=NO_STOP)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert len(set(a.token_ids)) > 1  # the tiny model produces varied tokens
    assert a.finish_reason == "length" and a.num_generated_tokens == 12
    assert a.num_prompt_tokens == prompt_inputs.length
    assert a.prefill_seconds >= 0 and a.decode_seconds >= 0 and a.tokens_per_second >= 0


@pytest.mark.parametrize("which", ["prompt_inputs", "real_image_inputs"])
def test_kv_cache_decode_equals_full_recomputation(tiny_model, request: pytest.FixtureRequest, which: str) -> None:
    prompt_inputs: PromptInputs = request.getfixturevalue(which)
    assert prompt_inputs.im_mask.any()
    hooked = Hooked(tiny_model.model)
    out = generate(hooked, prompt_inputs, GenerationConfig(max_new_tokens=12), stop_ids=NO_STOP)
    tokens = out.token_ids
    assert len(hooked.calls) == 12  # prefill + 11 single-token steps
    stepwise = torch.cat([c["logits"] for c in hooked.calls])  # [12, V]
    full = _full_logits(tiny_model.model, prompt_inputs, tokens)  # [12, V]
    torch.testing.assert_close(stepwise, full, atol=1e-5, rtol=0)
    assert tokens == full.argmax(-1).tolist()


def test_prefill_uses_im_mask_and_decode_does_not(tiny_model, real_image_inputs) -> None:
    prompt_inputs = real_image_inputs
    hooked = Hooked(tiny_model.model)
    generate(hooked, prompt_inputs, GenerationConfig(max_new_tokens=4), stop_ids=NO_STOP)
    first, rest = hooked.calls[0], hooked.calls[1:]
    assert torch.equal(first["im_mask"], prompt_inputs.im_mask)
    assert torch.equal(first["input_pos"], torch.arange(prompt_inputs.length))
    for i, call in enumerate(rest):
        assert call["im_mask"].shape == (1, 1) and not call["im_mask"].any()  # no LoRA on generated tokens
        assert call["input_pos"].tolist() == [prompt_inputs.length + i]


def test_generate_fills_text_with_tokenizer(tiny_model, prompt_inputs) -> None:
    tok = tiny_model.tokenizer
    out = generate(tiny_model.model, prompt_inputs, GenerationConfig(max_new_tokens=8), stop_ids=NO_STOP, tokenizer=tok)
    assert out.text == decode_output(tok, out.token_ids)


# ----------------------------------------------------------------------------------------------------
# Beam search
# ----------------------------------------------------------------------------------------------------
def test_one_beam_equals_greedy(tiny_model, prompt_inputs) -> None:
    model = tiny_model.model
    cfg = GenerationConfig(max_new_tokens=10)
    greedy = generate(model, prompt_inputs, cfg, stop_ids=NO_STOP)
    assert generate(model, prompt_inputs, cfg.replace(num_beams=1), stop_ids=NO_STOP).token_ids == greedy.token_ids
    # The beam-search code itself, run with a single beam, reproduces greedy token for token.
    stats = _RunStats()
    _beam_search(model, prompt_inputs, cfg, NO_STOP, None, stats, num_beams=1)
    assert stats.tokens == greedy.token_ids


def test_three_beams_score_at_least_greedy(tiny_model, prompt_inputs) -> None:
    model = tiny_model.model
    n = 8
    greedy = generate(model, prompt_inputs, GenerationConfig(max_new_tokens=n), stop_ids=NO_STOP)
    beams = generate(model, prompt_inputs, GenerationConfig(max_new_tokens=n, num_beams=3), stop_ids=NO_STOP)
    assert len(beams.token_ids) == n and beams.finish_reason == "length"
    greedy_lp = _sequence_logprob(model, prompt_inputs, greedy.token_ids)
    beam_lp = _sequence_logprob(model, prompt_inputs, beams.token_ids)
    assert beam_lp >= greedy_lp - 1e-4
    # The reported score is the length-normalised log-probability (length_penalty 1.0).
    assert beams.score is not None
    assert beams.score * n == pytest.approx(beam_lp, abs=1e-3)


def test_beam_search_stops_on_stop_id(tiny_model, prompt_inputs) -> None:
    eos = tiny_model.tokenizer.eos_id

    def force_eos_at_3(call: int, logits: torch.Tensor) -> torch.Tensor:
        if call == 3:
            logits = logits.clone()
            logits[..., eos] += 1e4
        return logits

    hooked = Hooked(tiny_model.model, force_eos_at_3)
    out = generate(
        hooked,
        prompt_inputs,
        GenerationConfig(max_new_tokens=20, num_beams=3),
        stop_ids=stop_ids_for(tiny_model.tokenizer),
    )
    assert out.finish_reason == "stop" and out.stop_token_id == eos
    assert len(out.token_ids) == 2 and eos not in out.token_ids
    assert len(hooked.calls) == 3


# ----------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------
def test_sampling_seeded_reproducible_and_no_global_rng(tiny_model, prompt_inputs) -> None:
    model = tiny_model.model
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.5, seed=123)
    rng_before = torch.get_rng_state()
    a = generate(model, prompt_inputs, cfg, stop_ids=NO_STOP).token_ids
    b = generate(model, prompt_inputs, cfg, stop_ids=NO_STOP).token_ids
    c = generate(model, prompt_inputs, cfg.replace(seed=124), stop_ids=NO_STOP).token_ids
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a == b
    assert a != c


def test_top_k_1_and_tiny_top_p_equal_greedy(tiny_model, prompt_inputs) -> None:
    model = tiny_model.model
    greedy = generate(model, prompt_inputs, GenerationConfig(max_new_tokens=10), stop_ids=NO_STOP).token_ids
    for extra in ({"top_k": 1}, {"top_p": 1e-6}):
        cfg = GenerationConfig(max_new_tokens=10, do_sample=True, temperature=2.0, seed=7, **extra)
        assert generate(model, prompt_inputs, cfg, stop_ids=NO_STOP).token_ids == greedy


def test_filter_logits_semantics() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda cfg: torch.isfinite(_filter_logits(logits.clone(), cfg))[0].tolist()  # noqa: E731
    assert kept(GenerationConfig(do_sample=True, top_k=2)) == [True, True, False, False]
    assert kept(GenerationConfig(do_sample=True, top_p=0.4)) == [True, False, False, False]
    assert kept(GenerationConfig(do_sample=True, top_p=0.6)) == [True, True, False, False]
    assert kept(GenerationConfig(do_sample=True, top_p=0.9)) == [True, True, True, False]
    scaled = _filter_logits(logits.clone(), GenerationConfig(do_sample=True, temperature=2.0))
    torch.testing.assert_close(scaled, logits / 2)


def test_repetition_penalty_semantics() -> None:
    scores = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = _apply_repetition_penalty(scores.clone(), torch.tensor([[0, 1, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]


def test_repetition_penalty_changes_output_but_not_first_token(tiny_model, prompt_inputs) -> None:
    model = tiny_model.model
    plain = generate(model, prompt_inputs, GenerationConfig(max_new_tokens=24), stop_ids=NO_STOP).token_ids
    penalised = generate(
        model, prompt_inputs, GenerationConfig(max_new_tokens=24, repetition_penalty=5.0), stop_ids=NO_STOP
    ).token_ids
    assert penalised != plain
    # Only generated tokens are penalised (HF inputs_embeds path): the first pick is unaffected.
    assert penalised[0] == plain[0]
    assert len(set(penalised)) >= len(set(plain))


# ----------------------------------------------------------------------------------------------------
# Limits, stop ids, cancellation
# ----------------------------------------------------------------------------------------------------
def test_max_new_tokens_respected(tiny_model, prompt_inputs) -> None:
    for beams in (1, 3):
        out = generate(
            tiny_model.model, prompt_inputs, GenerationConfig(max_new_tokens=5, num_beams=beams), stop_ids=NO_STOP
        )
        assert len(out.token_ids) == 5 and out.finish_reason == "length"


@pytest.mark.parametrize("which", ["eos", "im_end"])
def test_stop_id_ends_generation(tiny_model, prompt_inputs, which: str) -> None:
    tok = tiny_model.tokenizer
    stop = tok.eos_id if which == "eos" else tok.im_end_id

    def force_stop_at_3(call: int, logits: torch.Tensor) -> torch.Tensor:
        if call == 3:
            logits = logits.clone()
            logits[..., stop] += 1e4
        return logits

    hooked = Hooked(tiny_model.model, force_stop_at_3)
    out = generate(
        hooked, prompt_inputs, GenerationConfig(max_new_tokens=20), stop_ids=stop_ids_for(tok), tokenizer=tok
    )
    assert out.finish_reason == "stop" and out.stop_token_id == stop
    assert len(out.token_ids) == 2 and stop not in out.token_ids
    assert len(hooked.calls) == 3  # nothing is computed after the stop token
    assert out.text == decode_output(tok, out.token_ids)


@pytest.mark.parametrize("beams", [1, 3])
def test_cancel_mid_generation(tiny_model, prompt_inputs, beams: int) -> None:
    cancel = threading.Event()

    def cancel_at_3(call: int, logits: torch.Tensor) -> torch.Tensor:
        if call == 3:
            cancel.set()
        return logits

    hooked = Hooked(tiny_model.model, cancel_at_3)
    cfg = GenerationConfig(max_new_tokens=20, num_beams=beams)
    out = generate(hooked, prompt_inputs, cfg, stop_ids=NO_STOP, cancel=cancel)
    assert out.finish_reason == "cancelled"
    assert len(out.token_ids) == 3  # the token chosen from the 3rd forward, then it stops
    assert len(hooked.calls) == 3


def test_cancel_before_start_and_iter_tokens_output(tiny_model, prompt_inputs) -> None:
    cancel = threading.Event()
    cancel.set()
    hooked = Hooked(tiny_model.model)
    box: list[GenerationOutput] = []
    tokens = list(iter_tokens(hooked, prompt_inputs, GenerationConfig(), stop_ids=NO_STOP, cancel=cancel, output=box))
    assert tokens == [] and hooked.calls == []
    assert box[0].finish_reason == "cancelled" and box[0].token_ids == []

    # iter_tokens streams the same tokens generate returns, and reports through `output`.
    box.clear()
    cfg = GenerationConfig(max_new_tokens=6)
    streamed = list(iter_tokens(tiny_model.model, prompt_inputs, cfg, stop_ids=NO_STOP, output=box))
    assert streamed == box[0].token_ids == generate(tiny_model.model, prompt_inputs, cfg, stop_ids=NO_STOP).token_ids


# ----------------------------------------------------------------------------------------------------
# Streaming text
# ----------------------------------------------------------------------------------------------------
def test_stream_equals_generate_text(tiny_model, prompt_inputs) -> None:
    tok = tiny_model.tokenizer
    cfg = GenerationConfig(max_new_tokens=40)
    full = generate(tiny_model.model, prompt_inputs, cfg, stop_ids=stop_ids_for(tok), tokenizer=tok)
    box: list[GenerationOutput] = []
    deltas = list(stream(tiny_model.model, tok, prompt_inputs, cfg, output=box))
    assert len(full.text) > 20  # the stand-in prompt gives real text to stream
    assert "".join(deltas) == full.text
    assert all(deltas) and box[0].token_ids == full.token_ids


def test_stream_text_holds_back_incomplete_utf8(tiny_model) -> None:
    tok = tiny_model.tokenizer
    text = "Total 你好 ✓ 42%"
    ids = tok.encode(text, add_bos=False)
    assert any(p.startswith("<0x") for p in tok.convert_ids_to_tokens(ids))  # byte-fallback pieces
    deltas = list(stream_text(tok, iter(ids)))
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)
    assert len(deltas) > 1


class _PieceTokenizer:
    """Decodes by concatenating fixed strings (to test the end-of-turn marker hold-back)."""

    eos_id, im_end_id = 0, 1

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_stream_text_never_emits_the_end_marker() -> None:
    pieces = ["", "", "Hi", " [UN", "USED_", "TOKEN_145]", " tail", "a[", "b"]
    tok = _PieceTokenizer(pieces)
    deltas = list(stream_text(tok, iter([2, 3, 4, 5, 6])))
    assert "".join(deltas) == decode_output(tok, [2, 3, 4, 5, 6]) == "Hi "
    assert not any(IM_END[:3] in d for d in deltas)
    # A '[' that does not become the marker is released once the text moves on.
    deltas = list(stream_text(tok, iter([2, 7, 8])))
    assert "".join(deltas) == "Hia[b" and deltas[-1].endswith("[b")


# ----------------------------------------------------------------------------------------------------
# Beam search memory: one cache for all beams, reordered in place
# ----------------------------------------------------------------------------------------------------
def test_beam_search_keeps_one_cache_and_reorders_in_place(tiny_model, prompt_inputs, monkeypatch) -> None:
    from hd4k_tools.models.xcomposer2_4khd.kv_cache import KVCache

    seen: list[tuple[int, int, int, int]] = []
    original = KVCache.reorder

    def recording(self: KVCache, index: torch.Tensor) -> None:
        before = (self.k.data_ptr(), self.v.data_ptr())
        original(self, index)
        seen.append((*before, self.k.data_ptr(), self.v.data_ptr()))
        assert self.batch_size == 3

    monkeypatch.setattr(KVCache, "reorder", recording)
    out = generate(tiny_model.model, prompt_inputs, GenerationConfig(max_new_tokens=12, num_beams=3), stop_ids=NO_STOP)
    monkeypatch.undo()
    assert len(out.token_ids) == 12
    assert seen, "the beams never moved: the test prompt gives no signal"
    assert all(k0 == k1 and v0 == v1 for k0, v0, k1, v1 in seen)  # never a new cache
    assert len({(k0, v0) for k0, v0, _, _ in seen}) == 1  # one cache for the whole search
    # And the result is what the search gives without the recording wrapper.
    again = generate(
        tiny_model.model, prompt_inputs, GenerationConfig(max_new_tokens=12, num_beams=3), stop_ids=NO_STOP
    )
    assert again.token_ids == out.token_ids
