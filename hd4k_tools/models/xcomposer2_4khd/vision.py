"""Vision tower of InternLM-XComposer2-4KHD: CLIP ViT-L/14-336 features, 2×2 merge, HD token layout.

docs/model.md §2 (port of the official ``build_mlp.py``: ``CLIPVisionTower.forward(images, glb_GN, sub_GN)``).

Checkpoint keys are ``vit.vision_tower.vision_model.*`` (transformers 4.33 ``CLIPVisionModel`` had a
``vision_model`` child). transformers 5.x dropped that level (``CLIPVisionModel`` *is* the vision
transformer and remaps old keys only inside ``from_pretrained``), so :class:`CLIPVisionTower` wraps the
5.x module under the attribute ``vision_model`` to keep the official key names with no remapping.

``post_layernorm`` is replaced by an identity: the tower uses the last encoder layer's output *before*
it (docs/model.md §2), and the official checkpoint most probably does not store its weights ([inferred]:
MindIE skips loading it, lmdeploy materialises it empty). Checkpoint keys
``vit.vision_tower.vision_model.post_layernorm.*`` are therefore accepted and ignored when present.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import CLIPVisionConfig, CLIPVisionModel

from hd4k_tools.models.xcomposer2_4khd.configuration import VisionConfig

MERGED_SIDE = 12  # 24×24 patches per 336 crop, merged 2×2 → 12×12 = 144 tokens (docs/model.md §2)
TOKENS_PER_CROP = MERGED_SIDE * MERGED_SIDE


def image_token_count(rows: int, cols: int) -> int:
    """Tokens of one image with a ``rows``×``cols`` tile grid: ``(rows*cols+1)*144 + 1 + (rows+1)*12``."""
    return (rows * cols + 1) * TOKENS_PER_CROP + 1 + (rows + 1) * MERGED_SIDE


class CLIPVisionTower(nn.Module):
    """Holds the CLIP module under ``vision_model`` so that keys read ``vision_model.*`` (see module doc)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        # VisionConfig's fields are CLIPVisionConfig's own names (one list: configuration.VisionConfig).
        clip_config = CLIPVisionConfig(**config.to_dict())
        self.vision_model = CLIPVisionModel(clip_config)
        self.vision_model.post_layernorm = nn.Identity()

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``pixel_values [N,3,336,336]`` → last encoder layer ``[N, 1+P, C]`` (CLS first, no post-LN)."""
        return self.vision_model(pixel_values=pixel_values).last_hidden_state

    def reset_buffers(self, device: torch.device | str) -> None:
        """Re-create the non-persistent ``position_ids`` buffer (lost when built on the meta device)."""
        emb = self.vision_model.embeddings
        emb.position_ids = torch.arange(emb.num_positions, device=device).expand((1, -1))


class VisionTower(nn.Module):
    """``vit`` of the official model: CLIP features of each crop, CLS dropped (docs/model.md §2)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config)

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_tower.vision_model.embeddings.patch_embedding.weight.dtype

    def forward(self, crops: Tensor) -> Tensor:
        """``crops [N,3,336,336]`` → patch features ``[N, 576, C]`` of the last layer (select_layer -1,
        select_feature 'patch', docs/model.md §2)."""
        hidden = self.vision_tower(crops.to(self.dtype))  # [N, 577, C]
        return hidden[:, 1:]  # [N, 576, C]


def merge_2x2(features: Tensor) -> Tensor:
    """Pixel-unshuffle of CLIP patch features (docs/model.md §2).

    ``features [B, 576, C]`` (a 24×24 grid, row-major) → ``[B, 144, 4C]``; merged cell ``(r, c)`` is
    ``concat(f[2r,2c], f[2r,2c+1], f[2r+1,2c], f[2r+1,2c+1])``.
    """
    b, n, c = features.shape
    side = math.isqrt(n)
    if side * side != n or side % 2:
        raise ValueError(f"merge_2x2 needs an even square patch grid, got {n} patches")
    half = side // 2
    x = features.reshape(b, half, 2, half, 2, c)  # [B, r, dr, c, dc, C]
    x = x.permute(0, 1, 3, 2, 4, 5)  # [B, r, c, dr, dc, C]
    return x.reshape(b, half * half, 4 * c)  # [B, 144, 4C]


