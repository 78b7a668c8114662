"""HD-N tiling: reference cases, pixel parity with the literal reference steps, model inputs, properties."""

from __future__ import annotations

import io
import json
import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

import hd4k_tools.models.xcomposer2_4khd.tiling as tiling
from hd4k_tools.errors import InputError, InvalidHDNumError
from hd4k_tools.models.xcomposer2_4khd.preview import draw_plan
from hd4k_tools.models.xcomposer2_4khd.tiling import (
    CLIP_MEAN,
    CLIP_STD,
    HD_COMPARISON,
    MAX_AUTO_HD_NUM,
    MAX_TILES,
    TILE,
    HDPlan,
    ModelInputs,
    auto_hd_num,
    hd_transform,
    image_tokens,
    plan,
    plan_for_image,
    resolve_hd_num,
    to_model_inputs,
)

CASES = json.loads((Path(__file__).parent / "data" / "tiling_cases.json").read_text(encoding="utf-8"))["cases"]


# ----------------------------------------------------------------------------------------------------
# The reference, written out step by step (docs/model.md §1), to compare against
# ----------------------------------------------------------------------------------------------------
def ref_arith(width: int, height: int, hd_num: int) -> dict[str, Any]:
    """The reference arithmetic in the working frame, literally (loop, np.ceil, float division)."""
    trans = width < height
    w, h = (height, width) if trans else (width, height)
    ratio = w / h
    scale = 1
    while scale * np.ceil(scale / ratio) <= hd_num:
        scale += 1
    scale -= 1
    new_w = int(scale * 336)
    new_h = int(new_w / ratio)
    return {"trans": trans, "scale": scale, "new_w": new_w, "new_h": new_h}


def ref_hd_transform(img: Image.Image, hd_num: int) -> Image.Image:
    """Reference ``HD_transform`` + ``padding_336`` with plain PIL calls."""
    width, height = img.size
    trans = False
    if width < height:
        img = img.transpose(Image.Transpose.TRANSPOSE)
        trans = True
        width, height = img.size
    a = ref_arith(width, height, hd_num)
    img = img.resize((a["new_w"], a["new_h"]), Image.Resampling.BILINEAR)
    tar = int(np.ceil(a["new_h"] / 336) * 336)
    top = int((tar - a["new_h"]) / 2)
    bottom = tar - a["new_h"] - top
    img = ImageOps.expand(img, border=(0, top, 0, bottom), fill=(255, 255, 255))
    if trans:
        img = img.transpose(Image.Transpose.TRANSPOSE)
    return img


def ref_normalise(img: Image.Image) -> torch.Tensor:
    """ToTensor + Normalize(CLIP) as torchvision does it: [3, H, W] float32."""
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    x = x.to(torch.float32).div(255)
    return x.sub_(torch.tensor(CLIP_MEAN).view(3, 1, 1)).div_(torch.tensor(CLIP_STD).view(3, 1, 1))


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8), "RGB")


# ----------------------------------------------------------------------------------------------------
# Reference cases
# ----------------------------------------------------------------------------------------------------
def _case_id(case: dict[str, Any]) -> str:
    w, h = case["input_wh"]
    return f"{w}x{h}@{case['hd_num']}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_reference_case(case: dict[str, Any]) -> None:
    w, h = case["input_wh"]
    p = plan(w, h, case["hd_num"])
    assert p.transposed == case["transposed"]
    assert p.scale == case["scale"]
    if "error" in case:  # the reference crashes: resized short side 0 px -> clamped to 1 px
        assert p.clamped
        assert min(p.resized_size) == 1
        assert max(p.resized_size) == max(case["resized_wh"])
        assert p.num_tokens == image_tokens(p.rows, p.cols)
        return
    pad = case["pad"]
    assert list(p.resized_size) == case["resized_wh"]
    assert list(p.padded_size) == case["padded_wh"]
    assert p.padding == (pad["left"], pad["top"], pad["right"], pad["bottom"])
    assert [p.rows, p.cols] == case["tiles_rows_cols"]
    assert p.num_tiles == case["num_tiles"]
    assert p.num_tokens == case["image_tokens"]
    assert not p.clamped


