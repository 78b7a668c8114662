"""Vision tower: 2×2 merge order, separator/newline layout, token count, encode_image."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from hd4k_tools.models.xcomposer2_4khd import VisionConfig
from hd4k_tools.models.xcomposer2_4khd.vision import (
    VisionTower,
    image_token_count,
    layout_image_tokens,
    merge_2x2,
)

SIDE = 24  # CLIP patches per side of a 336 crop


def _coded_features(num_crops: int) -> torch.Tensor:
    """[num_crops, 576, 1] with value crop*1e4 + patch_row*100 + patch_col."""
    crop = torch.arange(num_crops).view(-1, 1, 1) * 10_000
    row = torch.arange(SIDE).view(1, SIDE, 1) * 100
    col = torch.arange(SIDE).view(1, 1, SIDE)
    return (crop + row + col).reshape(num_crops, SIDE * SIDE, 1).double()


def _cell(crop: int, r: int, c: int) -> list[float]:
    """Expected merged cell (r, c): f[2r,2c], f[2r,2c+1], f[2r+1,2c], f[2r+1,2c+1]."""
    base = crop * 10_000
    return [
        base + (2 * r) * 100 + 2 * c,
        base + (2 * r) * 100 + 2 * c + 1,
        base + (2 * r + 1) * 100 + 2 * c,
        base + (2 * r + 1) * 100 + 2 * c + 1,
    ]


def test_merge_2x2_order():
    merged = merge_2x2(_coded_features(2))
    assert merged.shape == (2, 144, 4)
    for crop in range(2):
        for r in range(12):
            for c in range(12):
                assert merged[crop, r * 12 + c].tolist() == _cell(crop, r, c)


def test_merge_2x2_rejects_odd_grids():
    with pytest.raises(ValueError):
        merge_2x2(torch.zeros(1, 25, 3))


@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (2, 3), (3, 2)])
def test_layout_positions(rows, cols):
    merged = merge_2x2(_coded_features(1 + rows * cols))  # [1+n, 144, 4]
    glb = torch.full((1, 1, 4), -1.0, dtype=torch.float64)
    sub = torch.full((1, 1, 1, 4), -2.0, dtype=torch.float64)
    out = layout_image_tokens(merged[:1], merged[1:], rows, cols, glb, sub)
    assert out.shape == (image_token_count(rows, cols), 4)
    assert out.shape[0] == (rows * cols + 1) * 144 + 1 + (rows + 1) * 12

    # Global view: 12 rows of 12 cells, each row closed by sub_GN.
    for r in range(12):
        for c in range(12):
            assert out[r * 13 + c].tolist() == _cell(0, r, c)
        assert out[r * 13 + 12].tolist() == [-2.0] * 4
    # One glb_GN separator.
    assert out[156].tolist() == [-1.0] * 4
    # Local tiles re-assembled into a [12·rows, 12·cols] grid, every row closed by sub_GN.
    width = 12 * cols + 1
    for big_r in range(12 * rows):
        for big_c in range(12 * cols):
            tile = (big_r // 12) * cols + big_c // 12  # row-major tile order
            assert out[157 + big_r * width + big_c].tolist() == _cell(1 + tile, big_r % 12, big_c % 12)
        assert out[157 + big_r * width + 12 * cols].tolist() == [-2.0] * 4
    # Exactly (rows+1)*12 newlines and one separator.
    assert int((out[:, 0] == -2.0).sum()) == (rows + 1) * 12
    assert int((out[:, 0] == -1.0).sum()) == 1


@pytest.mark.parametrize(
    ("rows", "cols", "tokens"), [(3, 3, 1489), (5, 11, 8137), (11, 5, 8209), (55, 1, 8737), (1, 40, 5929)]
)
def test_token_count_formula_matches_spec_table(rows, cols, tokens):
    assert image_token_count(rows, cols) == tokens


def test_layout_rejects_wrong_tile_count():
    merged = torch.zeros(3, 144, 4)
    with pytest.raises(ValueError):
        layout_image_tokens(merged[:1], merged[1:], 2, 2, torch.zeros(1, 1, 4), torch.zeros(1, 1, 1, 4))


def test_tower_drops_cls_and_skips_post_layernorm():
    torch.manual_seed(0)
    cfg = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    tower = VisionTower(cfg).eval()
    assert not any("post_layernorm" in k for k in tower.state_dict())
    assert any(k.startswith("vision_tower.vision_model.encoder.layers.0.") for k in tower.state_dict())
    x = torch.randn(2, 3, 336, 336)
    with torch.inference_mode():
        feats = tower(x)
        full = tower.vision_tower.vision_model(pixel_values=x, output_hidden_states=True)
    assert feats.shape == (2, 576, 32)
    torch.testing.assert_close(feats, full.hidden_states[-1][:, 1:])


def test_encode_image_on_tiny_model(tiny_model):
    from hd4k_tools.models.xcomposer2_4khd.tiling import plan_for_image, to_model_inputs

    image = Image.new("RGB", (500, 300), (200, 30, 90))
    inputs = to_model_inputs(image, plan_for_image(image, 4))
    model = tiny_model.model
    with torch.inference_mode():
        embeds = model.encode_image(inputs)
        chunked = model.encode_image(inputs, crop_batch_size=2)
        both = model.encode_images([inputs, inputs])
    rows, cols = inputs.plan.rows, inputs.plan.cols
    assert embeds.shape == (inputs.plan.num_tokens, model.config.hidden_size)
    assert embeds.shape[0] == image_token_count(rows, cols)
    torch.testing.assert_close(chunked, embeds)
    assert len(both) == 2 and torch.equal(both[0], embeds)
    assert torch.isfinite(embeds).all()
