"""Model families are found through one registry row keyed by the checkpoint's model_type/architectures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hd4k_tools.errors import CheckpointError
from hd4k_tools.models.registry import DEFAULT_FAMILY, family_for_checkpoint, family_for_config


def test_the_tiny_checkpoint_is_found_by_its_model_type(tiny_checkpoint: Path) -> None:
    family = family_for_checkpoint(tiny_checkpoint)
    assert family.package == "hd4k_tools.models.xcomposer2_4khd"
    assert callable(family.module("checkpoint").load_pretrained)


def test_architectures_alone_identify_the_family() -> None:
    assert family_for_config({"architectures": ["InternLMXComposer2ForCausalLM"]}) is DEFAULT_FAMILY


def test_an_unsupported_checkpoint_is_a_checkpoint_error_naming_what_is_supported(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="internlmxcomposer2"):
        family_for_checkpoint(tmp_path)
    from hd4k_tools import HD4K

    with pytest.raises(CheckpointError, match="llama"):
        HD4K.from_pretrained(str(tmp_path))


def test_a_hub_id_gets_the_default_family() -> None:
    assert family_for_checkpoint("internlm/internlm-xcomposer2-4khd-7b") is DEFAULT_FAMILY


def test_unknown_engine_and_unknown_engine_option_are_refused(tiny_checkpoint: Path) -> None:
    from hd4k_tools import HD4K, InputError

    with pytest.raises(InputError, match="Unknown engine"):
        HD4K.from_pretrained(str(tiny_checkpoint), engine="tensorrt")
    with pytest.raises(InputError, match="does not take"):
        HD4K.from_pretrained(str(tiny_checkpoint), devcie="cpu")