def test_reference_set_has_float_truncation_and_error_cases() -> None:
    assert any(not c.get("exact_arith_matches_float", True) for c in CASES)
    assert any("error" in c for c in CASES)


@pytest.mark.parametrize(
    ("wh", "hd", "resized", "padded", "padding"),
    [
        ((57, 133), 25, (1007, 2352), (1008, 2352), (0, 0, 1, 0)),  # float: 1007, exact rational: 1008
        ((99, 45), 55, (3696, 1679), (3696, 1680), (0, 0, 0, 1)),
    ],
)
def test_float_truncation_is_mirrored(
    wh: tuple[int, int], hd: int, resized: tuple[int, int], padded: tuple[int, int], padding: tuple[int, ...]
) -> None:
    p = plan(*wh, hd)
    assert (p.resized_size, p.padded_size, p.padding) == (resized, padded, padding)


def test_worked_examples_from_spec() -> None:
    p = plan(3840, 1600, 55)
    assert (p.resized_size, p.padded_size, p.padding, p.rows, p.cols, p.num_tokens) == (
        (3696, 1540),
        (3696, 1680),
        (0, 70, 0, 70),
        5,
        11,
        8137,
    )
    q = plan(1600, 3840, 55)
    assert (q.padded_size, q.padding, q.rows, q.cols, q.num_tokens) == ((1680, 3696), (70, 0, 70, 0), 11, 5, 8209)
    assert plan(10, 10, 55).padded_size == (2352, 2352)  # small images are upscaled to fill the budget
    assert plan(4000, 100, 55).num_tiles == 40  # budget not filled: 41 * 2 > 55


def test_clamped_plan() -> None:
    p = plan(10000, 10, 1)
    assert p.clamped
    assert p.resized_size == (336, 1)
    assert p.padded_size == (336, 336)
    assert p.padding == (0, 167, 0, 168)
    assert plan(10, 10000, 1).padding == (167, 0, 168, 0)
    assert "clamped" in (plan.__doc__ or "")


def test_image_tokens_formula() -> None:
    assert image_tokens(1, 1) == 313
    assert image_tokens(5, 11) == 8137
    assert image_tokens(11, 5) == 8209
    assert image_tokens(55, 1) == 8737


def test_plan_is_frozen_and_json_ready() -> None:
    p = plan(3840, 1600, 55)
    with pytest.raises(AttributeError):
        p.rows = 3  # type: ignore[misc]
    d = json.loads(json.dumps(p.to_dict()))
    assert d["padded_size"] == [3696, 1680]
    assert d["padding"] == [0, 70, 0, 70]
    assert d["clamped"] is False
    assert HDPlan(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}) == p
    assert p.summary() == "HD-55: 5×11 tiles + global view · 8137 image tokens · 3840×1600 → 3696×1680"


def test_constants() -> None:
    assert TILE == 336
    assert HD_COMPARISON == (9, 16, 25, 55)
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1, 2.5, True, False, "abc", "55", None, 3.0, [9]])
def test_bad_hd_num(bad: object) -> None:
    with pytest.raises(InvalidHDNumError, match="hd_num"):
        plan(100, 100, bad)  # type: ignore[arg-type]


def test_hd_num_numpy_integer_accepted() -> None:
    assert plan(100, 100, np.int64(9)) == plan(100, 100, 9)


@pytest.mark.parametrize(("w", "h"), [(0, 10), (10, 0), (-3, 10), (2.5, 10), (True, 10), ("10", 10)])
def test_bad_sides(w: object, h: object) -> None:
    with pytest.raises(InputError):
        plan(w, h, 9)  # type: ignore[arg-type]


