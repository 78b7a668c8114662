"""Native PyTorch InternLM-XComposer2-4KHD-7B: configuration, model, KV cache, tokenizer, loader, prompt
assembly (the names ``docs/architecture.md`` lists for this package)."""

from __future__ import annotations

from hd4k_tools.models.xcomposer2_4khd.checkpoint import LoadedModel, load_pretrained
from hd4k_tools.models.xcomposer2_4khd.configuration import VisionConfig, XComposer2Config
from hd4k_tools.models.xcomposer2_4khd.kv_cache import KVCache, KVPrefix
from hd4k_tools.models.xcomposer2_4khd.modeling import XComposer2ForCausalLM
from hd4k_tools.models.xcomposer2_4khd.prompt import (
    DEFAULT_META_INSTRUCTION,
    IMAGE_PLACEHOLDER,
    PromptInputs,
    assemble_inputs,
    build_prompt,
)
from hd4k_tools.models.xcomposer2_4khd.tokenizer import InternLM2Tokenizer

__all__ = [
    "DEFAULT_META_INSTRUCTION",
    "IMAGE_PLACEHOLDER",
    "InternLM2Tokenizer",
    "KVCache",
    "KVPrefix",
    "LoadedModel",
    "PromptInputs",
    "VisionConfig",
    "XComposer2Config",
    "XComposer2ForCausalLM",
    "assemble_inputs",
    "build_prompt",
    "load_pretrained",
]