def layout_image_tokens(
    global_features: Tensor,
    local_features: Tensor,
    rows: int,
    cols: int,
    glb_gn: Tensor,
    sub_gn: Tensor,
) -> Tensor:
    """Arrange merged features of one image into the 4KHD token sequence (docs/model.md §2).

    ``global_features [1, 144, D4]``, ``local_features [rows*cols, 144, D4]`` (tiles row-major),
    ``glb_gn [1, 1, D4]``, ``sub_gn [1, 1, 1, D4]`` → ``[L, D4]``:
    global 12×12 grid with ``sub_gn`` after each of its 12 rows (156 tokens), one ``glb_gn``, then the
    tiles re-assembled into a ``[12·rows, 12·cols]`` grid with ``sub_gn`` after each of its 12·rows rows.
    ``L = (rows*cols+1)*144 + 1 + (rows+1)*12``.
    """
    d4 = global_features.shape[-1]
    side = MERGED_SIDE
    if global_features.shape != (1, side * side, d4):
        raise ValueError(f"global features must be [1, 144, D], got {tuple(global_features.shape)}")
    if local_features.shape != (rows * cols, side * side, d4):
        raise ValueError(
            f"local features must be [{rows * cols}, 144, {d4}] for a {rows}x{cols} grid, "
            f"got {tuple(local_features.shape)}"
        )
    newline = sub_gn.reshape(1, 1, d4).to(global_features.dtype)  # [1, 1, D4]
    separator = glb_gn.reshape(1, d4).to(global_features.dtype)  # [1, D4]

    glb = global_features.reshape(side, side, d4)  # [12, 12, D4]
    glb = torch.cat([glb, newline.expand(side, 1, d4)], dim=1)  # [12, 13, D4]
    glb = glb.reshape(side * (side + 1), d4)  # [156, D4]

    loc = local_features.reshape(rows, cols, side, side, d4)  # [rows, cols, 12, 12, D4]
    loc = loc.permute(0, 2, 1, 3, 4)  # [rows, 12, cols, 12, D4]
    loc = loc.reshape(rows * side, cols * side, d4)  # [12·rows, 12·cols, D4]
    loc = torch.cat([loc, newline.expand(rows * side, 1, d4)], dim=1)  # [12·rows, 12·cols+1, D4]
    loc = loc.reshape(rows * side * (cols * side + 1), d4)  # [12·rows·(12·cols+1), D4]

    out = torch.cat([glb, separator, loc], dim=0)  # [L, D4]
    assert out.shape[0] == image_token_count(rows, cols), (out.shape, rows, cols)
    return out


def encode_crops(
    vit: VisionTower,
    vision_proj: nn.Module,
    glb_gn: Tensor,
    sub_gn: Tensor,
    crops: Tensor,
    rows: int,
    cols: int,
    *,
    dtype: torch.dtype,
    crop_batch_size: int | None = None,
) -> Tensor:
    """Image embeddings ``[L, D]`` of one tiled image, shared by the native model and the vLLM plugin.

    ``crops [1 + rows*cols, 3, 336, 336]`` are ``[global, tile_0, ..., tile_{n-1}]``; they run through
    CLIP in the tower's dtype (in chunks of ``crop_batch_size`` to bound activation memory; results are
    identical), then the 2×2 merge, the token layout with the separators ``glb_gn``/``sub_gn`` and
    ``vision_proj`` in ``dtype`` (docs/model.md §2). ``L == image_token_count(rows, cols)``.
    """
    if crops.shape[0] != rows * cols + 1:
        raise ValueError(f"{crops.shape[0]} crops for a {rows}x{cols} plan (expected {rows * cols + 1})")
    crops = crops.to(device=glb_gn.device, dtype=vit.dtype)
    step = crop_batch_size or crops.shape[0]
    feats = torch.cat([vit(chunk) for chunk in crops.split(step)], dim=0)  # [1+n, 576, C]
    merged = merge_2x2(feats)  # [1+n, 144, 4C]
    tokens = layout_image_tokens(merged[:1], merged[1:], rows, cols, glb_gn, sub_gn)  # [L, 4C]
    return vision_proj(tokens.to(dtype))  # [L, D]
