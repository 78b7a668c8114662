"""The engine settings vLLM must get from the checkpoint so that its answers are the native engine's (no vLLM
or torch import: ``hd4k serve --engine vllm`` builds its command line with these before vLLM starts).

Left to its own rules, vLLM changes two things the native engine keeps:

* **dtype.** vLLM's ``"auto"`` serves a float32 checkpoint in bfloat16 (float16 on some GPUs); the native
  rule (:func:`hd4k_tools.models.xcomposer2_4khd.checkpoint.resolve_dtype`) is that ``"auto"`` means the
  checkpoint's own dtype. For float32 checkpoints vLLM therefore gets ``"float32"``; bfloat16 and float16
  checkpoints keep vLLM's ``"auto"``, which serves them as stored (and bfloat16 as float16 on a GPU
  without bfloat16, as the native engine does).
* **context.** vLLM sizes ``max_model_len`` from ``max_position_embeddings`` (32,768 for IXC2-4KHD); the
  model and the native engine use ``max_length`` (16,384), which is also the budget ``hd_num="auto"``
  plans against. Both engines read it through one rule, :func:`..configuration.context_length` (16,384
  when a config leaves ``max_length`` out, never ``max_position_embeddings``).
"""

from __future__ import annotations

import os

from hd4k_tools.models.registry import read_folder_config
from hd4k_tools.models.xcomposer2_4khd.configuration import context_length

__all__ = ["checkpoint_max_length", "engine_dtype"]


def checkpoint_max_length(folder: str | os.PathLike[str]) -> int:
    """The model's context as the native engine reads it: ``max_length`` of ``config.json`` (16,384 when
    unset; ``max_position_embeddings`` is the rotary table's reach, not the context the model was trained
    to use)."""
    return context_length(read_folder_config(folder))


def engine_dtype(folder: str | os.PathLike[str], dtype: str = "auto") -> str:
    """The ``dtype`` to give vLLM for ``dtype`` as a user passed it: anything but ``"auto"`` unchanged;
    ``"auto"`` becomes ``"float32"`` for a float32 checkpoint (``dtype`` / ``torch_dtype`` of
    ``config.json``) and stays ``"auto"`` otherwise (vLLM then keeps a bfloat16/float16 checkpoint's dtype)."""
    if str(dtype).lower() != "auto":
        return str(dtype)
    config = read_folder_config(folder)
    stored = str(config.get("dtype") or config.get("torch_dtype") or "").lower().removeprefix("torch.")
    return "float32" if stored in ("float32", "float", "fp32") else "auto"
