"""Fixtures of the LangChain integration tests (this folder's conftest).

The session's tiny checkpoint and the ``hd4k_tiny`` HD4K of ``conftest.py`` serve every LangChain test
(the tiny checkpoint answers in visible text, so "the tool's text is the result's text" is not vacuous).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_helpers import hd4k_capped, image_root  # noqa: F401  (shared fixtures)


@pytest.fixture(scope="session")
def lc_checkpoint(tiny_checkpoint: Path) -> Path:
    """The tiny checkpoint the LangChain tests load by path (the session's, seed 0)."""
    return tiny_checkpoint
