"""hd4k-tools: let agents see high-resolution documents, charts and images.

The public API is re-exported here lazily, so ``import hd4k_tools`` stays cheap (torch and the model
are imported only when a name that needs them is used). Integrations import from this module only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "HD4KError": "hd4k_tools.errors",
    "ImagePolicy": "hd4k_tools.imaging",
    "load_image": "hd4k_tools.imaging",
    "HDPlan": "hd4k_tools.tiling",
    "plan": "hd4k_tools.tiling",
    "auto_hd_num": "hd4k_tools.tiling",
    "hd_transform": "hd4k_tools.tiling",
    "to_model_inputs": "hd4k_tools.tiling",
    "draw_plan": "hd4k_tools.tiling",
}

__all__ = ["__version__", *sorted(_EXPORTS)]

if TYPE_CHECKING:  # pragma: no cover
    from hd4k_tools.errors import HD4KError
    from hd4k_tools.imaging import ImagePolicy, load_image
    from hd4k_tools.tiling import HDPlan, auto_hd_num, draw_plan, hd_transform, plan, to_model_inputs


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hd4k_tools' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
