"""Model families by checkpoint: one row per family, keyed by the checkpoint's ``model_type`` (and the
``architectures`` its config.json names).

A family is a sibling folder under ``hd4k_tools/models/`` that owns everything that changes with the
model (config, vision tower, decoder, checkpoint loader, tokenizer, prompt layout, tiling, tiny
checkpoint, vLLM plugin parts). Adding a second family is that folder plus one row in :data:`FAMILIES`
(or, at run time, a registry of your own, ``FAMILIES.with_family(family)``, passed to the engine as
``families=``); every engine finds the family through :func:`family_for_checkpoint` and then uses its
:class:`ModelFamily` object (prompt building, planning and tensors, checkpoint and tokenizer loading,
prefix-cache keys, the vLLM registration), so nothing outside ``models/`` imports a family folder.

The names engines share with every family (the plan and prompt types, the decoder's inputs and KV cache)
are importable from here: a family folder provides them with the same names, and this module re-exports
the default family's (the torch ones lazily).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from hd4k_tools.errors import CheckpointError, InputError
from hd4k_tools.frozen_table import FrozenTable

# The torch-free types every family shares (a family folder defines them under the same names).
from hd4k_tools.models.xcomposer2_4khd.prompt import ConversationTurn, Layout, PromptTokenizer
from hd4k_tools.models.xcomposer2_4khd.special_tokens import IM_END, IM_START, IMAGE_PLACEHOLDER
from hd4k_tools.models.xcomposer2_4khd.tiling import HDNum, HDPlan

if TYPE_CHECKING:  # pragma: no cover
    from PIL import Image


@dataclass(frozen=True)
class ModelFamily:
    """One model family: where it lives, how its checkpoints name themselves, and what the engines and the
    facade ask of it. Every method imports the family's module on demand (torch only where tensors are made)."""

    package: str  # the family folder as a module path
    model_type: str  # config.json "model_type"
    architectures: tuple[str, ...]  # config.json "architectures" that this family loads
    default_checkpoint: str  # hub id used when none is given

    def module(self, name: str) -> ModuleType:
        """One of the family's modules (``checkpoint``, ``prompt``, ``tiling``...), imported on demand."""
        return importlib.import_module(f"{self.package}.{name}")

    # -- prompt building -------------------------------------------------------------------------------
    def conversation_prompt(self, messages: Sequence[ConversationTurn], layout: Layout = "chat") -> str:
        """The prompt string of a conversation in ``layout`` (one image placeholder per image)."""
        return self.module("prompt").conversation_prompt(messages, layout)

    def prompt_text_tokens(
        self, count_text_tokens: Callable[[str], int], messages: Sequence[ConversationTurn], layout: Layout = "chat"
    ) -> int:
        """Text tokens of the prompt an engine renders for ``messages`` (what ``"auto"`` reserves)."""
        return self.module("prompt").prompt_text_tokens(count_text_tokens, messages, layout)

    def partial_conversation_prompt(self, messages: Sequence[ConversationTurn]) -> str:
        """The chat layout of a conversation that may end with any role (token counting of histories)."""
        return self.module("prompt").partial_conversation_prompt(messages)

    def count_prompt_tokens(
        self, tokenizer: PromptTokenizer, prompt: str, image_token_counts: Sequence[int], **kw: Any
    ) -> int:
        """Prompt tokens (text + images) without running the vision tower."""
        return self.module("prompt").count_prompt_tokens(tokenizer, prompt, image_token_counts, **kw)

    def check_context(
        self, tokenizer: PromptTokenizer, prompt: str, image_token_counts: Sequence[int], **kw: Any
    ) -> int:
        """Prompt tokens (text + images), raising ``ContextOverflowError`` past ``max_length``."""
        return self.module("prompt").check_context(tokenizer, prompt, image_token_counts, **kw)

    def check_untrusted_text(self, role: str, text: str) -> None:
        """Refuse text that would act as a control token of the family's prompt format."""
        self.module("prompt").check_untrusted_text(role, text)

    # -- checkpoint facts without torch -----------------------------------------------------------------
    def checkpoint_config(self, path_or_hub_id: str | Path, options: Any = None) -> dict[str, Any]:
        """The checkpoint's ``config.json`` (a folder's, or the one file fetched for a hub id), without torch."""
        return self.module("hub").checkpoint_config(path_or_hub_id, options)

    def context_length(self, config: dict[str, Any]) -> int:
        """The model's context (``max_length``) as its ``config.json`` sets it (the family's default if unset)."""
        return self.module("configuration").context_length(config)

    def largest_fitting_hd_num(
        self, num_text_tokens: int, image_sizes: Sequence[tuple[int, int]], max_length: int, **kw: Any
    ) -> int | None:
        """The largest hd_num (one for every image) whose tokens fit ``max_length``; ``None`` if none does."""
        return self.module("prompt").largest_fitting_hd_num(num_text_tokens, image_sizes, max_length, **kw)

    # -- planning and tensors --------------------------------------------------------------------------
    def plan_images(
        self, images: Sequence[Any], hd_num: HDNum | Sequence[HDNum] | None, **kw: Any
    ) -> tuple[HDPlan, ...]:
        """One plan per image: the family's one planner (``tiling.plan_images``)."""
        return self.module("tiling").plan_images(images, hd_num, **kw)

    def plan(self, width: int, height: int, hd_num: int) -> HDPlan:
        """The tiling geometry of one ``width×height`` image at an integer ``hd_num`` (arithmetic only)."""
        return self.module("tiling").plan(width, height, hd_num)

    def check_hd_num(self, hd_num: object) -> int:
        """A valid integer hd_num (else ``InvalidHDNumError``)."""
        return self.module("tiling").check_hd_num(hd_num)

    def to_model_inputs(self, image: Image.Image, plan: HDPlan, *, dtype: Any = None) -> Any:
        """The vision tower's tensors of ``image`` under its ``plan`` (imports torch)."""
        return self.module("tiling").to_model_inputs(image, plan, dtype=dtype)

    def assemble_inputs(self, model: Any, tokenizer: PromptTokenizer, prompt: str, embeds: Sequence[Any], **kw: Any):
        """The decoder's inputs: text embeddings and image embeddings interleaved (imports torch)."""
        return self.module("prompt_embeds").assemble_inputs(model, tokenizer, prompt, embeds, **kw)

    # -- checkpoints -----------------------------------------------------------------------------------
    def load_pretrained(self, path_or_hub_id: str | Path, **options: Any) -> Any:
        """The family's checkpoint loader (a ``LoadedModel``: model, tokenizer, config; imports torch)."""
        return self.module("checkpoint").load_pretrained(path_or_hub_id, **options)

    def load_tokenizer(self, path: str | Path) -> Any:
        """The family's tokenizer from a checkpoint folder (torch-free)."""
        return self.module("tokenizer").InternLM2Tokenizer.from_pretrained(path)

    # -- caches ----------------------------------------------------------------------------------------
    def prefix_parts(
        self, tokenizer: PromptTokenizer, prompt: str, num_images: int, bos_each_part: bool
    ) -> list[list[int]]:
        """Token ids of the prompt's text parts (between images), BOS placed as the engines place it: the
        material of the prefix-cache key."""
        prompt_module = self.module("prompt")
        return prompt_module.text_part_ids(tokenizer, prompt_module.split_prompt(prompt, num_images), bos_each_part)

    # -- vLLM ------------------------------------------------------------------------------------------
    def register_vllm(self) -> None:
        """Register the family's vLLM model (vLLM's plugin hook calls the same function)."""
        self.module("vllm.plugin").register()

    @property
    def vllm_chat_template_path(self) -> Path:
        """The chat template ``vllm serve`` is started with for this family."""
        return Path(self.module("vllm.names").CHAT_TEMPLATE_PATH)

    @property
    def default_engine_hd_num(self) -> HDNum:
        """hd_num of a vLLM engine (and ``hd4k serve``) started without one."""
        return self.module("vllm.names").DEFAULT_ENGINE_HD_NUM


