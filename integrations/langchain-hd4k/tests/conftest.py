"""Fixtures of langchain-hd4k's own tests (unit_tests/, integration_tests/): a tiny random checkpoint in the
official layout (``hd4k_tools.testing``), the HD4K over it, and the tools' allowed folder. Offline: no test
reaches a hub."""

from __future__ import annotations

import os

import pytest
from langchain_helpers import hd4k_capped, image_root  # noqa: F401  (shared fixtures)

from hd4k_tools import HD4K

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HD4K_NO_PROGRESS", "1")


@pytest.fixture(scope="session")
def hd4k_tiny(tmp_path_factory: pytest.TempPathFactory) -> HD4K:
    """HD4K over a tiny random checkpoint (seed 0), written and loaded once per session."""
    from hd4k_tools.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("lc_tiny"), seed=0)
    return HD4K.from_pretrained(path, dtype="float32", device="cpu", progress=False)
