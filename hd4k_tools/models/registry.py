"""Model families by checkpoint: one row per family, keyed by the checkpoint's ``model_type`` (and the
``architectures`` its config.json names).

A family is a sibling folder under ``hd4k_tools/models/`` that owns everything that changes with the
model (config, vision tower, decoder, checkpoint loader, tokenizer, prompt layout, tiling, tiny
checkpoint, vLLM plugin parts). Adding a second family is that folder plus one row here; every engine
finds the family through :func:`family_for_checkpoint`, so engines never hard-code a model.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from hd4k_tools.errors import CheckpointError


@dataclass(frozen=True)
class ModelFamily:
    """Where a family lives and how its checkpoints name themselves."""

    package: str  # the family folder as a module path
    model_type: str  # config.json "model_type"
    architectures: tuple[str, ...]  # config.json "architectures" that this family loads
    default_checkpoint: str  # hub id used when none is given

    def module(self, name: str) -> ModuleType:
        """One of the family's modules (``checkpoint``, ``prompt``, ``tiling``...), imported on demand."""
        return importlib.import_module(f"{self.package}.{name}")


FAMILIES: dict[str, ModelFamily] = {
    "internlmxcomposer2": ModelFamily(
        package="hd4k_tools.models.xcomposer2_4khd",
        model_type="internlmxcomposer2",
        architectures=("InternLMXComposer2ForCausalLM",),
        default_checkpoint="internlm/internlm-xcomposer2-4khd-7b",
    ),
}
DEFAULT_FAMILY = FAMILIES["internlmxcomposer2"]


def family_for_config(config: dict[str, Any], *, where: str = "the checkpoint") -> ModelFamily:
    """The family of a checkpoint's config.json: by ``model_type``, else by ``architectures``."""
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type in FAMILIES:
        return FAMILIES[model_type]
    names = config.get("architectures") or []
    for family in FAMILIES.values():
        if any(name in family.architectures for name in names if isinstance(name, str)):
            return family
    supported = ", ".join(f"{f.model_type} ({', '.join(f.architectures)})" for f in FAMILIES.values())
    raise CheckpointError(
        f"{where} is model_type={model_type!r}, architectures={names!r}, which hd4k-tools does not run; "
        f"supported: {supported}."
    )


def family_for_checkpoint(path_or_hub_id: str | Path) -> ModelFamily:
    """The family of a local checkpoint folder (read from its config.json). A hub id, not yet downloaded,
    gets the default family; its loader checks the config once it is there."""
    config_file = Path(path_or_hub_id) / "config.json"
    if not config_file.is_file():
        return DEFAULT_FAMILY
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_file} could not be read as JSON ({err}); re-download the checkpoint.") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file} is not a JSON object; re-download the checkpoint.")
    return family_for_config(config, where=str(path_or_hub_id))


__all__ = ["DEFAULT_FAMILY", "FAMILIES", "ModelFamily", "family_for_checkpoint", "family_for_config"]
