"""``to_data_url`` takes every source ``load_image`` takes, and a string naming an existing file is that
file even when it looks like base64 (issue 21 item 7) - inside the path policy's roots only."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from hd4k_tools.errors import InputError, PathNotAllowedError
from hd4k_tools.inputs.images import load_image, to_data_url
from hd4k_tools.inputs.policy import ImagePolicy


def _png(color: str = "red", size: tuple[int, int] = (24, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _decoded(url: str) -> Image.Image:
    header, data = url.split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


@pytest.mark.parametrize("kind", ["str", "path", "bytes", "file", "pil", "data_url", "base64"])
def test_to_data_url_takes_what_load_image_takes(kind: str, tmp_path: Path) -> None:
    raw = _png()
    (tmp_path / "chart.png").write_bytes(raw)
    source = {
        "str": str(tmp_path / "chart.png"),
        "path": tmp_path / "chart.png",
        "bytes": raw,
        "file": io.BytesIO(raw),
        "pil": Image.open(io.BytesIO(raw)),
        "data_url": "data:image/png;base64," + base64.b64encode(raw).decode(),
        "base64": base64.b64encode(raw).decode(),
    }[kind]
    image = _decoded(to_data_url(source))
    assert image.size == (24, 12) and image.convert("RGB").getpixel((0, 0)) == (255, 0, 0)


def test_to_data_url_applies_the_policy(tmp_path: Path) -> None:
    (tmp_path / "chart.png").write_bytes(_png())
    with pytest.raises(PathNotAllowedError):
        to_data_url(tmp_path / "chart.png", policy=ImagePolicy(allowed_roots=(tmp_path / "elsewhere",)))
    with pytest.raises(InputError, match="pixels"):
        to_data_url(tmp_path / "chart.png", max_pixels=100)


def _base64_looking_file(base: Path) -> str:
    """A relative path over 512 characters made only of base64 characters (letters and '/'), naming an
    extension-less PNG file: what load_image used to decode as base64 and refuse."""
    parts = ["d" * 200, "d" * 200, "d" * 200]
    folder = base.joinpath(*parts[:-1])
    folder.mkdir(parents=True)
    (folder / parts[-1]).write_bytes(_png("blue"))
    return "/".join(parts)


def test_a_file_whose_name_looks_like_base64_is_read_as_that_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = _base64_looking_file(tmp_path)
    assert len(name) > 512
    assert load_image(name).getpixel((0, 0)) == (0, 0, 255)
    assert load_image(name, policy=ImagePolicy(allowed_roots=(tmp_path,))).getpixel((0, 0)) == (0, 0, 255)
    assert _decoded(to_data_url(name)).convert("RGB").getpixel((0, 0)) == (0, 0, 255)


def test_a_base64_looking_file_outside_the_roots_is_still_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    name = _base64_looking_file(tmp_path)
    root = tmp_path / "allowed"
    root.mkdir()
    # Outside the roots the string is not looked up as a file (no probing): it is read as base64 data,
    # which is no image - refused either way, and the file is never opened.
    with pytest.raises(InputError):
        load_image(name, policy=ImagePolicy(allowed_roots=(root,)))


def test_base64_strings_are_still_base64() -> None:
    raw = _png("green")
    assert load_image(base64.b64encode(raw).decode()).getpixel((0, 0)) == (0, 128, 0)
