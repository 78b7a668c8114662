"""Partial LoRA arithmetic of the vLLM plugin on CPU, against the native modules: the gather and
static-shape forms, and tensor parallelism simulated with TP=2 (column-parallel layers shard B, row-parallel
layers shard A; wqkv's group-interleaved rows) by splitting weights and summing partial outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hd4k_tools.models.xcomposer2_4khd.modeling import apply_rotary
from hd4k_tools.models.xcomposer2_4khd.vllm.lora import (
    check_tp_size,
    image_rows,
    lora_shards,
    plora_gather,
    plora_static,
    shard_cols,
    shard_rows,
)

TP = 2
T = 37


@pytest.fixture(scope="module")
def layer(tiny_model):
    return tiny_model.model.model.layers[0]


@pytest.fixture(scope="module")
def mask():
    m = torch.zeros(T, dtype=torch.bool)
    m[5:21] = True  # an image
    m[30:33] = True  # a second one
    return m


def _lora(kind: str, out, x, a, b, s, mask):
    if kind == "gather":
        return plora_gather(out, x, a, b, s, image_rows(mask))
    return plora_static(out, x, a, b, s, mask.to(out.dtype))


def _column(module, x, mask, rank, kind):
    """One rank's output columns of a column-parallel PLoRA projection."""
    a, b = lora_shards("column", module.Plora_A.weight, module.Plora_B.weight, rank, TP)
    out = x @ shard_rows(module.weight, rank, TP).t()
    return _lora(kind, out, x, a, b, module.lora_scaling, mask)


def _row(module, x_local, mask, rank, kind):
    """One rank's partial sum of a row-parallel PLoRA projection (before the all-reduce)."""
    a, b = lora_shards("row", module.Plora_A.weight, module.Plora_B.weight, rank, TP)
    out = x_local @ shard_cols(module.weight, rank, TP).t()
    return _lora(kind, out, x_local, a, b, module.lora_scaling, mask)


@pytest.mark.parametrize("kind", ["gather", "static"])
def test_forms_equal_native_partial_lora(layer, mask, kind):
    torch.manual_seed(0)
    for module in (layer.attention.wqkv, layer.attention.wo, layer.feed_forward.w1, layer.feed_forward.w2):
        x = torch.randn(T, module.in_features)
        with torch.no_grad():
            ref = module(x[None], mask[None])[0]
            got = _lora(
                kind, x @ module.weight.t(), x, module.Plora_A.weight, module.Plora_B.weight, module.lora_scaling, mask
            )
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, x @ module.weight.t(), atol=1e-3)  # the LoRA changes image rows ...
        torch.testing.assert_close(got[~mask], (x @ module.weight.t())[~mask])  # ... and only them


@pytest.mark.parametrize("kind", ["gather", "static"])
def test_tensor_parallel_attention_equals_unsharded(layer, tiny_model, mask, kind):
    attn = layer.attention
    cfg = tiny_model.config
    check_tp_size(cfg.num_attention_heads, cfg.num_key_value_heads, TP)
    torch.manual_seed(1)
    x = torch.randn(1, T, cfg.hidden_size)
    pos = torch.arange(T)
    cos, sin = tiny_model.model.model.rotary_emb(pos, T, x.dtype)
    with torch.no_grad():
        ref = attn(x, mask[None], cos, sin, pos, None, T, None)[0]  # [T, D]
        n_kv, g, d = cfg.num_key_value_heads // TP, cfg.num_kv_groups, cfg.head_dim
        partials = []
        for rank in range(TP):
            qkv = _column(attn.wqkv, x[0], mask, rank, kind)  # [T, n_kv/TP * (g+2) * d]: whole KV groups
            grouped = qkv.view(T, n_kv, g + 2, d)
            q = apply_rotary(grouped[:, :, :g], cos[:, None, None], sin[:, None, None]).reshape(T, n_kv * g, d)
            k = apply_rotary(grouped[:, :, g], cos[:, None], sin[:, None])
            v = grouped[:, :, g + 1]
            o = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
            )  # [H/TP, T, d]
            o = o.transpose(0, 1).reshape(T, n_kv * g * d)  # this rank's heads, in wo's column order
            partials.append(_row(attn.wo, o, mask, rank, kind))
        got = torch.stack(partials).sum(0)  # the all-reduce
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["gather", "static"])
def test_tensor_parallel_feed_forward_equals_unsharded(layer, mask, kind):
    ffn = layer.feed_forward
    torch.manual_seed(2)
    x = torch.randn(T, ffn.w1.in_features)
    with torch.no_grad():
        ref = ffn(x[None], mask[None])[0]
        partials = []
        for rank in range(TP):
            h = F.silu(_column(ffn.w1, x, mask, rank, kind)) * _column(ffn.w3, x, mask, rank, kind)  # [T, F/TP]
            partials.append(_row(ffn.w2, h, mask, rank, kind))
        got = torch.stack(partials).sum(0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_tp_size_must_divide_kv_heads():
    check_tp_size(32, 8, 8)
    for tp in (3, 16):
        with pytest.raises(ValueError, match="divide"):
            check_tp_size(32, 8, tp)