def test_errors_are_value_errors_with_clear_messages() -> None:
    with pytest.raises(ValueError, match=r"at least 1.*got 0"):
        plan(10, 10, 0)


def test_resolve_hd_num() -> None:
    assert resolve_hd_num(None, 100, 100, default=25, max_tokens=None) == 25
    assert resolve_hd_num(16, 100, 100, default=25, max_tokens=None) == 16
    assert resolve_hd_num("auto", 3840, 1600, default=25, max_tokens=8192) == auto_hd_num(3840, 1600, 8192)
    assert resolve_hd_num(" AUTO ", 3840, 1600, default=25, max_tokens=8192) == auto_hd_num(3840, 1600, 8192)
    with pytest.raises(InvalidHDNumError, match="max_tokens"):
        resolve_hd_num("auto", 100, 100, default=25, max_tokens=None)
    for bad in (0, -1, 2.5, True, "abc"):
        with pytest.raises(InvalidHDNumError):
            resolve_hd_num(bad, 100, 100, default=25, max_tokens=8192)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# auto_hd_num
# ----------------------------------------------------------------------------------------------------
def test_auto_hd_num_picks_the_largest_fitting_budget() -> None:
    for (w, h), budget in [((3840, 1600), 8192), ((2480, 3508), 4000), ((336, 336), 3817), ((10, 10000), 9000)]:
        n = auto_hd_num(w, h, budget)
        assert plan(w, h, n).num_tokens <= budget
        assert all(plan(w, h, m).num_tokens > budget for m in range(n + 1, 101))


def test_auto_hd_num_respects_max_hd_num() -> None:
    # One cap for every "auto" (plan_images, auto_hd_num, resolve_hd_num): HD-65 (docs/model.md §1.10).
    assert auto_hd_num(336, 336, 10**6) == MAX_AUTO_HD_NUM == 65
    assert auto_hd_num(336, 336, 10**6, max_hd_num=100) == 100
    assert auto_hd_num(336, 336, 10**6, max_hd_num=30) == 30


def test_auto_hd_num_budget_too_small() -> None:
    with pytest.raises(InvalidHDNumError, match="313"):
        auto_hd_num(1700, 2200, 200)
    with pytest.raises(InvalidHDNumError):
        auto_hd_num(1700, 2200, 0)
    with pytest.raises(InvalidHDNumError):
        auto_hd_num(1700, 2200, True)  # type: ignore[arg-type]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    w=st.integers(1, 20000),
    h=st.integers(1, 20000),
    b1=st.integers(313, 20000),
    b2=st.integers(313, 20000),
)
def test_auto_hd_num_monotone_in_budget(w: int, h: int, b1: int, b2: int) -> None:
    lo, hi = sorted((b1, b2))
    assert auto_hd_num(w, h, lo) <= auto_hd_num(w, h, hi)


