"""Fixtures of the LangChain integration tests (this folder's conftest).

The session's tiny checkpoint and the ``hd4k_tiny`` HD4K of ``conftest.py`` serve every LangChain test
(the tiny checkpoint answers in visible text, so "the tool's text is the result's text" is not vacuous).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_helpers import CappedRunner, make_image_root

from hd4k_tools import HD4K


@pytest.fixture(scope="session")
def lc_checkpoint(tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint the LangChain tests load by path (the session's, seed 0)."""
    return tiny_checkpoint


@pytest.fixture(scope="session")
def hd4k_capped(hd4k_tiny: HD4K) -> HD4K:
    """The same model behind :class:`CappedRunner`, for tools (whose generation length is fixed)."""
    return HD4K(CappedRunner(hd4k_tiny.runner))


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tools' allowed folder: a chart PNG, a document page PNG, a 3-page PDF."""
    return make_image_root(tmp_path_factory.mktemp("lc_root"))
