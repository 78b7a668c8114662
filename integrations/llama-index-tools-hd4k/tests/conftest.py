"""Fixtures of llama-index-tools-hd4k's own tests: the HD4K over a tiny random checkpoint (official layout)."""

from __future__ import annotations

import pytest

from hd4k_tools import HD4K


@pytest.fixture(scope="session")
def hd4k_tiny(tmp_path_factory: pytest.TempPathFactory) -> HD4K:
    from hd4k_tools.testing import make_tiny_checkpoint

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_tools"), seed=0)
    return HD4K.from_pretrained(path, dtype="float32", device="cpu", progress=False)
