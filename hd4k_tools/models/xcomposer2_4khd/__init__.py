"""InternLM-XComposer2-4KHD-7B: everything that changes with this model lives in this folder.

Configuration, vision tower, decoder with Partial LoRA, KV cache, checkpoint loader, tokenizer, prompt
layout, HD-N tiling and its preview, and the tiny random checkpoint. Names are re-exported lazily, so
importing a torch-free part (tiling, prompt layout) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "LoadedModel": "checkpoint",
    "load_pretrained": "checkpoint",
    "VisionConfig": "configuration",
    "XComposer2Config": "configuration",
    "KVCache": "kv_cache",
    "KVPrefix": "kv_cache",
    "XComposer2ForCausalLM": "modeling",
    "DEFAULT_META_INSTRUCTION": "prompt",
    "IMAGE_PLACEHOLDER": "prompt",
    "PromptInputs": "prompt_embeds",
    "assemble_inputs": "prompt_embeds",
    "build_prompt": "prompt",
    "InternLM2Tokenizer": "tokenizer",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from hd4k_tools.models.xcomposer2_4khd.checkpoint import LoadedModel, load_pretrained
    from hd4k_tools.models.xcomposer2_4khd.configuration import VisionConfig, XComposer2Config
    from hd4k_tools.models.xcomposer2_4khd.kv_cache import KVCache, KVPrefix
    from hd4k_tools.models.xcomposer2_4khd.modeling import XComposer2ForCausalLM
    from hd4k_tools.models.xcomposer2_4khd.prompt import DEFAULT_META_INSTRUCTION, IMAGE_PLACEHOLDER, build_prompt
    from hd4k_tools.models.xcomposer2_4khd.prompt_embeds import PromptInputs, assemble_inputs
    from hd4k_tools.models.xcomposer2_4khd.tokenizer import InternLM2Tokenizer


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
