"""Native PyTorch InternLM-XComposer2-4KHD-7B: configuration, model, KV cache, tokenizer, loader."""

from __future__ import annotations

from hd4k_tools.models.xcomposer2_4khd.checkpoint import LoadedModel, load_pretrained
from hd4k_tools.models.xcomposer2_4khd.configuration import VisionConfig, XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.kv_cache import KVCache
from hd4k_tools.models.xcomposer2_4khd.modeling import XComposer2ForCausalLM
from hd4k_tools.models.xcomposer2_4khd.tokenizer import InternLM2Tokenizer

__all__ = [
    "InternLM2Tokenizer",
    "KVCache",
    "LoadedModel",
    "VisionConfig",
    "XComposer2Config",
    "XComposer2ForCausalLM",
    "load_pretrained",
]
