"""Shared test setup: no hub access, fixed seeds."""

from __future__ import annotations

import os
import random

import pytest

# A test never reaches a hub: any hub id must fail fast instead of trying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HD4K_NO_PROGRESS", "1")


@pytest.fixture(autouse=True)
def _fixed_seeds() -> None:
    random.seed(0)
    try:
        import numpy as np

        np.random.seed(0)
    except ImportError:  # pragma: no cover
        pass
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass


# ----------------------------------------------------------------------------------------------------
# Tiny InternLM-XComposer2-4KHD checkpoint (official on-disk layout, random weights)
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """Path of a tiny checkpoint (2 ``.bin`` shards + index, seed 0), written once per session."""
    from hd4k_tools.models.xcomposer2_4khd.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ixc2"), seed=0, format="bin", shards=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint loaded (``LoadedModel``: .model float32 on CPU, .tokenizer, .config)."""
    from hd4k_tools.models.xcomposer2_4khd import load_pretrained

    return load_pretrained(tiny_checkpoint, dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="session")
def hd4k_tiny(tiny_model):
    """An :class:`hd4k_tools.HD4K` over the tiny model (shared; its runner serialises calls)."""
    from hd4k_tools import HD4K, LocalRunner

    return HD4K(LocalRunner(tiny_model, model_id="tiny-ixc2-4khd"))
