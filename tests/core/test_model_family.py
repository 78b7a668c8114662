"""A second model family through the registry alone (issue 18 item 2): the same model added under another
``model_type`` to a registry of its own (``FAMILIES.with_family``, passed as ``families=``), a checkpoint
that names it, and every engine path going through its :class:`ModelFamily` object (prompt building,
planning, tensors, checkpoint loading). The registry is immutable: adding a family changes no global table."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from hd4k_tools import HD4K
from hd4k_tools.errors import CheckpointError, InputError
from hd4k_tools.models import registry
from hd4k_tools.models.registry import (
    FAMILIES,
    FamilyRegistry,
    ModelFamily,
    family_for_checkpoint,
    register_family,
    unregister_family,
)


@dataclass(frozen=True)
class CountingFamily(ModelFamily):
    """The IXC2-4KHD family folder under another model_type, counting what the engines ask of it."""

    calls: Counter = field(default_factory=Counter, compare=False, hash=False)

    def conversation_prompt(self, messages: Any, layout: Any = "chat") -> str:
        self.calls["conversation_prompt"] += 1
        return super().conversation_prompt(messages, layout)

    def plan_images(self, images: Any, hd_num: Any, **kw: Any) -> Any:
        self.calls["plan_images"] += 1
        return super().plan_images(images, hd_num, **kw)

    def to_model_inputs(self, image: Any, plan: Any, *, dtype: Any = None) -> Any:
        self.calls["to_model_inputs"] += 1
        return super().to_model_inputs(image, plan, dtype=dtype)

    def load_pretrained(self, path_or_hub_id: Any, **options: Any) -> Any:
        self.calls["load_pretrained"] += 1
        return super().load_pretrained(path_or_hub_id, **options)


@pytest.fixture
def toy_family() -> CountingFamily:
    return CountingFamily(
        package=registry.DEFAULT_FAMILY.package,
        model_type="toy-xcomposer",
        architectures=("ToyXComposerForCausalLM",),
        default_checkpoint="example/toy-xcomposer",
    )


@pytest.fixture
def toy_families(toy_family: CountingFamily) -> FamilyRegistry:
    return FAMILIES.with_family(toy_family)


def _as_toy(checkpoint: Path, folder: Path) -> Path:
    folder.mkdir()
    for item in checkpoint.iterdir():
        (folder / item.name).symlink_to(item)
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(model_type="toy-xcomposer", architectures=["ToyXComposerForCausalLM"])
    (folder / "config.json").unlink()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_second_family_runs_through_the_registry_alone(
    toy_family: CountingFamily, toy_families: FamilyRegistry, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    toy = _as_toy(tiny_checkpoint, tmp_path / "toy")
    assert family_for_checkpoint(toy, toy_families) is toy_family
    with pytest.raises(CheckpointError, match="families="):
        family_for_checkpoint(toy)  # the default registry never learnt of it
    hd = HD4K.from_pretrained(str(toy), families=toy_families, dtype="float32", device="cpu", progress=False)
    assert hd.runner.family is toy_family and hd.family is toy_family
    result = hd.describe_image(Image.new("RGB", (200, 150), (20, 90, 160)), hd_num=2, generation={"max_new_tokens": 3})
    assert result.hd_num == 2
    assert toy_family.calls == Counter(load_pretrained=1, plan_images=1, conversation_prompt=1, to_model_inputs=1)


def test_registering_is_checked(toy_family: CountingFamily, toy_families: FamilyRegistry) -> None:
    assert toy_families["toy-xcomposer"] is toy_family and toy_families.default is registry.DEFAULT_FAMILY
    with pytest.raises(InputError, match="already registered"):
        toy_families.with_family(ModelFamily("x.y", "toy-xcomposer", ("Other",), "example/other"))
    with pytest.raises(InputError):
        toy_families.with_family("not a family")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="toy-xcomposer"):
        registry.family_for_config({"model_type": "unknown", "architectures": ["Nope"]}, families=toy_families)


def test_the_family_registry_is_immutable(toy_family: CountingFamily, toy_families: FamilyRegistry) -> None:
    """No global state: adding a family makes a new registry and leaves ``FAMILIES`` as it was; the
    function forms ``register_family`` / ``unregister_family`` do the same."""
    assert "toy-xcomposer" not in FAMILIES and list(FAMILIES) == [registry.DEFAULT_FAMILY.model_type]
    assert register_family(toy_family) == toy_families and "toy-xcomposer" not in FAMILIES
    assert list(unregister_family("toy-xcomposer", toy_families)) == list(FAMILIES)
    assert list(toy_families.without_family(registry.DEFAULT_FAMILY.model_type)) == list(toy_families)
    with pytest.raises(TypeError):
        FAMILIES["toy-xcomposer"] = toy_family  # type: ignore[index]


def test_serve_engines_and_default_hd_num_come_from_one_place() -> None:
    """``hd4k serve --engine`` offers the engine table's rows; the server's default hd_num is the family's
    ``default_engine_hd_num`` (written once, in the family's vllm/names.py), on both engines."""
    import inspect

    from hd4k_tools.runtime.engines import DEFAULT_ENGINE, ENGINES
    from hd4k_tools.serve.run import build_parser

    parser = build_parser()
    engine = next(a for a in parser._actions if a.dest == "engine")
    assert tuple(engine.choices) == tuple(ENGINES) and engine.default == DEFAULT_ENGINE
    default = registry.DEFAULT_FAMILY.default_engine_hd_num
    assert next(a for a in parser._actions if a.dest == "default_hd_num").default == default
    from hd4k_tools.serve.factory import ServerOptions
    from hd4k_tools.serve.run import run_server

    assert ServerOptions().default_hd_num == default
    assert "default_hd_num" not in inspect.signature(run_server).parameters  # a ServerOptions field
