"""Fixtures of the ingest tests: the corpus, and one uninterrupted local run over it (the reference the
Ray run, the resumed runs and the framework loaders are compared with)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from ingest_corpus import FAST, make_corpus

pytest.importorskip("pypdfium2")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ingest_corpus")
    files = make_corpus(root / "docs")
    files["root"] = root / "docs"
    return files


@pytest.fixture(scope="session")
def fast() -> dict[str, Any]:
    return dict(FAST)


@pytest.fixture(scope="session")
def reference(corpus, tiny_checkpoint, hd4k_tiny, tmp_path_factory, fast):
    """(manifest, records) of one uninterrupted local run over the whole corpus."""
    from hd4k_tools import ingest

    out = tmp_path_factory.mktemp("ingest_reference") / "out"
    manifest = ingest([corpus["root"]], out, hd=hd4k_tiny, model=str(tiny_checkpoint), progress=False, **fast)
    return manifest, list(manifest.records())
