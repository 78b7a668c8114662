"""Public home of the HD-N tiling API (documented as ``hd4k_tools.tiling``).

The implementation is model-specific and lives in the model family folder
(:mod:`hd4k_tools.models.xcomposer2_4khd.tiling`); this module re-exports its public names.
"""

from hd4k_tools.models.xcomposer2_4khd.preview import draw_plan
from hd4k_tools.models.xcomposer2_4khd.tiling import (
    CLIP_MEAN,
    CLIP_STD,
    HD_COMPARISON,
    MAX_AUTO_HD_NUM,
    MAX_TILES,
    TILE,
    HDNum,
    HDPlan,
    ModelInputs,
    auto_hd_num,
    check_hd_num,
    hd_transform,
    image_tokens,
    plan,
    resolve_hd_num,
    to_model_inputs,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "HD_COMPARISON",
    "MAX_AUTO_HD_NUM",
    "MAX_TILES",
    "TILE",
    "HDNum",
    "HDPlan",
    "ModelInputs",
    "auto_hd_num",
    "check_hd_num",
    "draw_plan",
    "hd_transform",
    "image_tokens",
    "plan",
    "resolve_hd_num",
    "to_model_inputs",
]
