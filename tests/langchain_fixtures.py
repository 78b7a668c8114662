"""Fixtures of the LangChain integration tests, loaded by their ``pytest_plugins``.

One tiny random checkpoint and one ``HD4K`` on it serve every LangChain test. The checkpoint uses
seed 3: with seed 0 the random weights answer every image prompt with ``[UNUSED_TOKEN_146]`` only,
which decodes to an empty string and would make "the tool's text is the result's text" vacuous.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_helpers import CappedRunner, chart_image, page_image, write_pdf

from hd4k_tools import HD4K, make_tiny_checkpoint

CHECKPOINT_SEED = 3


@pytest.fixture(scope="session")
def lc_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint of the LangChain tests (seed 3, see the module docstring)."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("lc_tiny"), seed=CHECKPOINT_SEED, format="bin", shards=2)


@pytest.fixture(scope="session")
def hd4k_tiny(lc_checkpoint: Path) -> HD4K:
    """One real HD4K (random tiny weights, CPU, float32) shared by all LangChain tests."""
    return HD4K.from_pretrained(str(lc_checkpoint), device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hd4k_capped(hd4k_tiny: HD4K) -> HD4K:
    """The same model behind :class:`CappedRunner`, for tools (whose generation length is fixed)."""
    return HD4K(CappedRunner(hd4k_tiny.runner))


@pytest.fixture(scope="session")
def image_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tools' allowed folder: a chart PNG, a document page PNG, a 3-page PDF."""
    root = tmp_path_factory.mktemp("lc_root")
    chart_image().save(root / "chart.png")
    page_image(1).save(root / "page.png")
    write_pdf(root / "report.pdf", 3)
    return root