# ----------------------------------------------------------------------------------------------------
# Properties
# ----------------------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None, derandomize=True)
@given(w=st.integers(1, 20000), h=st.integers(1, 20000), hd=st.integers(1, 100))
def test_plan_properties(w: int, h: int, hd: int) -> None:
    p = plan(w, h, hd)
    ref = ref_arith(w, h, hd)
    # Exactly the reference arithmetic (bisection == the literal while loop).
    assert p.transposed == ref["trans"] == (w < h)
    assert p.scale == ref["scale"]
    new_w, new_h = (p.resized_size[1], p.resized_size[0]) if p.transposed else p.resized_size
    assert new_w == ref["new_w"]
    assert new_h == max(1, ref["new_h"])
    assert p.clamped == (ref["new_h"] == 0)
    # Grid within budget, sides multiples of 336.
    assert p.rows * p.cols == p.num_tiles <= hd
    assert p.padded_size[0] % TILE == 0 and p.padded_size[1] % TILE == 0
    assert (p.padded_size[0] // TILE, p.padded_size[1] // TILE) == (p.cols, p.rows)
    # Aspect ratio kept to within 1 px (working frame).
    ratio = max(w, h) / min(w, h)
    if not p.clamped:
        assert abs(new_h - new_w / ratio) < 1
    # Padding sums and placement: white strips on the short axis only, bottom/right gets the odd pixel.
    left, top, right, bottom = p.padding
    assert p.resized_size[0] + left + right == p.padded_size[0]
    assert p.resized_size[1] + top + bottom == p.padded_size[1]
    first, second = (left, right) if p.transposed else (top, bottom)
    assert (top, bottom) == (0, 0) if p.transposed else (left, right) == (0, 0)
    assert second - first in (0, 1)
    assert 0 <= first + second < TILE
    assert p.num_tokens == (p.rows * p.cols + 1) * 144 + 1 + (p.rows + 1) * 12


@settings(max_examples=100, deadline=None, derandomize=True)
@given(w=st.integers(1, 20000), h=st.integers(1, 20000), hd=st.integers(1, 99))
def test_tokens_non_decreasing_in_hd_num(w: int, h: int, hd: int) -> None:
    assert plan(w, h, hd).num_tokens <= plan(w, h, hd + 1).num_tokens


def test_scale_matches_literal_loop_on_a_grid() -> None:
    for w in (1, 2, 3, 7, 45, 99, 133, 336, 1000, 4000, 19999):
        for h in (1, 2, 5, 57, 100, 336, 1600, 3508):
            for hd in range(1, 101):
                assert plan(w, h, hd).scale == ref_arith(w, h, hd)["scale"]


# ----------------------------------------------------------------------------------------------------
# Pixels: hd_transform
# ----------------------------------------------------------------------------------------------------
PIXEL_CASES = [
    (517, 233, 16, "landscape"),
    (233, 517, 9, "portrait"),
    (300, 300, 4, "square"),
    (1000, 37, 25, "extreme-landscape"),
    (37, 1000, 25, "extreme-portrait"),
    (57, 133, 25, "float-truncation"),
    (1, 1, 1, "one-pixel"),
]


@pytest.mark.parametrize(("w", "h", "hd", "kind"), PIXEL_CASES, ids=[c[3] for c in PIXEL_CASES])
def test_hd_transform_pixel_parity(w: int, h: int, hd: int, kind: str) -> None:
    img = random_image(w, h, seed=w * 31 + h)
    ours = hd_transform(img, hd)
    ref = ref_hd_transform(img, hd)
    assert ours.mode == "RGB"
    assert ours.size == ref.size == plan(w, h, hd).padded_size
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def test_hd_transform_converts_mode_and_auto() -> None:
    gray = random_image(120, 80, seed=3).convert("L")
    assert np.array_equal(np.asarray(hd_transform(gray, 4)), np.asarray(ref_hd_transform(gray.convert("RGB"), 4)))
    auto = hd_transform(gray, "auto", max_tokens=1500)
    assert auto.size == plan(120, 80, auto_hd_num(120, 80, 1500)).padded_size


def test_hd_transform_clamped_case_does_not_crash() -> None:
    out = hd_transform(random_image(2000, 2, seed=1), 1)
    assert out.size == (336, 336)
    arr = np.asarray(out)
    assert (arr[:167] == 255).all() and (arr[168:] == 255).all()


def test_pixel_functions_refuse_bad_input() -> None:
    img = random_image(20, 20, seed=0)
    with pytest.raises(InvalidHDNumError):
        hd_transform(img, 0)
    # to_model_inputs takes a plan, never an hd_num (planning happens once, before).
    with pytest.raises(InvalidHDNumError, match="HDPlan"):
        to_model_inputs(img, None)  # type: ignore[arg-type]
    with pytest.raises(InvalidHDNumError, match="HDPlan"):
        to_model_inputs(img, 4)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="plan is for"):
        to_model_inputs(img, plan(30, 20, 4))
    with pytest.raises(InvalidHDNumError, match="max_tokens"):
        plan_for_image(img, "auto")
    with pytest.raises(InvalidHDNumError, match=str(MAX_TILES)):
        hd_transform(img, MAX_TILES + 100)
    with pytest.raises(InputError):
        hd_transform(np.zeros((4, 4, 3), np.uint8), 1)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------
