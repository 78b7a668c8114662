"""Fixtures of the hostile-input catalogue: a folder of good files (the allowed root), the session's tiny
model behind a short answer length, and a health check every test ends with."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile_support import GEN, png_bytes

from hd4k_tools import HD4K, ImagePolicy, load_image


@pytest.fixture(scope="session")
def good_png() -> bytes:
    return png_bytes()


@pytest.fixture()
def root(tmp_path: Path, good_png: bytes) -> Path:
    folder = tmp_path / "root"
    (folder / "sub").mkdir(parents=True)
    (folder / "good.png").write_bytes(good_png)
    (folder / "sub" / "inner.png").write_bytes(good_png)
    return folder


@pytest.fixture()
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.png").write_bytes(png_bytes(color=(1, 2, 3)))
    (folder / "inner.png").write_bytes(png_bytes(color=(1, 2, 3)))
    return folder


@pytest.fixture()
def healthy_load(root: Path):
    """Call after a refusal: a normal load under the same root still works."""

    def check() -> None:
        image = load_image(root / "good.png", policy=ImagePolicy(allowed_roots=(root,)))
        assert image.size == (40, 30)

    return check


@pytest.fixture(scope="session")
def hd(hd4k_tiny: HD4K) -> HD4K:
    return hd4k_tiny


@pytest.fixture()
def healthy_model(hd: HD4K, good_png: bytes):
    """Call after a refusal: the shared model still answers a normal question."""

    def check() -> None:
        result = hd.chat("Say hi.", generation=GEN)
        assert result.finish_reason in ("stop", "length") and result.usage.completion_tokens == 1

    return check