class FamilyRegistry(FrozenTable[ModelFamily]):
    """The model families by ``model_type``; the first one is the default (a hub id not yet downloaded).

    Immutable, like :class:`~hd4k_tools.tasks.TaskRegistry`: :meth:`with_family` returns a new registry, so a
    family added for one engine changes nothing anywhere else (no global state). The engines take one as
    ``families=`` (default :data:`FAMILIES`).
    """

    def __init__(self, families: Iterable[ModelFamily]) -> None:
        self._rows: dict[str, ModelFamily] = {}
        for family in families:
            if not isinstance(family, ModelFamily):
                raise InputError(f"A family registry holds ModelFamily rows, got {type(family).__name__}.")
            known = self._rows.get(family.model_type)
            if known is not None and known != family:
                raise InputError(f"model_type {family.model_type!r} is already registered to {known}.")
            self._rows[family.model_type] = family
        if not self._rows:
            raise InputError("A family registry needs at least one ModelFamily (the default).")

    @property
    def default(self) -> ModelFamily:
        """The family of a checkpoint whose config.json is not at hand yet (the first row)."""
        return next(iter(self._rows.values()))

    def with_family(self, family: ModelFamily) -> FamilyRegistry:
        """A new registry with ``family`` added (its folder importable as ``family.package``): checkpoints whose
        config.json names its ``model_type`` (or one of its architectures) then load through it."""
        return FamilyRegistry((*self._rows.values(), family))

    def without_family(self, model_type: str) -> FamilyRegistry:
        """A new registry without the family of ``model_type`` (the default family stays)."""
        keep = (f for f in self._rows.values() if f.model_type != model_type or f == self.default)
        return FamilyRegistry(keep)

    def for_config(self, config: dict[str, Any], *, where: str = "the checkpoint") -> ModelFamily:
        """The family of a checkpoint's config.json: by ``model_type``, else by ``architectures``."""
        model_type = config.get("model_type")
        if isinstance(model_type, str) and model_type in self._rows:
            return self._rows[model_type]
        names = config.get("architectures") or []
        for family in self._rows.values():
            if any(name in family.architectures for name in names if isinstance(name, str)):
                return family
        supported = ", ".join(f"{f.model_type} ({', '.join(f.architectures)})" for f in self._rows.values())
        raise CheckpointError(
            f"{where} is model_type={model_type!r}, architectures={names!r}, which hd4k-tools does not run; "
            f"supported: {supported} (a family of your own: pass families=FAMILIES.with_family(...) to the engine)."
        )

    def for_checkpoint(self, path_or_hub_id: str | Path) -> ModelFamily:
        """The family of a local checkpoint folder (read from its config.json). A hub id, not yet downloaded,
        gets the default family; its loader checks the config once it is there."""
        if not (Path(path_or_hub_id) / "config.json").is_file():
            return self.default
        return self.for_config(read_folder_config(path_or_hub_id), where=str(path_or_hub_id))


