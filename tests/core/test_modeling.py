"""InternLM2 + Partial LoRA decoder: keys/shapes of the real model, wqkv layout, LoRA masking,
KV cache, RoPE scaling."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from hd4k_tools.models.xcomposer2_4khd import KVCache, XComposer2Config, XComposer2ForCausalLM
from hd4k_tools.models.xcomposer2_4khd.modeling import (
    Attention,
    PLoRALinear,
    RMSNorm,
    RotaryEmbedding,
    dynamic_ntk_base,
)
from hd4k_tools.models.xcomposer2_4khd.tiny import random_model, tiny_config_dict

# ----------------------------------------------------------------------------------------------------
# The full-size model, on the meta device
# ----------------------------------------------------------------------------------------------------
OFFICIAL_CONFIG = {  # config.json fields of the real checkpoint (docs/model.md §3.3); no vision/LoRA fields
    "architectures": ["InternLMXComposer2ForCausalLM"],
    "auto_map": {"AutoModelForCausalLM": "modeling_internlm_xcomposer2.InternLMXComposer2ForCausalLM"},
    "attn_implementation": "flash_attention_2",
    "bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_length": 16384,
    "max_position_embeddings": 32768,
    "model_type": "internlmxcomposer2",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"type": "dynamic", "factor": 1.0},
    "rope_theta": 1000000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 92544,
}


def _spec_keys() -> dict[str, tuple[int, ...]]:
    """docs/model.md §3.4, written out independently of the model code."""
    keys: dict[str, tuple[int, ...]] = {
        "model.tok_embeddings.weight": (92544, 4096),
        "model.norm.weight": (4096,),
        "output.weight": (92544, 4096),
        "vision_proj.0.weight": (4096, 4096),
        "vision_proj.0.bias": (4096,),
        "vision_proj.2.weight": (4096, 4096),
        "vision_proj.2.bias": (4096,),
        "plora_glb_GN": (1, 1, 4096),
        "plora_sub_GN": (1, 1, 1, 4096),
    }
    for i in range(32):
        p = f"model.layers.{i}."
        keys |= {
            p + "attention_norm.weight": (4096,),
            p + "ffn_norm.weight": (4096,),
            p + "attention.wqkv.weight": (6144, 4096),
            p + "attention.wqkv.Plora_A.weight": (8, 4096),
            p + "attention.wqkv.Plora_B.weight": (6144, 8),
            p + "attention.wo.weight": (4096, 4096),
            p + "attention.wo.Plora_A.weight": (256, 4096),
            p + "attention.wo.Plora_B.weight": (4096, 256),
        }
        for w, (out, inp) in {"w1": (14336, 4096), "w3": (14336, 4096), "w2": (4096, 14336)}.items():
            keys |= {
                p + f"feed_forward.{w}.weight": (out, inp),
                p + f"feed_forward.{w}.Plora_A.weight": (256, inp),
                p + f"feed_forward.{w}.Plora_B.weight": (out, 256),
            }
    v = "vit.vision_tower.vision_model."
    keys |= {
        v + "embeddings.class_embedding": (1024,),
        v + "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
        v + "embeddings.position_embedding.weight": (577, 1024),
        v + "pre_layrnorm.weight": (1024,),
        v + "pre_layrnorm.bias": (1024,),
    }
    for i in range(24):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            keys |= {p + f"self_attn.{proj}.weight": (1024, 1024), p + f"self_attn.{proj}.bias": (1024,)}
        for norm in ("layer_norm1", "layer_norm2"):
            keys |= {p + f"{norm}.weight": (1024,), p + f"{norm}.bias": (1024,)}
        keys |= {
            p + "mlp.fc1.weight": (4096, 1024),
            p + "mlp.fc1.bias": (4096,),
            p + "mlp.fc2.weight": (1024, 4096),
            p + "mlp.fc2.bias": (1024,),
        }
    return keys


@pytest.fixture(scope="module")
def full_meta_model() -> XComposer2ForCausalLM:
    config = XComposer2Config.from_dict(OFFICIAL_CONFIG)
    with torch.device("meta"):
        return XComposer2ForCausalLM(config)


def test_official_config_defaults():
    config = XComposer2Config.from_dict(OFFICIAL_CONFIG)
    assert (config.head_dim, config.num_kv_groups) == (128, 4)
    assert (config.wqkv_lora_r, config.wqkv_lora_alpha, config.wqkv_lora_scaling) == (8, 16, 2.0)
    assert (config.lora_r, config.lora_alpha, config.lora_scaling) == (256, 256, 1.0)
    assert config.vision.hidden_size == 1024 and config.vision.num_hidden_layers == 24
    assert config.vision.hidden_act == "quick_gelu" and config.vision.image_size == 336
    assert config.max_length == 16384 and config.rope_scaling_type == "dynamic"
    assert config.extra["attn_implementation"] == "flash_attention_2"
    assert "auto_map" in config.extra


def test_full_model_keys_and_shapes_match_the_spec(full_meta_model):
    state = full_meta_model.state_dict()
    got = {k: tuple(v.shape) for k, v in state.items()}
    expected = _spec_keys()
    assert set(got) == set(expected), set(got) ^ set(expected)
    mismatched = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not mismatched
    # Built without memory: every parameter and buffer lives on the meta device.
    assert all(p.is_meta for p in full_meta_model.parameters())
    assert all(b.is_meta for b in full_meta_model.buffers())


def test_full_model_parameter_count(full_meta_model):
    model = full_meta_model
    total, decoder = model.num_parameters(), model.num_parameters(part="decoder")
    lora, vision = model.num_parameters(part="lora"), model.num_parameters(part="vision")
    print(f"\nparameters: total {total:,}, decoder {decoder:,} (LoRA {lora:,}), vision {vision:,}")
    assert total == sum(math.prod(s) for s in _spec_keys().values())
    assert total == decoder + vision
    per_layer_lora = (8 * 4096 + 6144 * 8) + (256 * 4096 + 4096 * 256) + 2 * (256 * 4096 + 14336 * 256)
    per_layer_lora += 256 * 14336 + 4096 * 256
    assert lora == 32 * per_layer_lora  # ≈ 0.52 B
    assert 7.7e9 < decoder - lora < 7.8e9  # InternLM2-7B
    assert 0.30e9 < vision - 2 * 4096 * 4096 - 2 * 4096 - 2 * 4096 < 0.31e9  # CLIP ViT-L/14-336


def test_lora_scaling_per_projection(full_meta_model):
    layer = full_meta_model.model.layers[0]
    assert layer.attention.wqkv.lora_scaling == 2.0
    for proj in (layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w2, layer.feed_forward.w3):
        assert proj.lora_scaling == 1.0


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------
def test_rmsnorm_variance_in_fp32():
    norm = RMSNorm(8, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    x = (torch.randn(2, 3, 8) * 100).bfloat16()
    norm = norm.bfloat16()
    h = x.float()
    expected = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).bfloat16()
    assert torch.equal(norm(x), expected)


def test_plora_adds_delta_only_at_image_positions():
    torch.manual_seed(0)
    lin = PLoRALinear(6, 5, bias=False, lora_r=2, lora_alpha=4)
    torch.nn.init.normal_(lin.Plora_B.weight)
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[False, True, True, False], [True, False, False, False]])
    base = F.linear(x, lin.weight)
    out = lin(x, mask)
    assert torch.equal(lin(x, None), base)
    torch.testing.assert_close(out[~mask], base[~mask], rtol=0, atol=0)
    delta = lin.Plora_B(lin.Plora_A(x[mask])) * 2.0
    torch.testing.assert_close(out[mask], base[mask] + delta)


def _tiny_attention_config(**overrides) -> XComposer2Config:
    d = tiny_config_dict(50, {"hidden_size": 24, "num_attention_heads": 6, "num_key_value_heads": 2, **overrides})
    return XComposer2Config.from_dict(d)


def test_wqkv_interleave_split():
    """Rows are [kv_heads][q_per_kv + 2][head_dim]: per group q heads, then k, then v."""
    config = _tiny_attention_config()  # 6 heads, 2 kv heads, head_dim 4 → groups of [q, q, q, k, v]
    attn = Attention(config, 0)
    out_rows, d, g = attn.wqkv.out_features, config.head_dim, config.num_kv_groups
    assert out_rows == (6 + 2 * 2) * 4
    # Row r of wqkv returns r for the input e_0, so each output says which row produced it.
    with torch.no_grad():
        attn.wqkv.weight.zero_()
        attn.wqkv.weight[:, 0] = torch.arange(out_rows, dtype=torch.float32)
    x = torch.zeros(1, 1, config.hidden_size)
    x[..., 0] = 1.0
    q, k, v = attn.split_qkv(attn.wqkv(x))
    for head in range(6):
        group, slot = divmod(head, g)
        first_row = (group * (g + 2) + slot) * d
        assert q[0, 0, group, slot].tolist() == list(range(first_row, first_row + d))
    for group in range(2):
        k_row, v_row = (group * (g + 2) + g) * d, (group * (g + 2) + g + 1) * d
        assert k[0, 0, group].tolist() == list(range(k_row, k_row + d))
        assert v[0, 0, group].tolist() == list(range(v_row, v_row + d))


def _reference_attention(attn: Attention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Per-head loops, explicit GQA (query head h reads kv head h // q_per_kv) and RoPE."""
    _, t, _ = x.shape
    d, g = attn.head_dim, attn.q_per_kv
    w = attn.wqkv.weight.view(attn.n_kv_heads, g + 2, d, -1)  # [kv, g+2, d, in]
    inv = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    ang = torch.arange(t).float()[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()

    def rope(z):
        return z * cos + torch.cat([-z[:, d // 2 :], z[:, : d // 2]], -1) * sin

    heads = []
    for h in range(attn.n_heads):
        kv = h // g
        q = rope(x[0] @ w[kv, h % g].T)
        k = rope(x[0] @ w[kv, g].T)
        v = x[0] @ w[kv, g + 1].T
        scores = q @ k.T / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        heads.append(scores.softmax(-1) @ v)
    return (torch.cat(heads, -1) @ attn.wo.weight.T)[None]


def test_attention_matches_per_head_reference():
    torch.manual_seed(0)
    config = _tiny_attention_config()
    attn = Attention(config, 0)
    rope = RotaryEmbedding(config)
    x = torch.randn(1, 7, config.hidden_size)
    pos = torch.arange(7)
    cos, sin = rope(pos, 7, x.dtype)
    expected = _reference_attention(attn, x, config.rope_theta)
    out = attn(x, None, cos, sin, pos, None, 7, None)  # no mask: SDPA's own GQA (enable_gqa)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    causal = torch.ones(7, 7, dtype=torch.bool).tril()  # [T, S]: the masked path expands K/V instead
    torch.testing.assert_close(attn(x, None, cos, sin, pos, None, 7, causal), expected, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------
# RoPE dynamic NTK
# ----------------------------------------------------------------------------------------------------
def test_dynamic_ntk_base_formula():
    assert dynamic_ntk_base(1e6, 128, 32768, 32768, 2.0) == 1e6
    assert dynamic_ntk_base(1e6, 128, 100, 32768, 1.0) == 1e6
    expected = 1e6 * ((2.0 * 40000 / 32768) - 1.0) ** (128 / 126)
    assert dynamic_ntk_base(1e6, 128, 40000, 32768, 2.0) == pytest.approx(expected)
    assert dynamic_ntk_base(1e6, 128, 40000, 32768, 1.0) > 1e6


def test_rope_scaling_only_beyond_max_positions():
    plain = XComposer2Config.from_dict(tiny_config_dict(50, {"max_position_embeddings": 8, "rope_scaling": None}))
    dyn = XComposer2Config.from_dict(
        tiny_config_dict(50, {"max_position_embeddings": 8, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    )
    r_plain, r_dyn = RotaryEmbedding(plain), RotaryEmbedding(dyn)
    pos = torch.arange(8)
    for a, b in zip(r_plain(pos, 8, torch.float32), r_dyn(pos, 8, torch.float32), strict=True):
        assert torch.equal(a, b)
    pos = torch.arange(12)
    cos_p, _ = r_plain(pos, 12, torch.float32)
    cos_d, _ = r_dyn(pos, 12, torch.float32)
    assert torch.equal(cos_p[0], cos_d[0]) and not torch.allclose(cos_p[1:], cos_d[1:])

    # The whole model: identical logits up to max_position_embeddings, different beyond.
    m_plain, m_dyn = random_model(plain, seed=1), random_model(dyn, seed=1)
    emb = m_plain.embed_tokens(torch.arange(3, 15))[None]
    with torch.inference_mode():
        assert torch.equal(m_plain(emb[:, :8]), m_dyn(emb[:, :8]))
        assert not torch.allclose(m_plain(emb)[:, 8:], m_dyn(emb)[:, 8:])


# ----------------------------------------------------------------------------------------------------
# The tiny model: LoRA masking, KV cache
# ----------------------------------------------------------------------------------------------------
def _mixed_inputs(model: XComposer2ForCausalLM, n_text: int = 5, n_image: int = 9, n_tail: int = 4):
    """Text, then image embeddings (random, marked in im_mask), then text again."""
    gen = torch.Generator().manual_seed(0)
    d = model.config.hidden_size
    ids = torch.randint(5, model.config.vocab_size, (n_text + n_tail,), generator=gen)
    image = torch.randn(n_image, d, generator=gen)
    embeds = torch.cat([model.embed_tokens(ids[:n_text]), image, model.embed_tokens(ids[n_text:])])[None]
    im_mask = torch.zeros(1, embeds.shape[1], dtype=torch.bool)
    im_mask[0, n_text : n_text + n_image] = True
    return embeds, im_mask


def test_lora_changes_image_positions_only(tiny_model):
    model = tiny_model.model
    no_lora = copy.deepcopy(model)
    for module in no_lora.modules():
        if isinstance(module, PLoRALinear):
            module.Plora_B.weight.data.zero_()
    embeds, im_mask = _mixed_inputs(model)
    with torch.inference_mode():
        with_lora = model(embeds, im_mask)
        without = no_lora(embeds, im_mask)
        text_only = model(embeds, None)
    first_image = int(im_mask[0].nonzero()[0])
    assert torch.equal(with_lora[:, :first_image], without[:, :first_image])
    image_diff = (with_lora - without)[0, im_mask[0]].abs().amax(-1)
    assert (image_diff > 1e-3).all()
    # Without im_mask (or an all-False one) the LoRA branches are skipped entirely.
    torch.testing.assert_close(text_only, without, rtol=0, atol=0)
    with torch.inference_mode():
        all_false = model(embeds, torch.zeros_like(im_mask))
    assert torch.equal(all_false, text_only)


def test_kv_cache_decoding_matches_full_recompute(tiny_model):
    model = tiny_model.model
    embeds, im_mask = _mixed_inputs(model)  # prefill with image positions
    n_prompt = embeds.shape[1]
    gen = torch.Generator().manual_seed(1)
    new_ids = torch.randint(5, model.config.vocab_size, (6,), generator=gen)
    full_embeds = torch.cat([embeds, model.embed_tokens(new_ids)[None]], dim=1)
    full_mask = torch.cat([im_mask, torch.zeros(1, 6, dtype=torch.bool)], dim=1)
    with torch.inference_mode():
        reference = model(full_embeds, full_mask)  # no cache: plain causal attention
        cache = model.make_cache(1, 64)
        prefill = model(embeds, im_mask, torch.arange(n_prompt), cache)
        steps = []
        for i, tok in enumerate(new_ids.tolist()):
            pos = torch.tensor([n_prompt + i])
            steps.append(model(model.embed_tokens([tok])[None], None, pos, cache))
    assert cache.length == n_prompt + 6
    torch.testing.assert_close(prefill, reference[:, :n_prompt], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), reference[:, n_prompt:], atol=1e-5, rtol=1e-5)


def test_chunked_prefill_and_default_positions(tiny_model):
    model = tiny_model.model
    embeds, im_mask = _mixed_inputs(model)
    with torch.inference_mode():
        reference = model(embeds, im_mask)
        cache = KVCache(model.config, 1, 32, torch.float32, "cpu")
        first = model(embeds[:, :8], im_mask[:, :8], cache=cache)  # positions default to 0..7
        second = model(embeds[:, 8:], im_mask[:, 8:], cache=cache)  # then continue at cache.length
        last = model(embeds, im_mask, logits_to_keep=1)
    torch.testing.assert_close(torch.cat([first, second], 1), reference, atol=1e-5, rtol=1e-5)
    assert last.shape == (1, 1, model.config.vocab_size)
    torch.testing.assert_close(last, reference[:, -1:])


def test_kv_cache_reorder_for_beams(tiny_model):
    model = tiny_model.model
    embeds, im_mask = _mixed_inputs(model)
    batch = torch.cat([embeds, embeds.flip(1)])  # two different rows
    mask = torch.cat([im_mask, im_mask.flip(1)])
    n = embeds.shape[1]
    nxt = model.embed_tokens([7, 7])[:, None]  # [2, 1, D]
    with torch.inference_mode():
        cache = KVCache(model.config, 2, 32, torch.float32, "cpu")
        model(batch, mask, torch.arange(n), cache)
        cache.reorder(torch.tensor([1, 1]))  # both beams continue from row 1
        step = model(nxt, None, torch.tensor([n]), cache)
        ref = model(torch.cat([batch[1:], nxt[1:]], 1), torch.cat([mask[1:], torch.zeros(1, 1, dtype=torch.bool)], 1))
    torch.testing.assert_close(step[0], ref[0, -1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[1], ref[0, -1:], atol=1e-5, rtol=1e-5)


def test_kv_cache_overflow_is_a_typed_error(tiny_model):
    from hd4k_tools.errors import ContextOverflowError

    model = tiny_model.model
    cache = KVCache(model.config, 1, 4, torch.float32, "cpu")
    with torch.inference_mode(), pytest.raises(ContextOverflowError):
        model(model.embed_tokens([5, 6, 7, 8, 9])[None], cache=cache)


def test_bf16_model_returns_float32_logits(tiny_model):
    model = copy.deepcopy(tiny_model.model).to(torch.bfloat16)
    embeds, im_mask = _mixed_inputs(tiny_model.model)
    with torch.inference_mode():
        logits = model(embeds, im_mask)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model.embed_tokens([1, 2]).dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------------
# Partial LoRA by spans (issue 3 review: no boolean gather/scatter per projection)
# ----------------------------------------------------------------------------------------------------
def _random_span_mask(batch: int, t: int, spans: int, seed: int, same_rows: bool) -> torch.Tensor:
    """``spans`` disjoint runs of True per row: one of random start and length in each window of ``t // spans``."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, t, dtype=torch.bool)
    window = t // spans
    for b in range(batch):
        for w in range(spans):
            start = w * window + int(torch.randint(1, window // 2, (1,), generator=gen))
            mask[b, start : start + int(torch.randint(1, window // 2, (1,), generator=gen))] = True
    if same_rows:
        mask[:] = mask[0]
    return mask


def test_image_spans_finds_the_runs():
    from hd4k_tools.models.xcomposer2_4khd.modeling import image_spans

    mask = torch.tensor([[False, True, True, False, True, False, True]])
    assert image_spans(mask) == ((None, 1, 3), (None, 4, 5), (None, 6, 7))
    assert image_spans(torch.zeros(2, 5, dtype=torch.bool)) == ()
    assert image_spans(torch.ones(3, 4, dtype=torch.bool)) == ((None, 0, 4),)
    rows = torch.tensor([[True, True, False], [False, True, True]])
    assert image_spans(rows) == ((0, 0, 2), (1, 1, 3))
    assert image_spans(mask, max_spans=2) is None  # fragmented masks keep the boolean path


@pytest.mark.parametrize("seed", range(6))
def test_plora_spans_equal_the_mask_path(seed: int):
    from hd4k_tools.models.xcomposer2_4khd.modeling import image_spans

    torch.manual_seed(seed)
    lin = PLoRALinear(48, 40, bias=seed % 2 == 0, lora_r=4, lora_alpha=8 if seed % 3 else 3)
    torch.nn.init.normal_(lin.Plora_B.weight)
    batch = 1 if seed < 2 else 3
    mask = _random_span_mask(batch, 64, spans=3, seed=seed, same_rows=seed % 2 == 0)
    x = torch.randn(batch, 64, 48)
    spans = image_spans(mask)
    assert spans is not None and len(spans) == (3 if seed % 2 == 0 else 3 * batch)
    with torch.no_grad():
        by_mask, by_spans = lin(x, mask), lin(x, spans)
    # The same arithmetic per position; BLAS may pick another kernel for another row count, so the
    # last bits may differ (rtol 1e-6), never more.
    torch.testing.assert_close(by_spans, by_mask, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(by_spans[~mask], F.linear(x, lin.weight, lin.bias)[~mask], rtol=0, atol=0)


def test_model_logits_equal_with_spans_and_with_masks(tiny_model, monkeypatch):
    from hd4k_tools.models.xcomposer2_4khd import modeling

    model = tiny_model.model
    embeds, im_mask = _mixed_inputs(model)
    im_mask[0, 1:3] = True  # a second image span
    with torch.inference_mode():
        spans = model(embeds, im_mask)
        monkeypatch.setattr(modeling, "MAX_LORA_SPANS", 0)  # force the boolean-mask path
        masked = model(embeds, im_mask)
    torch.testing.assert_close(spans, masked, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# KV cache: in-place reorder, row views, prefixes
# ----------------------------------------------------------------------------------------------------
def _filled_cache(batch: int = 3, length: int = 7) -> KVCache:
    config = _tiny_attention_config()
    with torch.inference_mode():
        cache = KVCache(config, batch, 10, torch.float32, "cpu")
        cache.k.normal_(generator=torch.Generator().manual_seed(0))
        cache.v.normal_(generator=torch.Generator().manual_seed(1))
    cache.length = length
    return cache


@pytest.mark.parametrize("index", [[0, 0, 0], [2, 1, 0], [1, 1, 2], [0, 1, 2], [2, 0, 1], [1, 2, 2]])
def test_kv_cache_reorder_is_in_place_with_unchanged_semantics(index):
    cache = _filled_cache()
    ref_k = cache.k.index_select(1, torch.tensor(index))  # the old semantics: a full reordered copy
    ref_v = cache.v.index_select(1, torch.tensor(index))
    k_ptr, v_ptr = cache.k.data_ptr(), cache.v.data_ptr()
    with torch.inference_mode():
        cache.reorder(torch.tensor(index))
    assert cache.k.data_ptr() == k_ptr and cache.v.data_ptr() == v_ptr  # no new cache
    assert cache.batch_size == 3 and cache.length == 7
    # Every valid position equals the reordered copy (positions >= length are rewritten before use).
    assert torch.equal(cache.k[:, :, :, :7], ref_k[:, :, :, :7])
    assert torch.equal(cache.v[:, :, :, :7], ref_v[:, :, :, :7])


def test_kv_cache_reorder_repeated_steps_and_batch_change():
    cache = _filled_cache()
    ref_k = cache.k.clone()
    with torch.inference_mode():
        for index in ([1, 0, 2], [2, 2, 0], [0, 0, 1]):
            cache.reorder(torch.tensor(index))
            ref_k = ref_k.index_select(1, torch.tensor(index))
            assert torch.equal(cache.k[:, :, :, :7], ref_k[:, :, :, :7])
        with pytest.raises(IndexError):
            cache.reorder(torch.tensor([0, 3, 1]))
        cache.reorder(torch.tensor([2, 0]))  # another batch size: a new, smaller cache
    assert cache.batch_size == 2
    assert torch.equal(cache.k[:, :, :, :7], ref_k.index_select(1, torch.tensor([2, 0]))[:, :, :, :7])


def test_row_view_broadcast_snapshot_and_load_prefix():
    cache = _filled_cache(length=0)
    with torch.inference_mode():
        row0 = cache.row_view(1)
        assert row0.batch_size == 1 and row0.k.data_ptr() == cache.k.data_ptr()  # shares memory
        row0.k[:, :, :, :5] = 1.0  # written through the view
        row0.length = cache.length = 5
        cache.broadcast_row(0)
        assert (cache.k[:, :, :, :5] == 1.0).all()
        prefix = cache.snapshot(4, row=2)
        assert prefix.length == 4 and prefix.k.is_contiguous()
        assert prefix.k.untyped_storage().data_ptr() != cache.k.untyped_storage().data_ptr()  # a copy
        fresh = KVCache(_tiny_attention_config(), 2, 10, torch.float32, "cpu")
        fresh.load_prefix(prefix)
    assert fresh.length == 4
    assert torch.equal(fresh.k[:, :, :, :4], prefix.k.expand(-1, 2, -1, -1, -1))
    assert torch.equal(fresh.v[:, :, :, :4], cache.v[:, 2:3, :, :4].expand(-1, 2, -1, -1, -1))
    with pytest.raises(ValueError):
        cache.snapshot(6)  # beyond the positions written
    with pytest.raises(ValueError):
        cache.row_view(4)