# Model inputs
# ----------------------------------------------------------------------------------------------------
def assert_model_inputs_match_reference(img: Image.Image, hd: int) -> None:
    w, h = img.size
    got = to_model_inputs(img, plan_for_image(img, hd))
    p = got.plan
    assert isinstance(got, ModelInputs)
    assert p == plan(w, h, hd)
    assert got.num_tokens == p.num_tokens
    canvas = ref_normalise(ref_hd_transform(img, hd))  # [3, R*336, C*336]
    assert got.tiles.shape == (p.rows * p.cols, 3, TILE, TILE)
    assert got.tiles.dtype == got.global_view.dtype == torch.float32
    assert got.tiles.is_contiguous()
    for k in range(p.num_tiles):
        r, c = divmod(k, p.cols)
        crop = canvas[:, r * TILE : (r + 1) * TILE, c * TILE : (c + 1) * TILE]
        assert torch.equal(got.tiles[k], crop), f"tile {k} (row {r}, col {c})"
    expected_global = F.interpolate(canvas[None], size=(TILE, TILE), mode="bicubic", align_corners=False)
    assert got.global_view.shape == (1, 3, TILE, TILE)
    assert torch.equal(got.global_view, expected_global)


@pytest.mark.parametrize(("w", "h", "hd", "kind"), PIXEL_CASES, ids=[c[3] for c in PIXEL_CASES])
def test_model_inputs_match_reference(w: int, h: int, hd: int, kind: str) -> None:
    assert_model_inputs_match_reference(random_image(w, h, seed=w + 7 * h), hd)