#: The families this package ships: one row each (adding a family is its folder plus a row here).
FAMILIES = FamilyRegistry(
    [
        ModelFamily(
            package="hd4k_tools.models.xcomposer2_4khd",
            model_type="internlmxcomposer2",
            architectures=("InternLMXComposer2ForCausalLM",),
            default_checkpoint="internlm/internlm-xcomposer2-4khd-7b",
        ),
    ]
)
DEFAULT_FAMILY = FAMILIES.default


def register_family(family: ModelFamily, families: FamilyRegistry = FAMILIES) -> FamilyRegistry:
    """``families.with_family(family)``: a new registry with ``family`` added, for an engine's ``families=``
    (nothing global changes; the registry passed in stays as it was)."""
    return families.with_family(family)


def unregister_family(model_type: str, families: FamilyRegistry = FAMILIES) -> FamilyRegistry:
    """``families.without_family(model_type)``: a new registry without that family (the default stays)."""
    return families.without_family(model_type)


# The torch types every family shares, re-exported lazily (``from hd4k_tools.models.registry import KVCache``).
_TORCH_TYPES = {
    "KVCache": "kv_cache",
    "KVPrefix": "kv_cache",
    "PromptInputs": "prompt_embeds",
    "LoadedModel": "checkpoint",
}


def __getattr__(name: str) -> Any:
    module = _TORCH_TYPES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(DEFAULT_FAMILY.module(module), name)


def family_for_config(
    config: dict[str, Any], *, where: str = "the checkpoint", families: FamilyRegistry | None = None
) -> ModelFamily:
    """The family of a checkpoint's config.json in ``families`` (default :data:`FAMILIES`): by ``model_type``,
    else by ``architectures``."""
    return (FAMILIES if families is None else families).for_config(config, where=where)


def read_folder_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """A checkpoint folder's ``config.json`` as a dict (no torch, no hub).

    Raises:
        CheckpointError: it is missing, not JSON, or not a JSON object.
    """
    config_file = Path(folder) / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file} could not be read as JSON ({err}); re-download the checkpoint.") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object; re-download the checkpoint.")
    return config


def family_for_checkpoint(path_or_hub_id: str | Path, families: FamilyRegistry | None = None) -> ModelFamily:
    """The family of a local checkpoint folder in ``families`` (default :data:`FAMILIES`), read from its
    config.json. A hub id, not yet downloaded, gets the default family; its loader checks the config once it
    is there."""
    return (FAMILIES if families is None else families).for_checkpoint(path_or_hub_id)


__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "IMAGE_PLACEHOLDER",
    "IM_END",
    "IM_START",
    "ConversationTurn",
    "FamilyRegistry",
    "HDNum",
    "HDPlan",
    "Layout",
    "ModelFamily",
    "PromptTokenizer",
    "family_for_checkpoint",
    "family_for_config",
    "read_folder_config",
    "register_family",
    "unregister_family",
]
