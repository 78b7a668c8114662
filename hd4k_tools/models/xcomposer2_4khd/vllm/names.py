"""Names shared by the plugin's modules (no vLLM import)."""

from __future__ import annotations

from pathlib import Path

from hd4k_tools.models.registry import FAMILIES

_FAMILY = next(f for f in FAMILIES.values() if f.package == __package__.rpartition(".")[0])
#: ``model_type`` of the official ``config.json`` (the family's row in ``models/registry.py``); the plugin's
#: config class is registered under it.
MODEL_TYPE = _FAMILY.model_type
#: The architecture name the plugin registers with vLLM. Deliberately not the checkpoint's
#: ``InternLMXComposer2ForCausalLM`` nor vLLM's ``InternLM2ForCausalLM``: the config class forces it, so the
#: plugin never takes over another model and vLLM never picks a text-only InternLM2 for this checkpoint.
ARCHITECTURE = "HD4KXComposer2ForCausalLM"
#: The tokenizer class named by the checkpoint's ``tokenizer_config.json``.
TOKENIZER_CLASS = "InternLMXComposer2Tokenizer"
#: The chat template for vLLM's ``/v1/chat/completions`` (also the tokenizer's default ``chat_template``).
CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")
#: Partial LoRA implementations (``hf_overrides={"plora_mode": ...}``): ``"auto"`` picks ``"static"`` when
#: CUDA graphs / torch.compile are on and ``"gather"`` in eager mode; ``"off"`` disables Partial LoRA (a
#: negative control for tests and benchmarks; never correct for the real model).
PLORA_MODES = ("auto", "gather", "static", "off")