@pytest.fixture(params=[1, 2, 3], ids=["1-thread", "2-threads", "3-threads"])
def workers(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the pixel functions on a fixed number of threads, with the banded resize even for small images."""
    monkeypatch.setattr(tiling, "_num_workers", lambda: request.param)
    monkeypatch.setattr(tiling, "_PARALLEL_MIN_PIXELS", 0)
    return request.param


# Grids of at least 4×4 tiles take the tile-by-tile global view; 336 = 2^4·3·7, so 5, 9, 10, 11 and 13
# rows or columns give blocks that straddle tiles. Upscaled, downscaled, landscape and portrait.
GRID_CASES = [
    (48, 20, 55, "5x11-up"),
    (3840, 1600, 55, "5x11-down"),
    (20, 31, 49, "8x6-portrait-up"),
    (1240, 1754, 55, "8x6-portrait-down"),
    (20, 53, 55, "11x5-portrait"),
    (27, 20, 64, "7x9"),
    (20, 20, 16, "4x4"),
    (27, 31, 100, "10x9-portrait"),
    (400, 10, 55, "1x40-strip"),
    (300, 300, 9, "3x3"),
]


@pytest.mark.parametrize(("w", "h", "hd", "kind"), GRID_CASES, ids=[c[3] for c in GRID_CASES])
def test_model_inputs_match_reference_on_threads(w: int, h: int, hd: int, kind: str, workers: int) -> None:
    assert_model_inputs_match_reference(random_image(w, h, seed=w * 3 + h), hd)


@pytest.mark.parametrize(("w", "h", "hd", "kind"), GRID_CASES[:6], ids=[c[3] for c in GRID_CASES[:6]])
def test_hd_transform_pixel_parity_on_threads(w: int, h: int, hd: int, kind: str, workers: int) -> None:
    img = random_image(w, h, seed=w + h)
    assert np.array_equal(np.asarray(hd_transform(img, hd)), np.asarray(ref_hd_transform(img, hd)))


def test_model_inputs_from_a_lazily_decoded_image(workers: int) -> None:
    buf = io.BytesIO()
    random_image(700, 300, seed=4).save(buf, format="PNG")
    lazy = Image.open(io.BytesIO(buf.getvalue()))  # not decoded until first used, by several threads
    eager = random_image(700, 300, seed=4)
    assert torch.equal(
        to_model_inputs(lazy, plan_for_image(lazy, 25)).tiles, to_model_inputs(eager, plan(700, 300, 25)).tiles
    )


def test_normalisation_is_exact_for_every_byte() -> None:
    """All 256 values of every channel normalise exactly as ToTensor + Normalize (float32) does."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = Image.fromarray(np.stack([values, values.T, 255 - values], axis=-1), "RGB")
    p = plan(TILE, TILE, 1)
    writer = tiling._TileWriter(p)
    writer.pixels(img.resize((TILE, TILE), Image.Resampling.NEAREST), 0, 0)
    expected = ref_normalise(img.resize((TILE, TILE), Image.Resampling.NEAREST))
    assert torch.equal(torch.from_numpy(writer.tiles[0]), expected)
    assert set(np.unique(np.asarray(img)[..., 0]).tolist()) == set(range(256))


# ----------------------------------------------------------------------------------------------------
# Parallel pixel-identical resize
# ----------------------------------------------------------------------------------------------------
def _pillow_order(img: Image.Image, size: tuple[int, int]) -> str:
    """Which pass ``img.resize(size, BILINEAR)`` runs first, found by redoing it one pass at a time."""
    (w, h), (ow, oh), bilinear = img.size, size, Image.Resampling.BILINEAR
    ref = np.asarray(img.resize(size, bilinear))
    h_first = np.array_equal(ref, np.asarray(img.resize((ow, h), bilinear).resize(size, bilinear)))
    v_first = np.array_equal(ref, np.asarray(img.resize((w, oh), bilinear).resize(size, bilinear)))
    assert h_first or v_first
    return "either" if h_first and v_first else ("horizontal" if h_first else "vertical")


def _resize_sizes(seed: int, n: int) -> list[tuple[int, int, int, int]]:
    rng = np.random.default_rng(seed)
    sizes = [tuple(int(v) for v in rng.integers(1, 700, 4)) for _ in range(n)]
    # Around Pillow 13's order rule: the height shrinks by exactly, one less than and one more than
    # twice the width's shrink; plus pure horizontal, pure vertical and identity resizes.
    for d in (0, 1, 9, 40):
        for delta in (-1, 0, 1):
            w, ow = 300 + d, 300
            oh = 200
            sizes.append((w, oh + 2 * d + delta, ow, oh))
    sizes += [(640, 480, 700, 480), (640, 480, 640, 333), (333, 444, 333, 444), (1, 1, 700, 3), (700, 3, 1, 1)]
    return [s for s in sizes if min(s) >= 1]


@pytest.mark.parametrize("seed", [0, 1])
def test_vertical_pass_first_rule_matches_pillow(seed: int) -> None:
    rng = np.random.default_rng(seed + 100)
    for w, h, ow, oh in _resize_sizes(seed, 150):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        order = _pillow_order(img, (ow, oh))
        if order != "either":
            expected = "vertical" if tiling._vertical_pass_first((w, h), (ow, oh)) else "horizontal"
            assert order == expected, (w, h, ow, oh)


def _paste_at(out: Image.Image, band: Image.Image, x: int, y: int) -> None:
    out.paste(band, (x, y))


@pytest.mark.parametrize("n_workers", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resize_in_bands_is_pillow_resize(seed: int, n_workers: int) -> None:
    """Banded, threaded resize == one Image.resize (landscape) or transpose-resize-transpose (portrait)."""
    rng = np.random.default_rng(seed)
    bilinear, transpose = Image.Resampling.BILINEAR, Image.Transpose.TRANSPOSE
    with tiling._Tasks(n_workers) as tasks:
        for w, h, ow, oh in _resize_sizes(seed, 60):
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for transposed in (False, True):
                if transposed:
                    expected = img.transpose(transpose).resize((oh, ow), bilinear).transpose(transpose)
                else:
                    expected = img.resize((ow, oh), bilinear)
                out = Image.new("RGB", (ow, oh))
                tiling._resize_in_bands(
                    img, (ow, oh), tasks, partial(_paste_at, out), transposed=transposed, min_pixels=0
                )
                assert np.array_equal(np.asarray(out), np.asarray(expected)), (w, h, ow, oh, transposed)


def test_tasks_reraise_the_first_error() -> None:
    def boom(x: int) -> None:
        if x == 3:
            raise ValueError("boom")

    for n in (1, 2):
        with tiling._Tasks(n) as tasks, pytest.raises(ValueError, match="boom"):
            tasks.run([(boom, (i,)) for i in range(6)])


# ----------------------------------------------------------------------------------------------------
# Global view without the canvas
# ----------------------------------------------------------------------------------------------------
VIEW_GRIDS = [(1, 1), (1, 40), (2, 7), (3, 3), (3, 11), (4, 4), (4, 25), (5, 11), (8, 6), (7, 9), (13, 4), (11, 5)]


@pytest.mark.parametrize(("rows", "cols"), VIEW_GRIDS, ids=[f"{r}x{c}" for r, c in VIEW_GRIDS])
def test_global_view_without_canvas_is_bit_identical(rows: int, cols: int) -> None:
    rng = np.random.default_rng(rows * 100 + cols)
    grid = SimpleNamespace(rows=rows, cols=cols, num_tiles=rows * cols)
    tiles = (rng.standard_normal((rows * cols, 3, TILE, TILE)) * 2).astype(np.float32)
    canvas = tiles.reshape(rows, cols, 3, TILE, TILE).transpose(2, 0, 3, 1, 4).reshape(3, rows * TILE, cols * TILE)
    expected = F.interpolate(torch.from_numpy(np.ascontiguousarray(canvas))[None], size=(TILE, TILE), mode="bicubic")
    views = [tiling._ViewFromTaps(grid)]  # type: ignore[arg-type]
    if min(rows, cols) >= 4:
        views.append(tiling._ViewFromTiles(grid))  # type: ignore[arg-type]
    for view in views:
        # Hand the tiles over in uneven pieces, in an order that finishes tiles at different times.
        for k in reversed(range(rows * cols)):
            top, left = divmod(k, cols)
            for i0, i1 in ((0, 100), (100, 336)):
                view.piece(tiles, cols, top * TILE + i0, left * TILE, i1 - i0, TILE)
        for fn, args in view.final_calls(tiles):
            fn(*args)
        assert torch.equal(torch.from_numpy(view.result()), expected), type(view).__name__


def test_global_view_reads_only_the_taps() -> None:
    """The shortened canvas holds every sample bicubic reads: poisoning all others changes nothing."""
    for k in (4, 5, 6, 7, 8, 11, 12):
        length, lattices = tiling._bicubic_taps(k)
        assert length == (4 if k % 2 == 0 else 5) * TILE
        used = np.zeros(k * TILE, bool)
        for c0, cstep, _q0, _qstep, count in lattices:
            used[c0 : c0 + cstep * count : cstep] = True
        canvas = np.random.default_rng(k).standard_normal((3, k * TILE, 4 * TILE)).astype(np.float32)
        poisoned = canvas.copy()
        poisoned[:, ~used] = np.nan
        expect = F.interpolate(torch.from_numpy(canvas)[None], size=(TILE, TILE), mode="bicubic")
        got = F.interpolate(torch.from_numpy(poisoned)[None], size=(TILE, TILE), mode="bicubic")
        assert torch.equal(got, expect), k


def test_padded_pixels_are_normalised_white() -> None:
    got = to_model_inputs(
        random_image(450, 100, seed=5), plan(450, 100, 9)
    )  # 1×4 grid, 298 px high: 19 px padding on top
    p = got.plan
    top = p.padding[1]
    assert top > 0
    white = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    first = got.tiles[0]  # row 0 starts with `top` padded rows
    for ch in range(3):
        assert torch.equal(first[ch, :top], torch.full((top, TILE), float(white[ch])))
    assert torch.allclose(white, torch.tensor([1.9303, 2.0749, 2.1459]), atol=1e-4)


def test_model_inputs_dtype_is_a_cast_of_float32() -> None:
    img = random_image(300, 170, seed=11)
    full = to_model_inputs(img, plan_for_image(img, 6))
    half = to_model_inputs(img, plan_for_image(img, 6), dtype=torch.bfloat16)
    assert half.tiles.dtype == half.global_view.dtype == torch.bfloat16
    assert torch.equal(half.tiles, full.tiles.to(torch.bfloat16))
    assert torch.equal(half.global_view, full.global_view.to(torch.bfloat16))


def test_model_inputs_auto() -> None:
    img = random_image(640, 200, seed=2)
    got = to_model_inputs(img, plan_for_image(img, "auto", max_tokens=2000))
    assert got.plan.hd_num == auto_hd_num(640, 200, 2000)
    assert got.plan.num_tokens <= 2000


def test_model_inputs_one_row_strip() -> None:
    # A 1×40 strip, 13440 px wide, checked against the reshape/permute of the reference canvas.
    img = random_image(400, 10, seed=9)
    got = to_model_inputs(img, plan_for_image(img, 55))
    canvas = ref_normalise(ref_hd_transform(img, 55))
    assert got.plan.cols > 30
    ref_tiles = canvas.view(3, got.plan.rows, TILE, got.plan.cols, TILE).permute(1, 3, 0, 2, 4)
    assert torch.equal(got.tiles, ref_tiles.reshape(-1, 3, TILE, TILE))


# ----------------------------------------------------------------------------------------------------
# draw_plan
# ----------------------------------------------------------------------------------------------------
def test_draw_plan_preview() -> None:
    img = Image.new("RGB", (3840, 1600), (20, 120, 60))
    out = draw_plan(img, 55)
    assert out.mode == "RGB"
    assert out.width <= 1600 + 40
    assert out.height > 600
    arr = np.asarray(out).astype(int)
    # Padding strips (top and bottom) are shaded grey, not white and not the image colour.
    border, f = 16, 1600 / 3696
    x0 = (out.width - 1600) // 2 + 40
    y_pad = border + round(35 * f)
    pad_px = arr[y_pad, x0 + 200]
    assert abs(pad_px[0] - pad_px[1]) < 25 and 120 < pad_px.mean() < 250
    # The image area keeps its colour.
    y_img = border + round(500 * f)
    assert tuple(arr[y_img, x0 + 200]) == pytest.approx((20, 120, 60), abs=3)
    # Deterministic.
    assert np.array_equal(np.asarray(draw_plan(img, 55)), arr)


@pytest.mark.parametrize(("w", "h", "hd"), [(10, 10000, 55), (10000, 10, 1), (1, 1, 1), (2480, 3508, 25)])
def test_draw_plan_odd_shapes(w: int, h: int, hd: int) -> None:
    out = draw_plan(Image.new("RGB", (w, h), "black"), hd)
    assert out.width >= 560
    assert max(out.size) <= 1600 + 400


def test_draw_plan_max_side() -> None:
    out = draw_plan(Image.new("RGB", (3840, 1600)), 55, max_side=800)
    assert out.width <= 800 + 40 or out.width == 560


def test_token_formula_ceiling_from_spec() -> None:
    assert max(plan(10, 10000, 55).num_tokens, plan(10000, 10, 55).num_tokens) == 8737
    assert math.isclose(plan(2480, 3508, 65).num_tokens, 9337)
